"""Experiment planning: a `3d_fullres` `Plan` from a dataset fingerprint, by nnU-Net 2.8's rules.

The planners are nnU-Net 2.8.1's `ExperimentPlanner` (the default, `nnUNetPlans`,
PlainConvUNet) and `nnUNetPlannerResEncM` / `L` / `XL` (ResidualEncoderUNet), re-implemented here
(no torch needed) from `nnunetv2/experiment_planning/experiment_planners/`:

- Target spacing: the median spacing; if one axis is > 3x coarser than the others in spacing and
  has < 1/3 of their voxels, it gets the 10th percentile of its spacings instead (at least the
  others' largest spacing + 1e-5).
- Normalisation: by channel name (`normalize.scheme_for_channel`); z-score uses the non-zero mask
  when cropping to non-zero shrank the median case below 3/4 of its size.
- Topology (`get_pool_and_conv_props`): pool every axis whose spacing is within 2x of the finest
  until its feature map would fall below 4 voxels; kernels become 3 once an axis' spacing is
  within 2x of the finest; the patch is padded to the total stride.
- Patch: isotropic-in-mm start of 256^3 voxels, capped at the median shape, then shrunk along the
  axis largest relative to the median shape until the network's activation size (dynamic-network-
  architectures' `compute_conv_feature_map_size`, `feature_map_size` here) is at most the
  planner's reference value for its memory target; the batch size fills the rest (at least 2, at
  most 5 % of the dataset's voxels for the default planner, 100 % for ResEnc).
- `batch_dice` is on when nnU-Net would add a `3d_lowres` configuration (patch < 1/4 of the
  median case, and a lowres shape at least 2x smaller); jaxmamba plans `3d_fullres` only.

nnU-Net moves the coarsest axis first (`transpose_forward`) when it is not axis 0; jaxmamba does
not transpose, so such datasets get the same plan in the untransposed axis order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmamba.data.normalize import scheme_for_channel
from jaxmamba.data.resample import ANISO_THRESHOLD, new_shape
from jaxmamba.nnunet_plans import network_class_path, reader_writer_for
from jaxmamba.plans import Plan, PlanError

MIN_FEATURE_MAP = 4
BASE_FEATURES, MAX_FEATURES = 32, 320
MIN_BATCH = 2
LOWRES_THRESHOLD, LOWRES_SPACING_STEP = 0.25, 1.03


@dataclasses.dataclass(frozen=True)
class Planner:
    """One of nnU-Net's experiment planners (its class attributes of the same meaning)."""

    name: str  # nnU-Net's class name (`experiment_planner_used`)
    plans_name: str
    network_class: str
    reference_value: int  # `UNet_reference_val_3d`: feature-map size that fits `reference_gb`
    reference_gb: float  # `UNet_reference_val_corresp_GB`; also the default memory target
    blocks_encoder: tuple[int, ...]  # per stage; the first `n_stages` are used
    blocks_decoder: tuple[int, ...]
    max_dataset_covered: float  # a batch holds at most this fraction of the dataset's voxels


_RESENC_BLOCKS = ((1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6), (1,) * 12)
PLANNERS: dict[str, Planner] = {p.name: p for p in (
    Planner("ExperimentPlanner", "nnUNetPlans", "PlainConvUNet", 560_000_000, 8,
            (2,) * 14, (2,) * 13, 0.05),
    Planner("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans", "ResidualEncoderUNet",
            680_000_000, 8, *_RESENC_BLOCKS, 1.0),
    Planner("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans", "ResidualEncoderUNet",
            2_100_000_000, 24, *_RESENC_BLOCKS, 1.0),
    Planner("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans", "ResidualEncoderUNet",
            3_600_000_000, 40, *_RESENC_BLOCKS, 1.0),
)}
#: Other names `--planner` accepts (nnU-Net's `-pl` spellings and the plans names).
PLANNER_ALIASES = {"default": "ExperimentPlanner", "nnunetplans": "ExperimentPlanner",
                   "resencm": "nnUNetPlannerResEncM", "resencl": "nnUNetPlannerResEncL",
                   "resencxl": "nnUNetPlannerResEncXL",
                   **{p.plans_name.lower(): p.name for p in PLANNERS.values()},
                   **{p.name.lower(): p.name for p in PLANNERS.values()}}


