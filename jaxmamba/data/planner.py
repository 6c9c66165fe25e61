"""Experiment planning: a `3d_fullres` `Plan` from a dataset fingerprint (nnU-Net's planner rules).

- Target spacing: the median spacing; if one axis is > 3x coarser than the others in spacing and
  has < 1/3 of their voxels, it gets the 10th percentile of its spacings instead.
- Normalisation: by channel name (`normalize.scheme_for_channel`); z-score uses the non-zero mask
  when cropping to non-zero shrank the median case below 3/4 of its size.
- Topology: pool every axis whose spacing is within 2x of the finest until its feature map would
  fall below 4 voxels; kernels become 3 once an axis' spacing is within 2x of the finest.
- Patch: isotropic-in-mm start of 256^3 voxels, capped at the median shape, padded to the total
  stride, then shrunk along the axis largest relative to the median shape until the activation
  estimate fits the memory budget; batch size fills the rest (at least 2, at most 5 % of the
  dataset's voxels per batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmamba.console import progress_enabled
from jaxmamba.data.normalize import scheme_for_channel
from jaxmamba.data.resample import ANISO_THRESHOLD
from jaxmamba.plans import Plan

MIN_FEATURE_MAP = 4
BASE_FEATURES, MAX_FEATURES = 32, 320
#: `activation_estimate` of the largest of the three reference plans (BraTS, ACDC, Synapse,
#: `reference/plans/`) at their batch size 2. nnU-Net planned all three for its 8 GB budget, so
#: this value is what 8 GB buys; `tests/test_data_planner.py` recomputes it from those files.
REFERENCE_ESTIMATE_8GB = 5_144_515_200
REFERENCE_BATCH = 2


def target_spacing(spacings: Sequence[Sequence[float]],
                   shapes: Sequence[Sequence[int]]) -> tuple[float, ...]:
    """Median spacing with nnU-Net's anisotropy exception (10th percentile on the coarse axis)."""
    spacings, shapes = np.asarray(spacings, float), np.asarray(shapes, float)
    target = np.percentile(spacings, 50, axis=0)
    target_size = np.percentile(shapes, 50, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISO_THRESHOLD * max(target[others])
    aniso_voxels = target_size[worst] * ANISO_THRESHOLD < min(target_size[others])
    if aniso_spacing and aniso_voxels:
        value = np.percentile(spacings[:, worst], 10)
        target[worst] = max(value, max(target[others]) + 1e-5)
    return tuple(float(t) for t in target)


def topology(spacing: Sequence[float], patch: Sequence[int]
             ) -> tuple[list[list[int]], list[list[int]], tuple[int, ...]]:
    """`(strides per stage, kernel sizes per stage, patch padded to the total stride)`."""
    nd = len(spacing)
    sp, size = list(map(float, spacing)), list(map(float, patch))
    strides, kernels, kernel = [[1] * nd], [], [1] * nd
    while True:
        axes = [a for a in range(nd) if size[a] >= 2 * MIN_FEATURE_MAP]
        if axes:
            finest = min(sp[a] for a in axes)
            axes = [a for a in axes if sp[a] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * MIN_FEATURE_MAP:
            break
        if not axes:
            break
        kernel = [3 if k == 3 or sp[a] / min(sp) < 2 else 1 for a, k in enumerate(kernel)]
        stride = [2 if a in axes else 1 for a in range(nd)]
        for a in axes:
            sp[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
        kernels.append(list(kernel))
    kernels.append([3] * nd)
    total = [math.prod(s[a] for s in strides) for a in range(nd)]
    padded = tuple(int(math.ceil(p / t) * t) for p, t in zip(patch, total, strict=True))
    return strides, kernels, padded


def activation_estimate(patch: Sequence[int], strides: Sequence[Sequence[int]], num_classes: int,
                        batch_size: int, n_blocks: int = 2) -> int:
    """Activation elements of the residual U-Net for one step: per stage conv/norm/act outputs of
    each block (encoder and decoder), the upsampled and concatenated maps and the heads."""
    total, shape = 0, list(patch)
    n = len(strides)
    for s, stride in enumerate(strides):
        shape = [math.ceil(x / st) for x, st in zip(shape, stride, strict=True)]
        vox, feat = math.prod(shape), min(BASE_FEATURES * 2**s, MAX_FEATURES)
        total += 3 * 2 * n_blocks * vox * feat  # encoder block: 2 convs, each conv + norm + act
        if s < n - 1:
            total += (3 + 3 * 2 * n_blocks) * vox * feat + num_classes * vox  # decoder + head
    return total * batch_size


def plan_from_fingerprint(fingerprint: dict, dataset_meta: dict, *, name: str = "dataset",
                          memory_gb: float = 8.0) -> Plan:
    """Plan `3d_fullres` for `fingerprint` (see `fingerprint.extract_fingerprint`)."""
    spacing = target_spacing(fingerprint["spacings"], fingerprint["shapes_after_crop"])
    shapes = np.asarray(fingerprint["shapes_after_crop"], float)
    resampled = shapes * np.asarray(fingerprint["spacings"], float) / np.asarray(spacing)
    median_shape = np.median(resampled, axis=0)
    labels = sorted(((str(k), int(v)) for k, v in dataset_meta["labels"].items()),
                    key=lambda x: x[1])
    channels = dataset_meta["channel_names"]
    channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    schemes = tuple(scheme_for_channel(c) for c in channel_names)
    use_mask = tuple(s == "ZScoreNormalization" and
                     fingerprint["median_relative_size_after_cropping"] < 0.75 for s in schemes)

    inv = 1.0 / np.asarray(spacing)
    start = inv * (256**3 / np.prod(inv)) ** (1 / 3)
    patch = [int(min(round(p), m)) for p, m in zip(start, median_shape, strict=True)]
    strides, kernels, patch = topology(spacing, patch)
    budget = REFERENCE_ESTIMATE_8GB * memory_gb / 8.0
    while activation_estimate(patch, strides, len(labels), REFERENCE_BATCH) > budget:
        ratios = [p / m for p, m in zip(patch, median_shape, strict=True)]
        axis = int(np.argmax(ratios))
        total = [math.prod(s[a] for s in strides) for a in range(3)]
        smaller = list(patch)
        smaller[axis] -= total[axis]
        if smaller[axis] < MIN_FEATURE_MAP:
            raise ValueError(f"{name}: memory budget {memory_gb} GB is too small for any patch")
        strides, kernels, patch = topology(spacing, smaller)
    estimate = activation_estimate(patch, strides, len(labels), REFERENCE_BATCH)
    batch = round(budget / estimate * REFERENCE_BATCH)
    dataset_voxels = float(np.prod(median_shape)) * len(shapes)
    batch = max(2, min(batch, round(dataset_voxels * 0.05 / np.prod(patch))))
    n = len(strides)
    fg = fingerprint["foreground_intensity_properties_per_channel"]
    return Plan(
        dataset_name=name, patch_size=tuple(patch), batch_size=int(batch), spacing=spacing,
        normalization_schemes=schemes, use_mask_for_norm=use_mask,
        strides=tuple(map(tuple, strides)), kernel_sizes=tuple(map(tuple, kernels)),
        n_blocks_encoder=(2,) * n, n_blocks_decoder=(2,) * (n - 1),
        channel_names=channel_names, labels=tuple(labels),
        median_image_size=tuple(float(m) for m in median_shape),
        foreground_intensity_properties=tuple(dict(fg[str(c)]) for c in range(len(channels))),
        file_ending=str(dataset_meta.get("file_ending", ".nii.gz")), source=f"planner:{name}")


def explain_plan(plan: Plan, fingerprint: dict, memory_gb: float = 8.0) -> list[str]:
    """Human-readable reasons for each choice of `plan_from_fingerprint`."""
    median_sp = np.median(np.asarray(fingerprint["spacings"], float), axis=0)
    n = len(fingerprint["spacings"])
    lines = [f"spacing {_fmt(plan.spacing)} mm: median of {n} cases ({_fmt(median_sp)})"
             + ("" if np.allclose(median_sp, plan.spacing) else
                "; the coarse axis takes its 10th percentile (nnU-Net's anisotropy rule)")]
    inv = 1.0 / np.asarray(plan.spacing)
    start = inv * (256**3 / np.prod(inv)) ** (1 / 3)
    wanted = np.minimum(np.round(start), plan.median_image_size)
    limited = "median shape" if (wanted < np.round(start)).any() else "256^3-voxel start"
    lines.append(f"patch {list(plan.patch_size)}: {limited} {_fmt(wanted, 0)} at that spacing "
                 f"(median case {_fmt(plan.median_image_size, 1)}), padded to the total stride "
                 f"{list(plan.total_stride)}"
                 + (", then shrunk to fit the memory budget"
                    if (np.asarray(plan.patch_size) < wanted).any() else ""))
    est = activation_estimate(plan.patch_size, plan.strides, plan.num_classes, REFERENCE_BATCH)
    by_memory = round(REFERENCE_ESTIMATE_8GB * memory_gb / 8.0 / est * REFERENCE_BATCH)
    lines.append(f"batch {plan.batch_size}: memory ({memory_gb:g} GB) allows {by_memory}, at most "
                 f"5 % of the dataset's voxels per batch, at least 2")
    rel = fingerprint["median_relative_size_after_cropping"]
    for name, scheme, mask in zip(plan.channel_names, plan.normalization_schemes,
                                  plan.use_mask_for_norm, strict=True):
        why = ("channel name 'CT': dataset-wide foreground percentiles and mean/std"
               if scheme == "CTNormalization" else
               f"per case; {'inside' if mask else 'over'} the "
               f"{'non-zero mask' if mask else 'whole image'} because cropping kept "
               f"{100 * rel:.0f} % of the median case ({'<' if mask else '>='} 75 %)")
        lines.append(f"channel {name!r}: {scheme}, {why}")
    return lines


def _fmt(values, digits: int = 3) -> list:
    return [round(float(v), digits) if digits else int(v) for v in values]


# ---------------------------------------------------------------------- `jaxmamba plan`
def default_output(dataset: str | Path) -> Path:
    """Where `plan` and `preprocess` write by default: `<dataset>_preprocessed` beside the raw
    folder (the training config's default `data.preprocessed_dir` too)."""
    raw = Path(dataset).resolve()
    return raw.with_name(raw.name + "_preprocessed")


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="nnU-Net raw dataset folder")
    parser.add_argument("-o", "--output", help="output folder for nnUNetPlans.json, dataset.json "
                        "and dataset_fingerprint.json (default: <dataset>_preprocessed beside it)")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="GPU memory budget for patch and batch size, as nnU-Net's (default 8)")
    parser.add_argument("-j", "--workers", type=int, default=0,
                        help="processes for the fingerprint (default 0: in this process)")


def run(args) -> int:
    from jaxmamba.data.dataset import RawDataset
    from jaxmamba.data.fingerprint import extract_fingerprint, fingerprint_path
    from jaxmamba.data.io import write_json

    out = Path(args.output) if args.output else default_output(args.dataset)
    ds = RawDataset.open(args.dataset)
    fp = extract_fingerprint(ds, num_workers=args.workers, progress=progress_enabled())
    write_json(fingerprint_path(out), fp)
    plan = plan_from_fingerprint(fp, ds.meta, name=Path(args.dataset).resolve().name,
                                 memory_gb=args.memory_gb)
    plan.save(out / "nnUNetPlans.json")
    print(f"plan: {plan.num_stages} stages, strides {[list(s) for s in plan.strides]}")
    for line in explain_plan(plan, fp, args.memory_gb):
        print(f"  {line}")
    print(f"wrote {out / 'nnUNetPlans.json'}. Next: `jaxmamba preprocess {args.dataset} -o {out}`.")
    return 0
