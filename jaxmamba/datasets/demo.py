"""The offline real-MRI demo dataset: MNI152 2009a T1 with a 4-class tissue map, cut into blocks.

Source: the ICBM 2009a symmetric T1 template, grey- and white-matter probability maps and brain
mask that `nilearn` ships inside its wheel (read with `nilearn.datasets.load_mni152_*`, 2 mm,
99x117x95; nothing is downloaded). Labels: 0 background, 1 CSF / other brain (inside the brain
mask), 2 grey matter (GM >= WM and GM > 0.5), 3 white matter (WM > GM and WM > 0.5).

Held-out split. The brain's bounding box is cut into blocks of `block` voxels (24 = 48 mm). A block
with indices (i, j, k) along (x, y, z) goes to training (`imagesTr`) if `j + k` is even and to the
held-out test set (`imagesTs`, `labelsTs`) otherwise, like a checkerboard in the sagittal plane.
Blocks never overlap, so no test voxel is ever an input or a target in training. The colour does
not depend on the left-right index `i` on purpose: the template is exactly left-right symmetric,
so a hemisphere split (or a checkerboard over `i`) would put the mirror image of every test voxel
in the training set, and mirroring augmentation would show it to the network. Blocks with less
than 15 % brain are dropped. Score the trained network on `imagesTs` against `labelsTs`; the
5-fold splits that preprocessing writes are over training blocks (adjacent blocks share faces)
and serve only nnU-Net's online validation. Labels are template-quality (thresholded probability
maps), and all blocks come from one brain, so this is a pipeline and learning check, not a
clinical benchmark.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import nibabel as nib
import numpy as np

LABELS = {"background": 0, "CSF/other brain": 1, "grey matter": 2, "white matter": 3}


def _load_templates(resolution: int):
    try:
        from nilearn import datasets
    except ImportError as err:
        raise ImportError("the demo dataset needs nilearn: pip install -e '.[demo]'") from err
    t1 = datasets.load_mni152_template(resolution=resolution)
    gm = datasets.load_mni152_gm_template(resolution=resolution).get_fdata()
    wm = datasets.load_mni152_wm_template(resolution=resolution).get_fdata()
    brain = datasets.load_mni152_brain_mask(resolution=resolution).get_fdata() > 0
    return t1, gm, wm, brain


def tissue_labels(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """4-class map from GM/WM probabilities and the brain mask (values as `LABELS`)."""
    labels = np.zeros(gm.shape, np.uint8)
    labels[brain] = 1
    labels[brain & (gm >= wm) & (gm > 0.5)] = 2
    labels[brain & (wm > gm) & (wm > 0.5)] = 3
    return labels


def build_demo(root: str | Path, *, block: int = 24, resolution: int = 2,
               min_brain: float = 0.15) -> Path:
    """Write the demo as an nnU-Net raw folder at `root` (see the module docstring)."""
    root = Path(root)
    t1, gm, wm, brain = _load_templates(resolution)
    image = np.asarray(t1.get_fdata(), np.float32)
    labels = tissue_labels(gm, wm, brain)
    lo = [int(np.flatnonzero(brain.any(axis=tuple(b for b in range(3) if b != a)))[0])
          for a in range(3)]
    hi = [int(np.flatnonzero(brain.any(axis=tuple(b for b in range(3) if b != a)))[-1]) + 1
          for a in range(3)]
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    counts = {"Tr": 0, "Ts": 0}
    starts = [range(lo[a], hi[a], block) for a in range(3)]
    for (i, x0), (j, y0), (k, z0) in itertools.product(*(enumerate(s) for s in starts)):
        box = tuple(slice(s, min(s + block, h)) for s, h in zip((x0, y0, z0), hi, strict=True))
        if brain[box].mean() < min_brain:
            continue
        split = "Tr" if (j + k) % 2 == 0 else "Ts"
        case = f"mni_{split.lower()}_{i}{j}{k}"
        affine = t1.affine.copy()
        affine[:3, 3] = t1.affine[:3, :3] @ np.array([x0, y0, z0]) + t1.affine[:3, 3]
        nib.save(nib.Nifti1Image(image[box], affine), root / f"images{split}/{case}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels[box], affine), root / f"labels{split}/{case}.nii.gz")
        counts[split] += 1
    meta = {
        "name": "MNI152Tissue",
        "description": "ICBM 2009a sym T1 (nilearn) with a 4-class tissue map, cut into "
                       f"{block}-voxel blocks; training and test blocks alternate like a "
                       "checkerboard in the sagittal plane (see jaxmamba.datasets.demo)",
        "reference": "Fonov et al., NeuroImage 2011 (ICBM 2009a); nilearn",
        "tensorImageSize": "3D",
        "channel_names": {"0": "T1"},
        "labels": LABELS,
        "numTraining": counts["Tr"],
        "numTest": counts["Ts"],
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=1) + "\n")
    return root
