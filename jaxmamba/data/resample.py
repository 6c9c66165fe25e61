"""Resampling to a target spacing, nnU-Net's way (ecosystem.md §2.1 "Resampling").

Images: cubic spline (order 3). Label maps: each label's indicator interpolated linearly (order 1)
and thresholded at 0.5, in label order. When the old or the new spacing is anisotropic (largest /
smallest > 3) the out-of-plane axis is resampled separately with `order_z` (0: nearest). Pixel
centres are aligned (scipy `grid_mode=True`, edge values repeated), as skimage `resize` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

ANISO_THRESHOLD = 3.0


def new_shape(shape: Sequence[int], spacing: Sequence[float],
              target: Sequence[float]) -> tuple[int, ...]:
    """Shape after resampling from `spacing` to `target` (nnU-Net rounds)."""
    return tuple(int(round(sp / t * s)) for s, sp, t in zip(shape, spacing, target, strict=True))


def separate_z_axis(spacing: Sequence[float], target: Sequence[float],
                    force: bool | None = None) -> int | None:
    """The axis to resample separately, or None (nnU-Net's `get_do_separate_z` rule)."""
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


def _zoom(x: np.ndarray, out_shape: Sequence[int], order: int) -> np.ndarray:
    factors = [o / i for o, i in zip(out_shape, x.shape, strict=True)]
    if all(f == 1 for f in factors):
        return x.copy()
    return ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True,
                        prefilter=order > 1)


def _resize(x: np.ndarray, out_shape: Sequence[int], order: int, z_axis: int | None,
            order_z: int) -> np.ndarray:
    if z_axis is None:
        return _zoom(x, out_shape, order)
    in_plane = list(x.shape)
    for a in range(3):
        if a != z_axis:
            in_plane[a] = out_shape[a]
    return _zoom(_zoom(x, in_plane, order), out_shape, order_z)


def resample_image(data: np.ndarray, out_shape: Sequence[int], *, order: int = 3,
                   z_axis: int | None = None, order_z: int = 0) -> np.ndarray:
    """Resample `data (C, S0, S1, S2)` float to `(C, *out_shape)` channel by channel."""
    out = np.empty((data.shape[0], *out_shape), np.float32)
    for c in range(data.shape[0]):
        out[c] = _resize(data[c].astype(np.float32), out_shape, order, z_axis, order_z)
    return out


def resample_labels(seg: np.ndarray, out_shape: Sequence[int], *, order: int = 1,
                    z_axis: int | None = None, order_z: int = 0) -> np.ndarray:
    """Resample a label map `(S0, S1, S2)` int to `out_shape` via per-label indicators."""
    if tuple(seg.shape) == tuple(out_shape):
        return seg.copy()
    out = np.zeros(out_shape, seg.dtype)
    for value in np.unique(seg):
        if value == 0:
            continue
        mask = _resize((seg == value).astype(np.float32), out_shape, order, z_axis, order_z)
        out[mask >= 0.5] = value
    return out
