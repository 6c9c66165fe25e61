"""One row per network and dataset (`jaxmamba report`), with the columns of nnU-Net Revisited's
tables (Isensee et al., MICCAI 2024): folds, Dice per class and mean (the cross-validation's
where a `jaxmamba crossval` folder is given, else over the given runs' final-validation cases),
parameters, compiled train-step memory, median step time and card, epochs and wall-clock
training time, read from what training records in each run directory (`metrics.jsonl`,
`training.json`: `jaxmamba.train.record`). Formatting is `jaxmamba.infer.report_format`.

Runs are grouped by network (`model.variant`) and dataset; the runs a given crossval folder
names are its row and not repeated. A value a run does not record (a run trained before
`training.json` existed, one without a final validation) is left empty.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmamba.errors import UserError
from jaxmamba.infer.crossval import CROSSVAL_FILE, POSTPROCESSED_DIR, is_crossval_folder
from jaxmamba.infer.metrics import mean_metrics
from jaxmamba.infer.runs import TrainedRun, read_trained_run
from jaxmamba.rundir import FINAL_VALIDATION_DIR, METRICS_FILE, RunDirError
from jaxmamba.train import record


@dataclasses.dataclass
class Row:
    network: str
    dataset: str
    folds: list[int | str]
    source: str  # "crossval" (a crossval folder) or "runs"
    dice: dict[str, float]  # class -> mean Dice over the validation cases ({} if none)
    mean_dice: float | None
    pp_mean_dice: float | None = None  # after the crossval's postprocessing
    missing_folds: list[int] = dataclasses.field(default_factory=list)
    parameters: int | None = None
    memory_bytes: int | None = None  # compiled train step, per device; the largest of the runs
    step_seconds: float | None = None  # median over every epoch of every run
    cards: list[str] = dataclasses.field(default_factory=list)
    epochs: list[int] = dataclasses.field(default_factory=list)  # per run
    train_seconds: list[float] = dataclasses.field(default_factory=list)  # per run
    paths: list[str] = dataclasses.field(default_factory=list)


def collect(paths: Sequence[str | Path]) -> list[Row]:
    """The rows of `paths` (run directories and crossval folders), in the order given."""
    rows, groups, covered = [], {}, set()
    crossvals = [Path(p).absolute() for p in paths if is_crossval_folder(p)]
    for folder in crossvals:
        row, runs = _crossval_row(folder)
        rows.append(row)
        covered |= {r.run_dir for r in runs}
    for p in paths:
        if Path(p).absolute() in crossvals:
            continue
        try:
            run = read_trained_run(p)
        except RunDirError as err:
            raise RunDirError(err.path, err.problem, "give run directories that training wrote "
                              f"or folders that `jaxmamba crossval` wrote ({CROSSVAL_FILE})"
                              ) from None
        if run.run_dir in covered:
            continue
        groups.setdefault((run.variant, run.plan.dataset_name), []).append(run)
    for (network, dataset), runs in groups.items():
        per_case, folds = [], []
        for run in runs:
            folds.append(run.fold)
            per_case += _validation_cases(run)
        dice, mean = _dice(mean_metrics(per_case)) if per_case else ({}, None)
        row = Row(network, dataset, folds, "runs", dice, mean)
        _add_training(row, runs)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------- internals
def _crossval_row(folder: Path) -> tuple[Row, list[TrainedRun]]:
    try:
        cv = json.loads((folder / CROSSVAL_FILE).read_text())
        dice, mean_dice = _dice(_nan(json.loads((folder / "summary.json").read_text())["mean"]))
        row = Row(cv["variant"], cv["dataset_name"], list(cv["folds"]), "crossval", dice,
                  mean_dice, missing_folds=list(cv.get("missing_folds", [])))
        pp = folder / POSTPROCESSED_DIR / "summary.json"
        if pp.is_file():
            row.pp_mean_dice = _dice(_nan(json.loads(pp.read_text())["mean"]))[1]
        listed = [r["run_dir"] for r in cv["runs"]]
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{folder}: unreadable crossval folder ({type(err).__name__}: {err}); "
                        f"run `jaxmamba crossval` again") from None
    runs = []
    for r in listed:
        try:
            runs.append(read_trained_run(r))
        except RunDirError:  # moved or deleted since: its Dice is in the summary, its cost lost
            pass
    _add_training(row, runs)
    row.paths.insert(0, str(folder))
    return row, runs


def _validation_cases(run: TrainedRun) -> list[dict]:
    """Per-case metrics of the run's final validation (none if it has not been done)."""
    path = run.run_dir / FINAL_VALIDATION_DIR / "validation" / "summary.json"
    if run.final_validation is None or not path.is_file():
        return []
    try:
        return [_nan(c["metrics"]) for c in json.loads(path.read_text())["metric_per_case"]]
    except (json.JSONDecodeError, KeyError) as err:
        raise UserError(f"{path}: unreadable ({type(err).__name__}: {err}); delete "
                        f"{run.run_dir / FINAL_VALIDATION_DIR / 'results.json'} and run "
                        f"`python train.py {run.run_dir / 'config.yaml'}` to validate "
                        f"again") from None


def _add_training(row: Row, runs: Sequence[TrainedRun]) -> None:
    """Parameters, memory, step time, cards, epochs and time from the runs' records."""
    steps, memory, cards = [], [], []
    for run in runs:
        row.paths.append(str(run.run_dir))
        history = _metrics(run.run_dir / METRICS_FILE)
        row.epochs.append(len(history))
        row.train_seconds.append(sum(float(r.get("epoch_seconds") or 0.0) for r in history))
        steps += [r["step_seconds"] for r in history if r.get("step_seconds") is not None]
        rec = record.read(run.run_dir)
        if rec is None:
            continue
        row.parameters = rec.get("parameters", row.parameters)
        for s in rec.get("sessions", []):
            if s.get("train_step_bytes") is not None:
                memory.append(int(s["train_step_bytes"]))
            card = f"{s.get('device_kind', '?')} x{s.get('devices', '?')}"
            if card not in cards:
                cards.append(card)
    row.step_seconds = statistics.median(steps) if steps else None
    row.memory_bytes = max(memory) if memory else None
    row.cards = cards


def _metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _dice(mean: dict[str, Any]) -> tuple[dict[str, float], float | None]:
    """`(class -> Dice, mean Dice)` from a summary's `mean`."""
    dice = {k: v["Dice"] for k, v in mean.items() if k != "mean"}
    overall = mean.get("mean", {}).get("Dice")
    return dice, (None if overall is None or math.isnan(overall) else overall)


def _nan(tree: Any) -> Any:
    """Strict JSON's nulls (what NaN is written as) back to NaN, for `mean_metrics`."""
    if isinstance(tree, dict):
        return {k: _nan(v) for k, v in tree.items()}
    return math.nan if tree is None else tree
