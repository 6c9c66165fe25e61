"""Metrics of a folder of predictions against the ground truth (`jaxmamba evaluate`).

Cases are paired by file name (`CASE<file_ending>` in both folders), never by sorted order. Per
case and per class (or region), Dice, HD95 and optionally NSD (`jaxmamba.infer.metrics` says
exactly how each is defined); means over cases per class, and the mean over classes, as the
reference reports them (TamingMambas `evaluation/<dataset>/eval.py`).
Writes `summary.json` (nnU-Net-like layout: settings,
`metric_per_case`, `mean`) and `summary.csv`, formats the per-case table, and draws a PNG per
case.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxmamba.atomic import write_text
from jaxmamba.data import load_volume
from jaxmamba.data.io import strict_json
from jaxmamba.errors import UserError
from jaxmamba.infer.metrics import (
    evaluate_case,
    mean_metrics,
    regions_from_labels,
)
from jaxmamba.infer.preview import save_preview
from jaxmamba.jsonfile import read_json

#: mm by which a prediction's spacing or origin may differ from its ground truth's
GEOMETRY_TOLERANCE = 1e-3


class EvaluationError(UserError, ValueError):
    """Predictions and ground truth that cannot be compared; the message names the case."""


def pair_cases(pred_dir: Path, gt_dir: Path, file_ending: str, *,
               partial: bool = False) -> list[tuple[str, Path, Path]]:
    """`(case_id, prediction, ground truth)` for every prediction, matched by file name."""
    def listing(d: Path) -> dict[str, Path]:
        if not d.is_dir():
            raise EvaluationError(f"{d}: folder not found")
        return {f.name[: -len(file_ending)]: f for f in sorted(d.iterdir())
                if f.name.endswith(file_ending) and not f.name.startswith(".")}

    preds, gts = listing(pred_dir), listing(gt_dir)
    if not preds:
        raise EvaluationError(f"{pred_dir}: no prediction files ending in {file_ending}")
    orphans = sorted(set(preds) - set(gts))
    if orphans:
        raise EvaluationError(f"{len(orphans)} prediction(s) have no ground truth in {gt_dir}: "
                              f"{', '.join(orphans[:10])}")
    unpredicted = sorted(set(gts) - set(preds))
    if unpredicted and not partial:
        raise EvaluationError(f"{len(unpredicted)} ground-truth case(s) in {gt_dir} have no "
                              f"prediction in {pred_dir}: {', '.join(unpredicted[:10])}; predict "
                              f"them, or pass --partial to evaluate only the predicted cases")
    return [(c, preds[c], gts[c]) for c in sorted(preds)]


def evaluate_pair(case_id: str, pred_file: Path, gt_file: Path, regions: Mapping[str, tuple],
                  valid_labels: set[int], options: Mapping[str, Any],
                  geometry_tolerance: float | None = GEOMETRY_TOLERANCE) -> dict[str, Any]:
    """Read one prediction and its ground truth, check they match (shape, and unless
    `geometry_tolerance` is None spacing, origin and direction), and compute the metrics."""
    pred, pred_geometry = _read_labels(case_id, pred_file, valid_labels)
    gt, geometry = _read_labels(case_id, gt_file, valid_labels)
    if pred.shape != gt.shape:
        raise EvaluationError(f"case {case_id}: prediction {pred_file} has shape {list(pred.shape)}"
                              f" but the ground truth {gt_file} has {list(gt.shape)}")
    if geometry_tolerance is not None:
        mismatch = geometry_mismatch(pred_geometry, geometry, geometry_tolerance)
        if mismatch:
            raise EvaluationError(
                f"case {case_id}: prediction {pred_file} and ground truth {gt_file} are not on "
                f"the same grid ({mismatch}; tolerance {geometry_tolerance} mm): resample the "
                f"prediction onto the ground truth, or pass --ignore-geometry to score the "
                f"voxels as they are")
    metrics = evaluate_case(pred, gt, regions, spacing=geometry["spacing"], **options)
    return {"case": case_id, "prediction_file": str(pred_file), "reference_file": str(gt_file),
            "spacing": geometry["spacing"], "metrics": metrics}


def geometry_mismatch(a: Mapping[str, Any], b: Mapping[str, Any], tolerance: float) -> str:
    """How two images' grids differ beyond `tolerance` (mm; direction cosines unitless), or "".

    Relative differences up to 1e-4 pass too, as `jaxmamba check` allows between the files of
    one case (NIfTI stores the affine in float32)."""
    affine_a, affine_b = np.asarray(a["affine"], float), np.asarray(b["affine"], float)
    spacing_a, spacing_b = np.asarray(a["spacing"], float), np.asarray(b["spacing"], float)
    out = []
    if not np.allclose(spacing_a, spacing_b, rtol=1e-4, atol=tolerance):
        out.append(f"spacing {spacing_a.round(4).tolist()} vs {spacing_b.round(4).tolist()} "
                   f"(z, y, x)")
    shift = float(np.abs(affine_a[:3, 3] - affine_b[:3, 3]).max())
    if not np.allclose(affine_a[:3, 3], affine_b[:3, 3], rtol=1e-4, atol=tolerance):
        out.append(f"origin {affine_a[:3, 3].round(3).tolist()} vs "
                   f"{affine_b[:3, 3].round(3).tolist()}, {shift:.3g} mm apart")
    def direction(affine):
        return affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(direction(affine_a), direction(affine_b), rtol=1e-4, atol=tolerance):
        out.append("direction (orientation) differs")
    return "; ".join(out)


def evaluate_folder(pred_dir: str | Path, gt_dir: str | Path, dataset_json: str | Path, *,
                    regions: Mapping[str, tuple[int, ...]] | None = None,
                    hd95_in_mm: bool = False, nsd_tolerance: float | None = None,
                    empty_dice: float = math.nan, empty_hd95: float = math.nan,
                    partial: bool = False, workers: int = 1,
                    geometry_tolerance: float | None = GEOMETRY_TOLERANCE,
                    progress: bool = False) -> dict[str, Any]:
    """Evaluate every prediction in `pred_dir`; returns the summary (see the module docstring).

    `regions` default to the classes of `dataset_json` (or its regions, for a region-based one).
    A prediction whose spacing, origin or direction differs from its ground truth's by more than
    `geometry_tolerance` (mm) is refused; None compares the voxels without looking.
    """
    dataset = read_dataset_json(dataset_json)
    file_ending = dataset["file_ending"]
    label_regions = regions_from_labels(dataset["labels"])
    valid = {0} | {v for values in label_regions.values() for v in values}
    regions = dict(regions) if regions else label_regions
    unknown = sorted({v for values in regions.values() for v in values} - valid)
    if unknown:
        raise EvaluationError(f"regions {dict(regions)} use label value(s) {unknown} that "
                              f"{dataset_json} does not define ({sorted(valid)})")
    pairs = pair_cases(Path(pred_dir), Path(gt_dir), file_ending, partial=partial)
    options = {"hd95_in_mm": hd95_in_mm, "nsd_tolerance": nsd_tolerance,
               "empty_dice": empty_dice, "empty_hd95": empty_hd95}
    jobs = [(c, p, g, regions, valid, options, geometry_tolerance) for c, p, g in pairs]
    bar = dict(total=len(jobs), desc="evaluate", unit="case", disable=not progress)
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            per_case = list(tqdm(pool.map(evaluate_pair, *zip(*jobs, strict=True)), **bar))
    else:
        per_case = [evaluate_pair(*job) for job in tqdm(jobs, **bar)]
    return {
        "settings": {"prediction_folder": str(pred_dir), "ground_truth_folder": str(gt_dir),
                     "dataset_json": str(dataset_json), "regions": {k: list(v) for k, v in
                                                                    regions.items()},
                     "hd95_unit": "mm" if hd95_in_mm else "voxels",
                     "nsd_tolerance_mm": nsd_tolerance,
                     "geometry_tolerance_mm": geometry_tolerance,
                     "empty_dice": _json_float(empty_dice), "empty_hd95": _json_float(empty_hd95)},
        "metric_per_case": per_case,
        "mean": mean_metrics([c["metrics"] for c in per_case]),
    }


def summary_csv(summary: Mapping[str, Any]) -> str:
    """One row per case and one per mean: `case, <region>_<metric>...`."""
    regions = list(summary["settings"]["regions"])
    first = summary["metric_per_case"][0]["metrics"]
    columns = [(r, m) for r in regions for m in first[r]]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case", *(f"{r}_{m}" for r, m in columns)])
    for case in summary["metric_per_case"]:
        writer.writerow([case["case"], *(case["metrics"][r][m] for r, m in columns)])
    writer.writerow(["mean", *(summary["mean"][r][m] for r, m in columns)])
    return out.getvalue()


def format_table(summary: Mapping[str, Any]) -> str:
    """The per-case table: Dice / HD95 (/ NSD) per region, then the means."""
    regions = list(summary["settings"]["regions"])
    keys = [k for k in ("Dice", "HD95", "NSD") if k in summary["mean"]["mean"]]
    rows = [[c["case"], *(_cell(c["metrics"][r], keys) for r in regions),
             _cell(_case_mean(c["metrics"], regions, keys), keys)]
            for c in summary["metric_per_case"]]
    rows.append(["mean", *(_cell(summary["mean"][r], keys) for r in regions),
                 _cell(summary["mean"]["mean"], keys)])
    header = ["case", *(r[:14] for r in regions), "mean"]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row):
        return "  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                         for i, (v, w) in enumerate(zip(row, widths, strict=True)))

    unit = summary["settings"]["hd95_unit"]
    title = f"{' / '.join(keys)} per class (HD95 in {unit})"
    return "\n".join([title, line(header), line(["-" * w for w in widths]),
                      *map(line, rows[:-1]), line(["-" * w for w in widths]), line(rows[-1])])


def write_summary(summary: Mapping[str, Any], output_dir: Path) -> tuple[Path, Path]:
    """`summary.json` and `summary.csv` in `output_dir`, atomically."""
    json_path, csv_path = output_dir / "summary.json", output_dir / "summary.csv"
    write_text(json_path, json.dumps(strict_json(summary), indent=1, allow_nan=False) + "\n")
    write_text(csv_path, summary_csv(summary))
    return json_path, csv_path


def write_previews(summary: Mapping[str, Any], output_dir: Path, images_dir: Path | None,
                   dataset: Mapping[str, Any], *, progress: bool = False) -> None:
    """A PNG per case: image (channel 0, if `images_dir` is given), prediction, ground truth,
    with a legend of `dataset`'s (dataset.json's) class names."""
    file_ending = dataset["file_ending"]
    names = {v: k for k, v in dataset["labels"].items() if isinstance(v, int)}
    for case in tqdm(summary["metric_per_case"], desc="previews", unit="case",
                     disable=not progress):
        pred, _ = load_volume(case["prediction_file"], dtype=np.float32)
        gt, geometry = load_volume(case["reference_file"], dtype=np.float32)
        image = None
        if images_dir is not None:
            image, _ = load_volume(images_dir / f"{case['case']}_0000{file_ending}")
        dice = case["metrics"]
        title = f"{case['case']}  Dice " + ", ".join(f"{r} {m['Dice']:.3f}" for r, m in
                                                     dice.items())
        save_preview(output_dir / f"{case['case']}.png", pred.astype(np.int32), image=image,
                     ground_truth=gt.astype(np.int32), spacing=geometry["spacing"], title=title,
                     class_names=names)


# ---------------------------------------------------------------------- helpers
def read_dataset_json(path: str | Path) -> dict[str, Any]:
    """`dataset.json` with its `labels` checked and `file_ending` defaulted to `.nii.gz`."""
    dataset = read_json(path, EvaluationError)
    if not isinstance(dataset, dict) or not isinstance(dataset.get("labels"), dict):
        raise EvaluationError(f"{path}: expected an object with a 'labels' object (nnU-Net "
                              f"dataset.json)")
    return {**dataset, "file_ending": str(dataset.get("file_ending", ".nii.gz"))}


def _read_labels(case_id: str, path: Path, valid: set[int]) -> tuple[np.ndarray, dict]:
    data, geometry = load_volume(path, dtype=np.float32)
    if not np.isfinite(data).all():
        raise EvaluationError(f"case {case_id}: {path} holds non-finite values (NaN or inf); "
                              f"expected a label map")
    labels = np.rint(data)
    if not np.array_equal(labels, data):
        raise EvaluationError(f"case {case_id}: {path} holds non-integer values; expected a "
                              f"label map")
    bad = sorted(int(v) for v in np.unique(labels) if int(v) not in valid)  # before any cast
    if bad:
        raise EvaluationError(f"case {case_id}: {path} has label value(s) {bad[:10]} not in "
                              f"dataset.json labels {sorted(valid)}")
    return labels.astype(np.int32), geometry


def _case_mean(metrics: Mapping[str, Mapping[str, float]], regions: Sequence[str],
               keys: Sequence[str]) -> dict[str, float]:
    out = {}
    for k in keys:
        values = [metrics[r][k] for r in regions if not math.isnan(metrics[r][k])]
        out[k] = float(np.mean(values)) if values else math.nan
    return out


def _cell(metrics: Mapping[str, float], keys: Sequence[str]) -> str:
    fmt = {"Dice": "{:.3f}", "HD95": "{:.2f}", "NSD": "{:.3f}"}
    return "/".join("nan" if math.isnan(metrics[k]) else fmt[k].format(metrics[k]) for k in keys)


def _json_float(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v
