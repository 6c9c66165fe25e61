"""Synthetic phantoms for tests: an nnU-Net raw folder of shapes with labels, anisotropic spacing.

Each case is a noisy ellipsoidal "body" on a zero background (so cropping to non-zero matters)
holding an ellipsoid (label 1) and a box (label 2) of distinct mean intensities; sizes and
positions vary per case. Spacing defaults to 3 x 1 x 1 mm (z, y, x). Not a benchmark.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np


def phantom_case(rng: np.random.Generator, shape: Sequence[int], n_channels: int = 1
                 ) -> tuple[np.ndarray, np.ndarray]:
    """`(image (C, S0, S1, S2) float32, labels (S0, S1, S2) uint8)` in nnU-Net axis order."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.85**2
    centre = rng.uniform(-0.3, 0.3, 3)
    radii = rng.uniform(0.2, 0.35, 3)
    c, r = centre[:, None, None, None], radii[:, None, None, None]
    ellipsoid = (((grid - c) / r) ** 2).sum(0) < 1
    lo = rng.uniform(-0.5, 0.1, 3)
    hi = lo + rng.uniform(0.2, 0.35, 3)
    box = np.all((grid >= lo[:, None, None, None]) & (grid <= hi[:, None, None, None]), axis=0)
    labels = np.zeros(shape, np.uint8)
    labels[ellipsoid & body] = 1
    labels[box & body & ~ellipsoid] = 2
    means = np.array([0.0, 200.0, 50.0])
    image = np.empty((n_channels, *shape), np.float32)
    for c in range(n_channels):
        image[c] = (100.0 + means[labels] * (c + 1) + rng.normal(0, 10, shape)) * body
    return image, labels


def make_phantom_dataset(root: str | Path, *, n_cases: int = 6, shape: Sequence[int] = (12, 40, 36),
                         spacing: Sequence[float] = (3.0, 1.0, 1.0), channel_names: Sequence[str]
                         = ("MRI",), seed: int = 0, name: str = "Dataset999_Phantom") -> Path:
    """Write an nnU-Net raw folder of `n_cases` phantoms (shapes vary by ±2 voxels per axis)."""
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    affine = np.diag([*map(float, spacing[::-1]), 1.0])
    affine[:3, 3] = [-10.0, 20.0, 5.0]
    for i in range(n_cases):
        case_shape = [int(s + rng.integers(-2, 3)) for s in shape]
        image, labels = phantom_case(rng, case_shape, len(channel_names))
        case = f"phantom_{i:03d}"
        for c in range(len(channel_names)):
            nib.save(nib.Nifti1Image(image[c].transpose(2, 1, 0), affine),
                     root / "imagesTr" / f"{case}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(labels.transpose(2, 1, 0), affine),
                 root / "labelsTr" / f"{case}.nii.gz")
    meta = {"name": name, "channel_names": {str(i): n for i, n in enumerate(channel_names)},
            "labels": {"background": 0, "ellipsoid": 1, "box": 2}, "numTraining": n_cases,
            "file_ending": ".nii.gz"}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root
