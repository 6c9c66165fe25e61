"""Trained run directories as `jaxmamba crossval` and `jaxmamba report` read them: the resolved
config, the plan, the fold, the final validation's predictions and the fold's split, without
JAX (`jaxmamba.rundir` has the layout).

`read_fold_run` reads one fold of a cross-validation and refuses what cannot be one (not a run
directory, a run of `data.fold=all`, no final validation); `check_runs` refuses runs that do not
belong together (datasets, plans or networks that differ, a fold twice, validation cases in two
runs) and returns notes on training settings that differ.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmamba.config import Config, ConfigError, load_config
from jaxmamba.data.splits import SPLITS_FILE, read_json_list
from jaxmamba.errors import UserError
from jaxmamba.infer.postprocess import label_files
from jaxmamba.jsonfile import flatten
from jaxmamba.plans import Plan
from jaxmamba.rundir import (
    CONFIG_FILE,
    FINAL_VALIDATION_DIR,
    FINAL_VALIDATION_DONE,
    PLANS_FILE,
    RunDirError,
    plan_differences,
)
from jaxmamba.train.data import cache_dir

#: Config keys whose values should agree between the folds of one cross-validation (they are
#: noted, not refused, when they differ).
COMPARED_SETTINGS = ("model.precision", "model.mamba_precision", "model.remat", "optim",
                     "train.epochs", "train.iters_per_epoch", "seed")


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run directory that training wrote: its config and plan."""

    run_dir: Path
    config: Config
    plan: Plan

    @property
    def fold(self) -> int | str:
        return self.config.data.fold

    @property
    def variant(self) -> str:
        return self.config.model.variant

    @property
    def raw_dir(self) -> Path:
        return Path(self.config.data.raw_dir)

    @property
    def final_validation(self) -> dict | None:
        """`{set: {class or "mean": Dice}}` of the final validation after the configured
        epochs (`RUN_DIR/final_validation/results.json`), or None if it has not been done."""
        path = self.run_dir / FINAL_VALIDATION_DIR / FINAL_VALIDATION_DONE
        try:
            record = json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:
            return None
        return record.get("results") if record.get("epoch") == self.config.train.epochs else None

    @property
    def n_folds(self) -> int | None:
        """Folds of the run's split (its preprocessing cache's splits_final.json), if readable."""
        try:
            return len(read_json_list(cache_dir(self.config) / SPLITS_FILE))
        except UserError:
            return None


@dataclasses.dataclass(frozen=True)
class FoldRun(TrainedRun):
    """A trained run with its final validation: one fold of a cross-validation."""

    cases: tuple[str, ...] = ()  # the validation cases it predicted

    @property
    def predictions(self) -> Path:
        return self.run_dir / FINAL_VALIDATION_DIR / "validation"


def read_trained_run(run_dir: str | Path) -> TrainedRun:
    """The config and plan of a run directory that training wrote; a `RunDirError` (naming the
    folder and what to give instead) for anything else."""
    run_dir = Path(run_dir).absolute()
    if not run_dir.is_dir():
        raise RunDirError(run_dir, "no such run directory", "give a folder that training wrote")
    if not (run_dir / PLANS_FILE).is_file():
        raise RunDirError(run_dir, f"no {PLANS_FILE}, so this is not a jaxmamba run directory",
                          "give a folder that training wrote")
    if not (run_dir / CONFIG_FILE).is_file():
        raise RunDirError(run_dir, f"no {CONFIG_FILE}: not a training run (converted PyTorch "
                                   f"checkpoints hold no validation)",
                          "give the run directories that `python train.py` wrote")
    try:
        config = load_config(run_dir / CONFIG_FILE)
        plan = Plan.load(run_dir / PLANS_FILE)
    except (ConfigError, UserError) as err:
        raise RunDirError(run_dir, f"cannot read the run's config or plan ({err})",
                          "give a run directory that training wrote") from None
    return TrainedRun(run_dir, config, plan)