def get_planner(name: str) -> Planner:
    """A planner by nnU-Net class name, plans name or short name (`default`, `resencm`, ...)."""
    key = PLANNER_ALIASES.get(name.lower().replace("-", ""))
    if key is None:
        raise PlanError(f"unknown planner {name!r}; expected one of {', '.join(PLANNERS)} "
                         f"(or default, resencm, resencl, resencxl)")
    return PLANNERS[key]


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
        if value < max(target[others]):
            value = max(target[others]) + 1e-5
        target[worst] = value
    return tuple(float(t) for t in target)


def topology(spacing: Sequence[float], patch: Sequence[float]
             ) -> tuple[list[list[int]], list[list[int]], tuple[int, ...]]:
    """`(strides per stage, kernel sizes per stage, patch padded to the total stride)`.

    `patch` may be fractional (a median shape), as in nnU-Net's `get_pool_and_conv_props`."""
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
    # nnU-Net's `pad_shape`: up to the next multiple, then truncated to int
    padded = tuple(int(p if p % t == 0 else p + t - p % t) for p, t in zip(patch, total,
                                                                             strict=True))
    return strides, kernels, padded


def feature_map_size(network_class: str, patch: Sequence[int], strides: Sequence[Sequence[int]],
                     features: Sequence[int], blocks_encoder: Sequence[int],
                     blocks_decoder: Sequence[int], num_classes: int) -> int:
    """dynamic-network-architectures 0.4's `compute_conv_feature_map_size` of `PlainConvUNet` or
    `ResidualEncoderUNet` (deep supervision off, as nnU-Net's planner builds it): the number of
    elements of every convolution output for one sample."""
    residual = network_class_path(network_class).endswith(".ResidualEncoderUNet")
    sizes, shape = [], list(patch)
    for stride in strides:  # the encoder's feature-map shapes, floor division as DNA
        shape = [x // s for x, s in zip(shape, stride, strict=True)]
        sizes.append(math.prod(shape))
    total = features[0] * math.prod(patch) if residual else 0  # the ResEnc stem
    channels_in = features[0]
    for s, (vox, feat, n) in enumerate(zip(sizes, features, blocks_encoder, strict=True)):
        if residual:  # conv1 + conv2 per BasicBlockD, + the first block's projection
            changed = channels_in != feat or any(st != 1 for st in strides[s])
            total += (2 * n + int(changed)) * feat * vox
        else:
            total += n * feat * vox
        channels_in = feat
    for k, n in enumerate(blocks_decoder):  # lowest resolution first
        s = len(strides) - 2 - k
        total += (n + 1) * features[s] * sizes[s]  # convs + transposed conv
    return int(total + num_classes * sizes[0])  # the final segmentation layer


@dataclasses.dataclass(frozen=True)
class _Configuration:
    patch: tuple[int, ...]
    strides: list[list[int]]
    kernels: list[list[int]]
    estimate: int
    batch: int


def _last_argmax(values: Sequence[float]) -> int:
    """`np.argsort(values)[-1]` for short lists: the last of equal maxima."""
    return max(range(len(values)), key=lambda a: (values[a], a))


def _configure(planner: Planner, spacing: Sequence[float], median_shape: Sequence[float],
               n_voxels_dataset: float, num_classes: int, memory_gb: float) -> _Configuration:
    """nnU-Net's `get_plans_for_configuration`: patch, topology and batch size."""
    def estimate(patch, strides):
        n = len(strides)
        features = [min(BASE_FEATURES * 2**s, MAX_FEATURES) for s in range(n)]
        return feature_map_size(planner.network_class, patch, strides, features,
                                planner.blocks_encoder[:n], planner.blocks_decoder[:n - 1],
                                num_classes)

    inv = 1.0 / np.asarray(spacing, float)
    start = [round(float(v)) for v in inv * (256**3 / np.prod(inv)) ** (1 / 3)]
    strides, kernels, patch = topology(spacing, [min(p, float(m)) for p, m in
                                                 zip(start, median_shape, strict=True)])
    reference = planner.reference_value * memory_gb / planner.reference_gb
    est = estimate(patch, strides)
    while est > reference:
        axis = _last_argmax([p / m for p, m in zip(patch, median_shape, strict=True)])
        divisible = [2 ** sum(s[a] > 1 for s in strides) for a in range(3)]
        # nnU-Net subtracts the divisor of the patch one step smaller, so no valid size is skipped
        smaller = list(patch)
        smaller[axis] -= divisible[axis]
        strides_smaller = topology(spacing, smaller)[0]
        smaller = list(patch)
        smaller[axis] -= 2 ** sum(s[axis] > 1 for s in strides_smaller)
        if smaller[axis] < 1:
            raise ValueError(f"memory target {memory_gb:g} GB is too small for any patch")
        strides, kernels, patch = topology(spacing, smaller)
        est = estimate(patch, strides)
    batch = round(reference / est * 2)
    by_coverage = round(n_voxels_dataset * planner.max_dataset_covered
                        / np.prod(patch, dtype=np.float64))
    return _Configuration(patch, strides, kernels, est, max(min(batch, by_coverage), MIN_BATCH))


def _has_lowres(planner: Planner, spacing: Sequence[float], median_shape: np.ndarray,
                fullres_patch: Sequence[int], n_cases: int, num_classes: int,
                memory_gb: float) -> bool:
    """Whether nnU-Net 2.8's `plan_experiment` adds a `3d_lowres` configuration."""
    fullres_spacing = np.asarray(spacing, float)
    lowres = fullres_spacing.copy()
    median_voxels = float(np.prod(median_shape, dtype=np.float64))
    patch_voxels = float(np.prod(fullres_patch, dtype=np.float64))
    while patch_voxels / median_voxels < LOWRES_THRESHOLD:
        coarse = lowres.max() / lowres > 2
        if coarse.any():
            lowres[coarse] *= LOWRES_SPACING_STEP
        else:
            lowres *= LOWRES_SPACING_STEP
        shape = fullres_spacing / lowres * median_shape
        median_voxels = float(np.prod(shape, dtype=np.float64))
        cfg = _configure(planner, lowres, [round(float(v)) for v in shape],
                         median_voxels * n_cases, num_classes, memory_gb)
        patch_voxels = float(np.prod(cfg.patch, dtype=np.float64))
    return float(np.prod(median_shape, dtype=np.float64)) / median_voxels >= 2


def plan_from_fingerprint(fingerprint: dict, dataset_meta: dict, *, name: str = "dataset",
                          planner: str = "ExperimentPlanner",
                          memory_gb: float | None = None) -> Plan:
    """Plan `3d_fullres` for `fingerprint` (see `fingerprint.extract_fingerprint`) as nnU-Net's
    `planner` would; `memory_gb` defaults to the planner's own target (8, 8, 24, 40 GB)."""
    spec = get_planner(planner)
    memory_gb = float(spec.reference_gb if memory_gb is None else memory_gb)
    spacings, shapes = fingerprint["spacings"], fingerprint["shapes_after_crop"]
    spacing = target_spacing(spacings, shapes)
    median_shape = np.median([new_shape(sh, sp, spacing) for sh, sp in zip(shapes, spacings,
                                                                           strict=True)], 0)
    if median_shape[0] == 1:
        raise ValueError(f"{name}: the median case has one slice; nnU-Net plans it 2-D only")
    n_cases = int(dataset_meta.get("numTraining", len(spacings)))
    labels = sorted(((str(k), int(v)) for k, v in dataset_meta["labels"].items()),
                    key=lambda x: x[1])
    channels = dataset_meta["channel_names"]
    channel_names = tuple(str(channels[k]) for k in sorted(channels, key=int))
    schemes = tuple(scheme_for_channel(c) for c in channel_names)
    use_mask = tuple(s == "ZScoreNormalization" and
                     fingerprint["median_relative_size_after_cropping"] < 0.75 for s in schemes)
    n_voxels = float(np.prod(median_shape, dtype=np.float64) * n_cases)
    cfg = _configure(spec, spacing, median_shape, n_voxels, len(labels), memory_gb)
    n = len(cfg.strides)
    fg = fingerprint["foreground_intensity_properties_per_channel"]
    file_ending = str(dataset_meta.get("file_ending", ".nii.gz"))
    return Plan(
        dataset_name=name, patch_size=cfg.patch, batch_size=int(cfg.batch), spacing=spacing,
        normalization_schemes=schemes, use_mask_for_norm=use_mask,
        strides=tuple(map(tuple, cfg.strides)), kernel_sizes=tuple(map(tuple, cfg.kernels)),
        n_blocks_encoder=spec.blocks_encoder[:n], n_blocks_decoder=spec.blocks_decoder[:n - 1],
        channel_names=channel_names, labels=tuple(labels),
        batch_dice=_has_lowres(spec, spacing, median_shape, cfg.patch, n_cases, len(labels),
                               memory_gb),
        median_image_size=tuple(float(m) for m in median_shape),
        foreground_intensity_properties=tuple(dict(fg[str(c)]) for c in range(len(channels))),
        file_ending=file_ending, network_class_name=network_class_path(spec.network_class),
        plans_name=spec.plans_name, data_identifier="nnUNetPlans_3d_fullres",
        image_reader_writer=str(dataset_meta.get("overwrite_image_reader_writer")
                                or reader_writer_for(file_ending)),
        experiment_planner=spec.name, source=f"planner:{name}")


def explain_plan(plan: Plan, fingerprint: dict, memory_gb: float | None = None) -> list[str]:
    """Human-readable reasons for each choice of `plan_from_fingerprint`."""
    spec = get_planner(plan.experiment_planner)
    memory_gb = float(spec.reference_gb if memory_gb is None else memory_gb)
    median_sp = np.median(np.asarray(fingerprint["spacings"], float), axis=0)
    n = len(fingerprint["spacings"])
    lines = [f"planner {spec.name} ({plan.network_class}, {memory_gb:g} GB target)",
             f"spacing {_fmt(plan.spacing)} mm: median of {n} cases ({_fmt(median_sp)})"
             + ("" if np.allclose(median_sp, plan.spacing) else
                "; the coarse axis takes its 10th percentile (nnU-Net's anisotropy rule)")]
    if int(np.argmax(plan.spacing)) != 0:
        lines.append("nnU-Net would move the coarsest axis first (transpose_forward); jaxmamba "
                     "keeps the axis order")
    inv = 1.0 / np.asarray(plan.spacing)
    start = np.round(inv * (256**3 / np.prod(inv)) ** (1 / 3))
    wanted = np.minimum(start, plan.median_image_size)
    limited = "median shape" if (wanted < start).any() else "256^3-voxel start"
    est = feature_map_size(plan.network_class, plan.patch_size, plan.strides,
                           plan.features_per_stage, plan.n_blocks_encoder, plan.n_blocks_decoder,
                           plan.num_classes)
    reference = spec.reference_value * memory_gb / spec.reference_gb
    lines.append(f"patch {list(plan.patch_size)}: {limited} {_fmt(wanted, 1)} at that spacing, "
                 f"padded to the total stride {list(plan.total_stride)}"
                 + (", then shrunk to fit the memory target"
                    if (np.asarray(plan.patch_size) < wanted).any() else ""))
    lines.append(f"batch {plan.batch_size}: feature maps {est:,} per sample against "
                 f"{reference:,.0f} for 2 samples allow {round(reference / est * 2)}; at most "
                 f"{100 * spec.max_dataset_covered:g} % of the dataset's voxels per batch, at "
                 f"least {MIN_BATCH}")
    lines.append(f"batch_dice {plan.batch_dice}: "
                 + ("nnU-Net would add a 3d_lowres configuration" if plan.batch_dice else
                    "nnU-Net would plan no 3d_lowres configuration"))
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


def preprocessed_beside(raw: Path) -> Path:
    """The default preprocessing cache of the raw folder `raw`: `<raw>_preprocessed` beside it
    (training's `data.preprocessed_dir: ""`)."""
    return raw.with_name(raw.name + "_preprocessed")


def default_output(dataset: str | Path) -> Path:
    """Where `plan` and `preprocess` write by default: `preprocessed_beside` the resolved raw
    folder."""
    return preprocessed_beside(Path(dataset).resolve())
