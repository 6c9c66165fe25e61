"""Deciding the postprocessing on a cross-validation's merged predictions, as nnunetv2 2.8's
`determine_postprocessing` (`postprocessing/remove_connected_components.py`) decides it.

1. Keep the largest component of all foreground (every non-zero label) in every case. Take it if
   the foreground mean Dice rises and no class's mean Dice falls.
2. With more than one class (or region), for each in turn (label value order; regions in
   dataset.json's order), starting from the best folder so far: keep its largest component; take
   it if that class's mean Dice rises.

Every candidate folder is scored by `jaxmamba.infer.evaluate.evaluate_folder`, as `jaxmamba
evaluate` scores it (Dice per case as nnU-Net, NaN when both masks are empty, per-class means
over the cases that are not NaN). The foreground mean is nnU-Net's `foreground_mean`: the plain
mean of the per-class means, NaN when one of them is (then step 1 is never taken), unlike the
summary's `mean`, which leaves NaN classes out. Comparisons are strict, and false with a NaN, as
nnU-Net's.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxmamba.infer.evaluate import evaluate_folder, read_dataset_json
from jaxmamba.infer.metrics import regions_from_labels
from jaxmamba.infer.postprocess import (
    FOREGROUND,
    Postprocessing,
    Step,
    apply_to_folder,
    label_files,
    labels_of,
)

FOREGROUND_MEAN = "foreground_mean"


@dataclasses.dataclass(frozen=True)
class Decision:
    postprocessing: Postprocessing
    folder: Path  # the postprocessed label maps (the predictions themselves when no step helps)
    summary: dict[str, Any]  # their `evaluate_folder` summary


def candidates(dataset_labels: Mapping[str, Any]) -> list[Step]:
    """The per-class (or per-region) steps nnU-Net tries, in its order."""
    regions = regions_from_labels(dataset_labels)
    steps = [Step(name, values) for name, values in regions.items()]
    if all(len(s.labels) == 1 for s in steps):  # labels: nnU-Net's sorted foreground_labels
        steps.sort(key=lambda s: s.labels[0])
    return steps


def dice_means(summary: Mapping[str, Any]) -> dict[str, float]:
    """Per-class mean Dice of a summary and nnU-Net's foreground mean (NaN if one is NaN)."""
    regions = list(summary["settings"]["regions"])
    out = {r: float(summary["mean"][r]["Dice"]) for r in regions}
    out[FOREGROUND_MEAN] = float(np.mean([out[r] for r in regions]))
    return out


def determine_postprocessing(predictions: str | Path, ground_truth: str | Path,
                             dataset_json: str | Path, work_dir: str | Path, *,
                             baseline: Mapping[str, Any] | None = None, workers: int = 1,
                             progress: bool = False) -> Decision:
    """Decide the postprocessing of the label maps in `predictions` against `ground_truth`
    (see the module docstring). Candidates are written under `work_dir` (it must not exist; the
    returned `folder` may lie in it). `baseline`: the predictions' summary, if already scored."""
    predictions, work = Path(predictions), Path(work_dir)
    dataset = read_dataset_json(dataset_json)
    name = str(dataset.get("name", ""))
    files = label_files(predictions, dataset["file_ending"])
    work.mkdir(parents=True)

    def score(folder: Path) -> dict[str, Any]:
        return evaluate_folder(folder, ground_truth, dataset_json, partial=True,
                               workers=workers, progress=progress)

    def trial(source_files, step: Step, folder: Path) -> tuple[Path, dict]:
        pp = Postprocessing(name, labels_of(dataset["labels"]), (step,), dataset["file_ending"])
        apply_to_folder(pp, source_files, folder, progress=progress)
        return folder, score(folder)

    source, summary = predictions, dict(baseline) if baseline is not None else score(predictions)
    steps, decisions = [], []
    per_class = candidates(dataset["labels"])
    everything = Step(FOREGROUND, tuple(sorted({v for s in per_class for v in s.labels})))
    folder, after = trial(files, everything, work / "keep_largest_foreground")
    before_means, after_means = dice_means(summary), dice_means(after)
    take = after_means[FOREGROUND_MEAN] > before_means[FOREGROUND_MEAN] and not any(
        after_means[s.name] < before_means[s.name] for s in per_class)
    decisions.append(_decision(everything, take, before_means, after_means, FOREGROUND_MEAN))
    if take:
        steps.append(everything)
        source, summary = folder, after
    if len(per_class) > 1:
        for i, step in enumerate(per_class):
            folder, after = trial(label_files(source, dataset["file_ending"]), step,
                                  work / f"keep_largest_class_{i}")
            before_means, after_means = dice_means(summary), dice_means(after)
            take = after_means[step.name] > before_means[step.name]
            decisions.append(_decision(step, take, before_means, after_means, step.name))
            if take:
                steps.append(step)
                source, summary = folder, after
            else:
                shutil.rmtree(folder)
    pp = Postprocessing(name, labels_of(dataset["labels"]), tuple(steps), dataset["file_ending"],
                        tuple(decisions))
    return Decision(pp, source, summary)


def _decision(step: Step, taken: bool, before: dict[str, float], after: dict[str, float],
              compared: str) -> dict[str, Any]:
    def clean(d):
        return {k: (None if math.isnan(v) else v) for k, v in d.items()}
    return {"name": step.name, "labels": list(step.labels), "compared": compared,
            "applied": bool(taken), "dice_before": clean(before), "dice_after": clean(after)}
