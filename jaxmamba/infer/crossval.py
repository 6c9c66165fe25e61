"""Cross-validation of fold runs (`jaxmamba crossval`), as nnU-Net's `accumulate_cv_results` and
`nnUNetv2_find_best_configuration` summarise five folds: the final-validation predictions of the
runs of one dataset and plan, one per fold, merged into one folder and scored over all cases by
`jaxmamba.infer.evaluate.evaluate_folder` (as `jaxmamba evaluate`), with the per-fold means; and
optionally nnU-Net's postprocessing decided on them (`jaxmamba.infer.postprocess_decide`).

```
OUT/crossval.json        the runs, folds (and missing ones), dataset, network, notes
OUT/validation/          the merged predictions
OUT/summary.json, .csv   their summary as `jaxmamba evaluate` writes it, plus "folds": the
                         per-fold means (CSV: rows "fold N" after "mean")
OUT/postprocessing.json  with --postprocessing: the steps taken and every decision
OUT/postprocessed/       with --postprocessing: the postprocessed predictions and their summary
OUT/dataset.json, nnUNetPlans.json   the runs' plan (for `jaxmamba postprocess` and `evaluate`)
```

Everything is written in a hidden folder beside OUT and renamed onto it at the end, so OUT is
complete or untouched; an OUT that exists must be an earlier cross-validation (or empty).
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import datetime
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxmamba.atomic import write_text
from jaxmamba.errors import UserError
from jaxmamba.infer.evaluate import evaluate_folder, summary_csv, write_summary
from jaxmamba.infer.metrics import mean_metrics
from jaxmamba.infer.postprocess import POSTPROCESSING_FILE, copy_dataset_files, label_files
from jaxmamba.infer.postprocess_decide import Decision, determine_postprocessing
from jaxmamba.infer.runs import FoldRun, check_runs, read_fold_run
from jaxmamba.rundir import DATASET_FILE, PLANS_FILE, RunDirError

CROSSVAL_FILE = "crossval.json"
FORMAT = "jaxmamba-crossval-1"
VALIDATION_DIR, POSTPROCESSED_DIR = "validation", "postprocessed"


@dataclasses.dataclass(frozen=True)
class CrossvalResult:
    out: Path
    runs: tuple[FoldRun, ...]
    n_folds: int | None  # folds of the split (None: its splits_final.json could not be read)
    missing: tuple[int, ...]
    summary: dict[str, Any]
    decision: Decision | None
    notes: tuple[str, ...]


def crossval(run_dirs: Sequence[str | Path], out: str | Path, *,
             ground_truth: str | Path | None = None, postprocessing: bool = False,
             workers: int = 1, progress: bool = False) -> CrossvalResult:
    """Merge and score the runs' final validations into `out` (see the module docstring)."""
    out = Path(out).absolute()
    _check_output(out)
    runs = sorted((read_fold_run(d) for d in run_dirs), key=lambda r: r.fold)
    notes = check_runs(runs)
    first = runs[0]
    gt = Path(ground_truth) if ground_truth is not None else first.raw_dir / "labelsTr"
    if not gt.is_dir():
        where = "given" if ground_truth is not None else (
            f"from {first.run_dir / 'config.yaml'} data.raw_dir")
        raise RunDirError(gt, f"ground-truth folder not found ({where})",
                          "pass -g LABELS_FOLDER (the dataset's labelsTr)")
    n_folds = first.n_folds
    missing = tuple(sorted(set(range(n_folds)) - {r.fold for r in runs})) if n_folds else ()
    dataset_json = first.run_dir / DATASET_FILE

    stage = out.parent / f".{out.name}.tmp{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        merged = stage / VALIDATION_DIR
        merged.mkdir(parents=True)
        origin = {}
        for r in runs:
            for f in label_files(r.predictions, first.plan.file_ending):
                shutil.copyfile(f, merged / f.name)
                origin[merged / f.name] = (f, r)
        copy_dataset_files(first.run_dir, stage, (DATASET_FILE, PLANS_FILE))
        scored = _score(merged, gt, dataset_json, origin, workers, progress)
        summary = _relocated(scored, merged, out / VALIDATION_DIR)
        summary["folds"] = fold_means(summary, runs)
        _write_summary_with_folds(summary, stage)
        decision = None
        if postprocessing:
            decision = determine_postprocessing(merged, gt, dataset_json, stage / ".work",
                                                baseline=scored, workers=workers,
                                                progress=progress)
            final = stage / POSTPROCESSED_DIR
            if decision.folder == merged:
                shutil.copytree(merged, final, ignore=shutil.ignore_patterns("summary.*"))
            else:
                decision.folder.rename(final)
            pp_summary = _relocated(decision.summary, decision.folder, out / POSTPROCESSED_DIR)
            pp_summary["folds"] = fold_means(pp_summary, runs)
            _write_summary_with_folds(pp_summary, final)
            decision.postprocessing.save(stage / POSTPROCESSING_FILE)
            shutil.rmtree(stage / ".work")
            decision = dataclasses.replace(decision, folder=out / POSTPROCESSED_DIR,
                                           summary=pp_summary)
        record = {"format": FORMAT, "created": datetime.datetime.now(datetime.UTC).isoformat(
                      timespec="seconds"),
                  "dataset_name": first.plan.dataset_name, "variant": first.variant,
                  "network_class": first.plan.network_class, "n_folds": n_folds,
                  "folds": [r.fold for r in runs], "missing_folds": list(missing),
                  "runs": [{"fold": r.fold, "run_dir": str(r.run_dir), "cases": list(r.cases)}
                           for r in runs],
                  "ground_truth": str(gt.absolute()), "postprocessing": postprocessing,
                  "notes": list(notes)}
        write_text(stage / CROSSVAL_FILE, json.dumps(record, indent=1) + "\n")
        _replace(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return CrossvalResult(out, tuple(runs), n_folds, missing, summary, decision, tuple(notes))


def fold_means(summary: dict[str, Any], runs: Sequence[FoldRun]) -> dict[str, dict]:
    """`{fold: {"run_dir", "cases", "mean"}}`: each run's cases' means (`mean_metrics`)."""
    by_case = {c["case"]: c["metrics"] for c in summary["metric_per_case"]}
    return {str(r.fold): {"run_dir": str(r.run_dir), "cases": list(r.cases),
                          "mean": mean_metrics([by_case[c] for c in r.cases])} for r in runs}


def is_crossval_folder(folder: str | Path) -> bool:
    return (Path(folder) / CROSSVAL_FILE).is_file()


# ---------------------------------------------------------------------- internals
def _check_output(out: Path) -> None:
    if out.exists() and not (out.is_dir() and (is_crossval_folder(out) or not any(out.iterdir()))):
        raise UserError(f"{out}: exists and is not a cross-validation folder (no {CROSSVAL_FILE}); "
                        f"choose a new -o folder (an earlier crossval's folder is replaced)")


def _score(merged: Path, gt: Path, dataset_json: Path, origin, workers, progress) -> dict:
    """`evaluate_folder` of the merged predictions; an unreadable one is named by its path in
    its run directory."""
    try:
        summary = evaluate_folder(merged, gt, dataset_json, partial=True, workers=workers,
                                  progress=progress)
    except UserError as err:
        message = str(err)
        for copy, (original, run) in origin.items():
            if str(copy) in message:
                raise UserError(
                    message.replace(str(copy), str(original)) + f"; redo {run.run_dir}'s final "
                    f"validation: delete {run.run_dir / 'final_validation' / 'results.json'} and "
                    f"run `python train.py {run.run_dir / 'config.yaml'}`") from None
        raise
    return summary


def _write_summary_with_folds(summary: dict[str, Any], folder: Path) -> None:
    """`write_summary`, with one CSV row per fold (`fold N`) after the mean."""
    write_summary(summary, folder)
    regions = list(summary["settings"]["regions"])
    first = summary["metric_per_case"][0]["metrics"]
    columns = [(r, m) for r in regions for m in first[r]]  # summary_csv's columns
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    for fold, f in summary["folds"].items():
        writer.writerow([f"fold {fold}", *(f["mean"][r][m] for r, m in columns)])
    write_text(folder / "summary.csv", summary_csv(summary) + rows.getvalue())


def _relocated(summary: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """`summary` with the prediction paths under `old` moved to `new` (where they will be)."""
    def move(p: str) -> str:
        path = Path(p)
        return str(new / path.relative_to(old)) if path.is_relative_to(old) else p
    out = copy.deepcopy(summary)
    out["settings"]["prediction_folder"] = move(out["settings"]["prediction_folder"])
    for case in out["metric_per_case"]:
        case["prediction_file"] = move(case["prediction_file"])
    return out


def _replace(stage: Path, out: Path) -> None:
    """Rename `stage` onto `out`; an earlier `out` goes only once the new one is in place."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
