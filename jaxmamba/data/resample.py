"""Resampling to a target spacing by nnU-Net 2.8's rules, with scipy only.

The rules are those of nnunetv2 2.8's `resample_data_or_seg_to_shape`
(`nnunetv2/preprocessing/resampling/default_resampling.py`) and batchgenerators 0.25.5's
`resize_segmentation` (`batchgenerators/augmentations/utils.py`), computed as they compute them:

- A volume is resized as `skimage.transform.resize(x, shape, order, mode="edge",
  anti_aliasing=False)` in float64: scipy's `ndimage.zoom` with pixel areas aligned
  (`grid_mode=True`, edge values repeated), then clipped to the input's range (skimage's
  `clip=True`, which is what keeps cubic overshoot out).
- Images: order 3 per channel. Label maps (`resize_segmentation`, order 1): each label's
  indicator is resized and every voxel takes the label of the largest score, the smallest label
  on an exact tie, unless the nearest-neighbour label is among the tied (then it wins).
- When the old or the new spacing is anisotropic (largest / smallest > 3, the old one first) and
  one axis alone is the coarsest, that axis is resampled separately: every slice across it is
  resized in 2-D as above, then the axis itself with `order_z` at the sample points
  `(i + 0.5) · old / new − 0.5` (edge values repeated; order 0 = nearest slice).

`tests/test_oracle_nnunet.py` checks these against nnunetv2 and batchgenerators themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0

Resize = Callable[[np.ndarray, Sequence[int], int], np.ndarray]


def new_shape(shape: Sequence[int], spacing: Sequence[float],
              target: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling from `spacing` to `target` (nnU-Net rounds)."""
    return tuple(int(round(sp / t * s)) for s, sp, t in zip(shape, spacing, target, strict=True))


def separate_z_axis(spacing: Sequence[float], target: Sequence[float],
                    force: bool | None = None) -> int | None:
    """The axis to resample separately, or None (nnU-Net's `determine_do_sep_z_and_axis`)."""
    if force is False:
        return None

    def lowres_axis(sp):
        sp = np.asarray(sp)
        axes = np.flatnonzero(sp == sp.max())
        return int(axes[0]) if len(axes) == 1 else None

    if force:
        return lowres_axis(spacing)
    for sp in (spacing, target):
        if max(sp) / min(sp) > ANISO_THRESHOLD:
            return lowres_axis(sp)
    return None


# ---------------------------------------------------------------------- one array
def resize(x: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """`skimage.transform.resize(x, shape, order, mode="edge", anti_aliasing=False)` for float64
    `x`: `ndimage.zoom` on aligned pixel areas, clipped to `[x.min(), x.max()]`."""
    factors = [1 / (i / o) for i, o in zip(x.shape, shape, strict=True)]
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, x.min(), x.max(), out=out)


def resize_labels(seg: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """batchgenerators' `resize_segmentation(seg, shape, order)` (float64 label values): the
    per-voxel argmax of the labels' resized indicators, exact ties to the nearest-neighbour
    label when it is tied, else to the smallest."""
    if seg.size == 0:
        return np.zeros(shape, seg.dtype)
    if order == 0:
        return resize(seg, shape, 0)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(shape, labels[0], seg.dtype)
    nearest = np.searchsorted(labels, resize(seg, shape, 0))
    best = win = at_nearest = None
    for i, value in enumerate(labels):
        score = resize((seg == value).astype(np.float64), shape, order)
        if best is None:
            best, win = score, np.zeros(score.shape, np.intp)
            at_nearest = np.full(score.shape, -np.inf)
        else:
            np.copyto(win, i, where=score > best)  # strict: the first maximum stays
            np.maximum(best, score, out=best)
        np.copyto(at_nearest, score, where=nearest == i)
    tied = (at_nearest == best) & (best > 0)
    return labels[np.where(tied, nearest, win)]


def _along_axis(x: np.ndarray, axis: int, size: int, order: int, is_seg: bool) -> np.ndarray:
    """nnU-Net's out-of-plane step: `axis` of `x` to `size` by `map_coordinates` at
    `(i + 0.5) · x.shape[axis] / size − 0.5`, edge values repeated. Labels at `order > 0`:
    ascending label order, each written where its rounded indicator exceeds 0.5."""
    coords = x.shape[axis] / size * (np.arange(size) + 0.5) - 0.5
    if order == 0:  # one index per output slice: the slices scipy's nearest sampling picks
        index = ndimage.map_coordinates(np.arange(x.shape[axis], dtype=np.float64), [coords],
                                        order=0, mode="nearest").astype(np.intp)
        return np.take(x, index, axis=axis)
    grid = [np.arange(n, dtype=np.float64) for n in x.shape]
    grid[axis] = coords
    points = np.stack(np.meshgrid(*grid, indexing="ij"))
    if not is_seg:
        return ndimage.map_coordinates(x, points, order=order, mode="nearest")
    out = np.zeros(points.shape[1:], x.dtype)
    for value in np.unique(x):
        score = ndimage.map_coordinates((x == value).astype(np.float64), points, order=order,
                                        mode="nearest")
        out[np.round(score) > 0.5] = value
    return out


def _resample(x: np.ndarray, shape: Sequence[int], order: int, z_axis: int | None,
              order_z: int, fn: Resize, is_seg: bool) -> np.ndarray:
    """One channel (float64): in 3-D, or per slice across `z_axis` and then along it."""
    if z_axis is None:
        return fn(x, shape, order)
    in_plane = [s for a, s in enumerate(shape) if a != z_axis]
    y = np.stack([fn(np.take(x, i, axis=z_axis), in_plane, order)
                  for i in range(x.shape[z_axis])], axis=z_axis)
    if y.shape[z_axis] == shape[z_axis]:
        return y
    return _along_axis(y, z_axis, shape[z_axis], order_z, is_seg)


# ---------------------------------------------------------------------- public API
def resample_image(data: np.ndarray, out_shape: Sequence[int], *, order: int = 3,
                   z_axis: int | None = None, order_z: int = 0) -> np.ndarray:
    """Resample `data (C, S0, S1, S2)` to `(C, *out_shape)` float32, channel by channel, in
    float64 (nnU-Net's `resample_data_or_seg(..., is_seg=False)`); same shape: a copy."""
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(data.shape[1:]) == out_shape:
        return data.astype(np.float32)
    out = np.empty((data.shape[0], *out_shape), np.float32)
    for c in range(data.shape[0]):
        out[c] = _resample(data[c].astype(np.float64), out_shape, order, z_axis, order_z,
                           resize, is_seg=False)
    return out


def resample_labels(seg: np.ndarray, out_shape: Sequence[int], *, order: int = 1,
                    z_axis: int | None = None, order_z: int = 0) -> np.ndarray:
    """Resample a label map `(S0, S1, S2)` (ints, -1 = outside the crop mask included) to
    `out_shape`, keeping its dtype (nnU-Net's `resample_data_or_seg(..., is_seg=True)`)."""
    out_shape = tuple(int(s) for s in out_shape)
    if tuple(seg.shape) == out_shape:
        return seg.copy()
    out = _resample(seg.astype(np.float64), out_shape, order, z_axis, order_z, resize_labels,
                    is_seg=True)
    return out.astype(seg.dtype)
