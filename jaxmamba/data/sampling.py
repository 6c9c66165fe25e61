"""Patch sampling with nnU-Net's foreground oversampling (nnunetv2 `nnUNetDataLoader`).

A sample at position `j` of a batch of `B` is forced to contain foreground iff
`j >= round(B · (1 - 0.33))` (with B = 2, exactly the second sample). A forced sample picks a label
uniformly among those present in the case, then one of its stored voxels, and puts it at the
patch centre; other samples draw the patch corner uniformly. Patches may reach past the image by
half of `initial - final` (so that border voxels can be at the centre of the final patch); the
outside is padded with 0 (image) and -1 (labels).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

OVERSAMPLE_FOREGROUND = 0.33


def is_forced_foreground(position: int, batch_size: int,
                         oversample: float = OVERSAMPLE_FOREGROUND) -> bool:
    """nnU-Net's `_oversample_last_XX_percent`: the last samples of each batch are forced."""
    return position >= round(batch_size * (1 - oversample))


def patch_corner(shape: Sequence[int], patch: Sequence[int], final_patch: Sequence[int],
                 rng: np.random.Generator, centre: Sequence[int] | None = None) -> list[int]:
    """Lower corner of a patch of size `patch` in an image of `shape` (may be negative)."""
    need = [max(p - f, 0) for p, f in zip(patch, final_patch, strict=True)]
    need = [max(n, p - s) for n, p, s in zip(need, patch, shape, strict=True)]
    lo = [-(n // 2) for n in need]
    hi = [s + n // 2 + n % 2 - p for s, n, p in zip(shape, need, patch, strict=True)]
    if centre is None:
        return [int(rng.integers(a, b + 1)) for a, b in zip(lo, hi, strict=True)]
    return [max(a, int(c) - p // 2) for a, c, p in zip(lo, centre, patch, strict=True)]


def foreground_voxel(fg_rows: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A random stored voxel `(i0, i1, i2)` of a label drawn uniformly among those present."""
    if len(fg_rows) == 0:
        return None
    labels = np.unique(fg_rows[:, 0])
    label = labels[rng.integers(len(labels))]
    rows = np.flatnonzero(fg_rows[:, 0] == label)
    return fg_rows[rows[rng.integers(len(rows))], 1:]


def extract(array: np.ndarray, corner: Sequence[int], patch: Sequence[int], fill) -> np.ndarray:
    """`array[..., corner : corner + patch]` over the last 3 axes, padded with `fill` outside."""
    shape = array.shape[-3:]
    src = tuple(slice(max(c, 0), min(c + p, s)) for c, p, s in zip(corner, patch, shape,
                                                                    strict=True))
    dst = tuple(slice(s.start - c, s.stop - c) for s, c in zip(src, corner, strict=True))
    out = np.full((*array.shape[:-3], *patch), fill, array.dtype)
    out[(..., *dst)] = array[(..., *src)]
    return out


def sample_patch(data: np.ndarray, seg: np.ndarray, fg_rows: np.ndarray, patch: Sequence[int],
                 final_patch: Sequence[int], rng: np.random.Generator, force_foreground: bool
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`(data (C, *patch) float32, seg (*patch))` from a cached case (memory-mapped is fine)."""
    centre = foreground_voxel(fg_rows, rng) if force_foreground else None
    corner = patch_corner(seg.shape, patch, final_patch, rng, centre)
    return (extract(data, corner, patch, 0).astype(np.float32, copy=False),
            extract(seg, corner, patch, -1))
