"""Segmentation metrics with numpy and scipy only (TamingMambas `evaluation/*/eval.py`).

- **Dice** as nnU-Net: `2 TP / (2 TP + FP + FN)`, NaN when both masks are empty (nnU-Net leaves such
  cases out of the mean). The reference's evaluation scripts use 1 (or 100) instead:
  `empty_dice=1.0`.
- **HD95** as medpy's `binary.hd95`: the surface of a mask is the mask minus its erosion with the
  6-connected structuring element (voxels on the volume edge count as surface), the Euclidean
  distances from every surface voxel of one mask to the surface of the other, in both directions,
  pooled, and their 95th percentile (`np.percentile`, linear interpolation). In voxels when
  `spacing` is None (the reference's evaluation), otherwise in the units of `spacing` (mm). NaN
  when either mask is empty (medpy raises); the reference's scripts use 0: `empty_hd95=0.0`.
- **NSD** (normalised surface Dice) at a tolerance in mm: the fraction of surface voxels of both
  masks that lie within the tolerance of the other mask's surface. This is the voxel-surface variant
  (MONAI `SurfaceDiceMetric(use_subvoxels=False)`), with the medpy surface above; DeepMind's
  `surface-distance` weights each surface element by its area instead, so the two differ slightly
  (`compute_surface_dice_at_tolerance`). NaN when both masks are empty, 0 when exactly one is.

All functions take boolean (or 0/1) arrays of one shape; `spacing` is per axis, in the arrays' axis
order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

Regions = Mapping[str, tuple[int, ...]]

def dice(pred: np.ndarray, gt: np.ndarray, *, empty_dice: float = math.nan) -> float:
    """Dice coefficient of two masks; `empty_dice` when both are empty (nnU-Net: NaN)."""
    pred, gt = _as_masks(pred, gt)
    tp = np.count_nonzero(pred & gt)
    denominator = np.count_nonzero(pred) + np.count_nonzero(gt)
    return float(2 * tp / denominator) if denominator else float(empty_dice)


def surface_distances(pred: np.ndarray, gt: np.ndarray,
                      spacing: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Distances from each surface voxel of `pred` to the surface of `gt`, and the reverse.

    Both masks must be non-empty. Computed on the bounding box of both masks plus one voxel, which
    leaves the surfaces (and the distances between them) unchanged.
    """
    pred, gt = _as_masks(pred, gt)
    if not pred.any() or not gt.any():
        raise ValueError("surface distances need two non-empty masks")
    box = _bounding_box(pred | gt)
    pred_surface, gt_surface = _surface(pred[box]), _surface(gt[box])
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    to_gt = distance_transform_edt(~gt_surface, sampling=sampling)[pred_surface]
    to_pred = distance_transform_edt(~pred_surface, sampling=sampling)[gt_surface]
    return to_gt, to_pred


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] | None = None, *,
         empty_hd95: float = math.nan) -> float:
    """medpy-compatible 95th-percentile Hausdorff distance; `empty_hd95` if a mask is empty."""
    pred, gt = _as_masks(pred, gt)
    if not pred.any() or not gt.any():
        return float(empty_hd95)
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    return float(np.percentile(np.concatenate([to_gt, to_pred]), 95))


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float,
        spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at `tolerance` (same units as `spacing`; voxels if None)."""
    pred, gt = _as_masks(pred, gt)
    if not pred.any() and not gt.any():
        return math.nan
    if not pred.any() or not gt.any():
        return 0.0
    to_gt, to_pred = surface_distances(pred, gt, spacing)
    close = np.count_nonzero(to_gt <= tolerance) + np.count_nonzero(to_pred <= tolerance)
    return float(close / (to_gt.size + to_pred.size))


def regions_from_labels(labels: Mapping[str, int | Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Evaluated regions from dataset.json `labels`: each non-background class on its own, or the
    label sets of a region-based dataset (`"whole tumor": [1, 2, 3]`)."""
    regions = {}
    for name, value in labels.items():
        values = (value,) if isinstance(value, int) else tuple(int(v) for v in value)
        if values != (0,):
            regions[name] = values
    if not regions:
        raise ValueError(f"labels {dict(labels)} define no foreground class or region")
    return regions


def parse_regions(spec: str) -> dict[str, tuple[int, ...]]:
    """`"WT=1,2,3;TC=2,3;ET=3"` -> `{"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}`."""
    regions = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, values = part.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            regions[name.strip()] = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"region {part!r}: expected NAME=LABEL[,LABEL...], e.g. "
                             f"'WT=1,2,3;TC=2,3;ET=3'") from None
    if not regions:
        raise ValueError(f"regions {spec!r} define no region")
    return regions


#: BraTS regions from the argmax labels, as the reference evaluates them
#: (TamingMambas `evaluation/Dataset001_BrainTumour/eval.py`).
BRATS_REGIONS = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}


def evaluate_case(pred: np.ndarray, gt: np.ndarray, regions: Regions, *,
                  spacing: Sequence[float] | None = None, hd95_in_mm: bool = False,
                  nsd_tolerance: float | None = None, empty_dice: float = math.nan,
                  empty_hd95: float = math.nan) -> dict[str, dict[str, float]]:
    """Metrics of one label map against its ground truth, per region.

    `pred`, `gt`: integer label maps of one shape. `regions`: name -> label values forming it.
    HD95 is in voxels unless `hd95_in_mm` (then `spacing` is required); NSD needs `spacing` and a
    `nsd_tolerance` in mm and is left out without one.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground truth shape {gt.shape}")
    if (hd95_in_mm or nsd_tolerance is not None) and spacing is None:
        raise ValueError("HD95 in mm and NSD need the voxel spacing")
    out = {}
    for name, values in regions.items():
        p, g = np.isin(pred, values), np.isin(gt, values)
        tp = int(np.count_nonzero(p & g))
        n_pred, n_ref = int(np.count_nonzero(p)), int(np.count_nonzero(g))
        m = {"Dice": dice(p, g, empty_dice=empty_dice),
             "HD95": hd95(p, g, spacing if hd95_in_mm else None, empty_hd95=empty_hd95)}
        if nsd_tolerance is not None:
            m["NSD"] = nsd(p, g, nsd_tolerance, spacing)
        m.update(TP=tp, FP=n_pred - tp, FN=n_ref - tp, n_pred=n_pred, n_ref=n_ref)
        out[name] = m
    return out


def mean_metrics(per_case: Sequence[Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """Per-region means over cases (NaN entries left out, as nnU-Net) and `"mean"`: the mean of
    the per-region means (the paper's average over classes)."""
    if not per_case:
        raise ValueError("no cases to average")
    regions = list(per_case[0])
    out: dict[str, dict] = {}
    for r in regions:
        out[r] = {k: _nanmean([case[r][k] for case in per_case]) for k in per_case[0][r]}
    out["mean"] = {k: _nanmean([out[r][k] for r in regions])
                   for k in per_case[0][regions[0]] if k in ("Dice", "HD95", "NSD")}
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def _as_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = generate_binary_structure(mask.ndim, 1)
    return mask & ~binary_erosion(mask, structure=structure, iterations=1)


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    box = []
    for axis in range(mask.ndim):
        nonzero = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append(slice(max(nonzero[0] - 1, 0), min(nonzero[-1] + 2, mask.shape[axis])))
    return tuple(box)
