"""Voxel spacings that preprocessing can use: finite, positive, and a resampled size in bounds.

A NIfTI file's pixdim is the voxel spacing in mm. NaN, 0 or a negative value cannot be resampled
at all; a valid number far off the dataset's spacing (1000 mm, 1e-6 mm on a 1 mm dataset: a typo
in a header, a file in metres or microns) resamples to a volume of no voxels (nnU-Net then
divides by zero) or of more than memory holds. `spacing_problem` refuses the first kind wherever
a file is opened, `resampled_problem` the second where the target spacing is known (the plan's,
when preprocessing or predicting a case; the dataset's median, which is what the plan's target
will be, in `jaxmamba check`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxmamba.data.resample import new_shape

#: Most voxels a case may have once resampled, per channel (2**31: 8 GiB of float32, beyond
#: every scan nnU-Net plans for; int32 indices still reach every voxel)
MAX_VOXELS = 2**31


def spacing_problem(spacing: Sequence[float]) -> str | None:
    """Why `spacing` (mm per voxel, one per axis) cannot be used, or None."""
    if not all(math.isfinite(s) and s > 0 for s in spacing):
        return (f"voxel spacing {[float(s) for s in spacing]} (the header's pixdim): each must "
                f"be a finite number of mm > 0")
    return None


def resampled_problem(shape: Sequence[int], spacing: Sequence[float],
                      target: Sequence[float], target_name: str) -> str | None:
    """Why a volume of `shape` at `spacing` cannot be resampled to `target` (named
    `target_name`, e.g. "the plan's spacing"), or None: every axis needs at least one voxel
    and the volume at most `MAX_VOXELS`."""
    problem = spacing_problem(spacing)
    if problem:
        return problem
    size = new_shape(shape, spacing, target)
    voxels = math.prod(size)
    if min(size) >= 1 and voxels <= MAX_VOXELS:
        return None
    return (f"voxel spacing {[round(float(s), 6) for s in spacing]} mm is far from "
            f"{target_name} {[round(float(t), 6) for t in target]}: resampled, its "
            f"{list(shape)} voxels would become {list(size)} ({voxels:.3g} voxels); expected at "
            f"least 1 per axis and at most {MAX_VOXELS:.3g} (2**31). Check the file's header "
            f"(pixdim), e.g. a spacing in m or µm instead of mm")
