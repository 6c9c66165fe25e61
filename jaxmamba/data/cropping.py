"""Crop to the non-zero region, as nnU-Net does before anything else (`crop_to_nonzero`)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_mask(data: np.ndarray) -> np.ndarray:
    """`(S0, S1, S2)` bool: non-zero in any channel of `data (C, S0, S1, S2)`, holes filled."""
    return ndimage.binary_fill_holes((data != 0).any(axis=0))


def bbox_of(mask: np.ndarray) -> list[list[int]]:
    """`[[lo, hi), ...]` per axis of the True region; the whole array if it is empty."""
    if not mask.any():
        return [[0, s] for s in mask.shape]
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        box.append([int(idx[0]), int(idx[-1]) + 1])
    return box


def crop(x: np.ndarray, bbox: list[list[int]]) -> np.ndarray:
    """Crop the last 3 axes of `x` to `bbox`."""
    return x[(..., *(slice(lo, hi) for lo, hi in bbox))]


def crop_to_nonzero(data: np.ndarray, seg: np.ndarray | None
                    ) -> tuple[np.ndarray, np.ndarray | None, list[list[int]], np.ndarray]:
    """Crop `data (C, S0, S1, S2)` and `seg (S0, S1, S2)` to the non-zero bounding box.

    Returns `(data, seg, bbox, mask)`; in `seg`, background outside the non-zero mask becomes -1
    (nnU-Net's convention, used by the mask transform and removed before the loss).
    """
    mask = nonzero_mask(data)
    box = bbox_of(mask)
    data, mask = crop(data, box), crop(mask, box)
    if seg is not None:
        seg = crop(seg, box).copy()
        seg[(seg == 0) & ~mask] = -1
    return data, seg, box, mask