def read_fold_run(run_dir: str | Path) -> FoldRun:
    """One fold of a cross-validation: a trained run of a numbered fold whose final validation
    is done (see the module docstring)."""
    run = read_trained_run(run_dir)
    config_file = run.run_dir / CONFIG_FILE
    if run.fold == "all":
        raise RunDirError(run.run_dir, "trained on every case (data.fold=all), so it validated "
                                       "none", "give the runs of the numbered folds (0-4)")
    results = run.final_validation
    if results is None:
        raise RunDirError(run.run_dir, f"no final validation ({FINAL_VALIDATION_DIR}/"
                                       f"{FINAL_VALIDATION_DONE} of epoch "
                                       f"{run.config.train.epochs} is missing: training has not "
                                       f"finished, or ran with train.final_validation=false)",
                          f"finish it with `python train.py {config_file} "
                          f"train.final_validation=true`")
    predictions = run.run_dir / FINAL_VALIDATION_DIR / "validation"
    cases = ([f.name[: -len(run.plan.file_ending)]
              for f in label_files(predictions, run.plan.file_ending)]
             if predictions.is_dir() else [])
    if "validation" not in results or not cases:
        raise RunDirError(predictions, "no validation predictions (the fold has no validation "
                                       "cases?)", "give runs of folds that hold cases out")
    return FoldRun(run.run_dir, run.config, run.plan, tuple(cases))


def check_runs(runs: Sequence[FoldRun]) -> list[str]:
    """Refuse fold runs that are not one cross-validation; return notes on settings that
    differ between them (`COMPARED_SETTINGS`)."""
    if not runs:
        raise UserError("no runs given: pass the run directories of the folds")
    first = runs[0]
    seen: dict[Any, FoldRun] = {}
    for run in runs:
        if run.run_dir in {r.run_dir for r in seen.values()}:
            raise RunDirError(run.run_dir, "given twice", "give each fold's run once")
        if (run.plan.dataset_name, run.plan.labels) != (first.plan.dataset_name,
                                                        first.plan.labels):
            raise RunDirError(run.run_dir, f"is of dataset {run.plan.dataset_name} (labels "
                                           f"{dict(run.plan.labels)}), {first.run_dir} of "
                                           f"{first.plan.dataset_name} (labels "
                                           f"{dict(first.plan.labels)})",
                              "a cross-validation needs the runs of one dataset")
        differences = plan_differences(first.plan, run.plan)
        if run.plan.network_class != first.plan.network_class or run.variant != first.variant:
            differences.insert(0, ("network", f"{first.variant} ({first.plan.network_class})",
                                   f"{run.variant} ({run.plan.network_class})"))
        if differences:
            raise RunDirError(run.run_dir, "its plan differs from " + f"{first.run_dir}'s ("
                              + "; ".join(f"{key}: {b} vs {a}" for key, a, b in differences)
                              + ")", "a cross-validation needs the runs of one plan and network")
        if run.fold in seen:
            raise RunDirError(run.run_dir, f"is fold {run.fold}, as {seen[run.fold].run_dir} is",
                              "give one run per fold")
        for other in seen.values():
            shared = sorted(set(run.cases) & set(other.cases))
            if shared:
                raise RunDirError(run.run_dir, f"validates case(s) {', '.join(shared[:5])} that "
                                               f"{other.run_dir} validates too (their splits "
                                               f"differ)", "give runs of one split (the "
                                               "splits_final.json of one preprocessing cache)")
        seen[run.fold] = run
    notes = []
    flat = [flatten(r.config.to_dict()) for r in runs]
    for key in COMPARED_SETTINGS:
        values = {k: v for k, v in flat[0].items() if k == key or k.startswith(key + ".")}
        for run, f in zip(runs[1:], flat[1:], strict=True):
            for k, v in values.items():
                if f.get(k) != v:
                    notes.append(f"{k} differs: {v!r} in {first.run_dir}, {f.get(k)!r} in "
                                 f"{run.run_dir}")
    return notes

