"""The plan: everything about a dataset that networks, preprocessing and training agree on.

A `Plan` holds nnU-Net's `nnUNetPlans.json` `3d_fullres` configuration plus what `dataset.json`
adds (input channels, labels), in nnU-Net's axis order, validated as a whole (`validate`). Its
files are nnU-Net's, in every 2.x layout (`Plan.load`, `Plan.save`: `jaxmamba.nnunet_plans` is
the format). A run's config may change some fields (`data.plan_overrides`): which, in what
form (`override_problem`) and whether the result fits (`with_overrides`) is decided here alone.
This module is shared by `models/` and `data/` and imports neither.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxmamba import nnunet_plans
from jaxmamba.nnunet_plans import (
    CONFIGURATION,
    DEFAULT_RESAMPLING,
    NETWORK_CLASSES,
    PlanError,
    network_class_path,
    reader_writer_for,
)

__all__ = ["CONFIGURATION", "NETWORK_CLASSES", "OVERRIDABLE", "Plan", "PlanError",
           "override_problem"]


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _ints(n: int | None, ok=_positive_int):
    return lambda v: isinstance(v, list | tuple) and (n is None or len(v) == n) and all(
        ok(x) for x in v)


def _per_stage(entry):
    return lambda v: isinstance(v, list | tuple) and len(v) >= 1 and all(entry(x) for x in v)


#: Bounds of an overridden patch and batch (beyond them the data loader cannot index them)
MAX_PATCH_VOXELS, MAX_BATCH = 2**27, 2**16

#: Plan fields `data.plan_overrides` may set (they change the network or the batches, not the
#: preprocessing), each with what its value must be and a check of it.
OVERRIDABLE: dict[str, tuple[str, Any]] = {
    "patch_size": (f"a list of 3 integers >= 1, at most {MAX_PATCH_VOXELS:,} voxels in all "
                   f"(2**27, 512 x 512 x 512)",
                   lambda v: _ints(3)(v) and math.prod(v) <= MAX_PATCH_VOXELS),
    "batch_size": (f"an integer in 1..{MAX_BATCH:,} (patches per step over all devices)",
                   lambda v: _positive_int(v) and v <= MAX_BATCH),
    "base_num_features": ("an integer >= 1", _positive_int),
    "max_num_features": ("an integer >= 1", _positive_int),
    "strides": ("a list (one per stage) of 3 integers >= 1", _per_stage(_ints(3))),
    "kernel_sizes": ("a list (one per stage) of 3 odd integers >= 1 (a convolution keeps the "
                     "shape with padding k // 2 only for odd k)",
                     _per_stage(_ints(3, lambda x: _positive_int(x) and x % 2 == 1))),
    "n_blocks_encoder": ("a list of integers >= 1, one per stage", _ints(None)),
    "n_blocks_decoder": ("a list of integers >= 1, one per stage but the last", _ints(None)),
    "batch_dice": ("true or false", lambda v: isinstance(v, bool)),
}


def override_problem(name: str, value: Any) -> str | None:
    """What is wrong with overriding plan field `name` by `value`, as the rest of a message
    that names the override (`": not overridable ..."`, `" = ...: must be ..."`); None if
    nothing. Whether the value fits a given plan is `Plan.with_overrides`'."""
    if name not in OVERRIDABLE:
        return (f": not overridable (choose from {', '.join(OVERRIDABLE)}; preprocessing "
                f"fields come from the plan)")
    expected, ok = OVERRIDABLE[name]
    return None if ok(value) else f" = {value!r}: must be {expected}"


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, list | tuple) else v


@dataclasses.dataclass(frozen=True)
class Plan:
    """nnU-Net `3d_fullres` plan + dataset description. Spatial tuples are in nnU-Net axis order."""

    dataset_name: str
    patch_size: tuple[int, ...]
    batch_size: int
    spacing: tuple[float, ...]
    normalization_schemes: tuple[str, ...]  # per channel: "CTNormalization", "ZScoreNormalization"
    use_mask_for_norm: tuple[bool, ...]
    strides: tuple[tuple[int, ...], ...]  # "strides" / "pool_op_kernel_sizes", one per stage
    kernel_sizes: tuple[tuple[int, ...], ...]  # "kernel_sizes" / "conv_kernel_sizes", per stage
    #: blocks (convolutions for PlainConvUNet) per encoder stage: `arch_kwargs`'
    #: "n_blocks_per_stage" / "n_conv_per_stage" or "n_conv_per_stage_encoder"
    n_blocks_encoder: tuple[int, ...]
    n_blocks_decoder: tuple[int, ...]  # "n_conv_per_stage_decoder": lowest resolution first
    channel_names: tuple[str, ...]  # dataset.json "channel_names", in channel order
    labels: tuple[tuple[str, int], ...]  # dataset.json "labels" as (name, value), value order
    base_num_features: int = 32
    max_num_features: int = 320
    batch_dice: bool = False
    median_image_size: tuple[float, ...] = ()
    foreground_intensity_properties: tuple[dict[str, float], ...] = ()  # per channel
    file_ending: str = ".nii.gz"
    resampling: dict[str, Any] = dataclasses.field(
        default_factory=lambda: json.loads(json.dumps(DEFAULT_RESAMPLING)))
    #: the network the plan is for, as nnU-Net >= 2.4's `architecture.network_class_name`
    #: (see `NETWORK_CLASSES`; `with_network` sets it from a class name).
    network_class_name: str = NETWORK_CLASSES["PlainConvUNet"]
    plans_name: str = "nnUNetPlans"
    data_identifier: str = f"nnUNetPlans_{CONFIGURATION}"
    image_reader_writer: str = ""  # "" = what nnU-Net picks for file_ending
    experiment_planner: str = "jaxmamba"
    source: str = "<plan>"  # where the plan came from, for error messages

    def __post_init__(self):
        if not self.image_reader_writer:
            object.__setattr__(self, "image_reader_writer", reader_writer_for(self.file_ending))
        try:  # a class name or any path ending in it -> the canonical path
            object.__setattr__(self, "network_class_name",
                               network_class_path(self.network_class_name))
        except ValueError as err:
            raise PlanError(f"{self.source}: {err}") from None
        self.validate()

    # ------------------------------------------------------------------ derived quantities
    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def num_input_channels(self) -> int:
        return len(self.channel_names)

    @property
    def num_classes(self) -> int:
        """Number of output heads (softmax classes, background included)."""
        return len(self.labels)

    @property
    def features_per_stage(self) -> tuple[int, ...]:
        """`min(base · 2^s, max)` for each stage (as nnU-Net's `ExperimentPlanner`)."""
        return tuple(min(self.base_num_features * 2**s, self.max_num_features)
                     for s in range(self.num_stages))

    @property
    def network_class(self) -> str:
        """The network's class name: `"PlainConvUNet"`, `"ResidualEncoderUNet"`, `"SegMamba"`,
        `"PanSegMamba"`, `"SegMambaSkip"` or `"MultiSegMamba"`."""
        return self.network_class_name.rsplit(".", 1)[-1]

    def with_network(self, name: str) -> Plan:
        """A copy for network class `name` (a class name, e.g. a variant's reference class, or
        a dotted path); `PlanError` for classes not in `NETWORK_CLASSES`."""
        return self.replace(network_class_name=name)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size)))

    @property
    def deep_supervision_scales(self) -> tuple[tuple[float, ...], ...]:
        """Each decoder output's scale relative to the patch, full resolution first.

        As nnU-Net's `nnUNetTrainer._get_deep_supervision_scales`.
        """
        scales, cum = [], [1] * len(self.patch_size)
        for stride in self.strides[:-1]:
            cum = [c * s for c, s in zip(cum, stride, strict=True)]
            scales.append(tuple(1.0 / c for c in cum))
        return tuple(scales)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        src, nd = self.source, len(self.patch_size)
        if nd != 3:
            raise PlanError(f"{src}: patch_size {list(self.patch_size)} must have 3 axes")
        n = len(self.strides)
        for key, value in (("pool_op_kernel_sizes", self.strides),
                           ("conv_kernel_sizes", self.kernel_sizes),
                           ("n_conv_per_stage_encoder", self.n_blocks_encoder)):
            if len(value) != n:
                raise PlanError(f"{src}: {key} has {len(value)} entries, expected {n} (one per "
                                f"stage, as pool_op_kernel_sizes)")
        if len(self.n_blocks_decoder) != n - 1:
            raise PlanError(f"{src}: n_conv_per_stage_decoder has {len(self.n_blocks_decoder)} "
                            f"entries, expected {n - 1} (number of stages - 1)")
        for key, value in (("pool_op_kernel_sizes", self.strides),
                           ("conv_kernel_sizes", self.kernel_sizes)):
            for i, v in enumerate(value):
                if len(v) != nd:
                    raise PlanError(f"{src}: {key}[{i}] = {list(v)} must have {nd} entries")
        if not all(_positive_int(p) for p in self.patch_size):
            raise PlanError(f"{src}: patch_size {list(self.patch_size)}: entries must be integers "
                            f">= 1")
        for i, v in enumerate(self.strides):
            if not all(_positive_int(x) for x in v):
                raise PlanError(f"{src}: pool_op_kernel_sizes[{i}] = {list(v)}: entries must be "
                                f"integers >= 1")
        for i, v in enumerate(self.kernel_sizes):
            if not all(_positive_int(x) and x % 2 for x in v):
                raise PlanError(f"{src}: conv_kernel_sizes[{i}] = {list(v)}: entries must be odd "
                                f"integers >= 1 (convolutions pad by k // 2 to keep the shape)")
        for key, value in (("n_conv_per_stage_encoder", self.n_blocks_encoder),
                           ("n_conv_per_stage_decoder", self.n_blocks_decoder)):
            if not all(_positive_int(x) for x in value):
                raise PlanError(f"{src}: {key} {list(value)}: entries must be integers >= 1")
        for key, value in (("UNet_base_num_features", self.base_num_features),
                           ("unet_max_num_features", self.max_num_features)):
            if not _positive_int(value):
                raise PlanError(f"{src}: {key} = {value!r}: must be an integer >= 1")
        if not isinstance(self.batch_dice, bool):
            raise PlanError(f"{src}: batch_dice = {self.batch_dice!r}: must be true or false")
        for axis, (p, t) in enumerate(zip(self.patch_size, self.total_stride, strict=True)):
            if p % t:
                raise PlanError(f"{src}: patch_size {list(self.patch_size)} is not divisible by "
                                f"the total stride {list(self.total_stride)} (axis {axis})")
        c = self.num_input_channels
        for key, value in (("normalization_schemes", self.normalization_schemes),
                           ("use_mask_for_norm", self.use_mask_for_norm)):
            if len(value) != c:
                raise PlanError(f"{src}: {key} has {len(value)} entries, expected {c} "
                                f"(one per channel of dataset.json channel_names)")
        if len(self.labels) < 2:
            raise PlanError(f"{src}: labels {dict(self.labels)} must hold background and at "
                            f"least one class")
        values = [v for _, v in self.labels]
        if values != list(range(len(values))):
            raise PlanError(f"{src}: label values {values} must be 0..{len(values) - 1}")
        if not _positive_int(self.batch_size):
            raise PlanError(f"{src}: batch_size {self.batch_size!r} must be an integer >= 1")
        if len(self.spacing) != nd:
            raise PlanError(f"{src}: spacing {list(self.spacing)} must have {nd} entries")

    def replace(self, **changes: Any) -> Plan:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def with_overrides(self, overrides: dict[str, Any], *,
                       blame: str = "data.plan_overrides") -> Plan:
        """A copy with `overrides` (`OVERRIDABLE` fields, lists as YAML gives them) applied;
        other fields, values of the wrong form and values that do not fit this plan are
        `PlanError`s naming `blame` (the overrides), not the plans file."""
        for name, value in overrides.items():
            if problem := override_problem(name, value):
                raise PlanError(f"{blame}.{name}{problem}")
        changes = {k: _as_tuple(v) for k, v in overrides.items()}
        self.replace(**changes, source=blame)  # validated, blamed on the overrides
        return self.replace(**changes)

    # ------------------------------------------------------------------ nnU-Net files
    @classmethod
    def from_nnunet(cls, plans: dict, dataset: dict, *, configuration: str = CONFIGURATION,
                    source: str = "<nnUNetPlans>") -> Plan:
        """Build from parsed `nnUNetPlans.json` and `dataset.json` dictionaries (any nnU-Net 2.x
        layout; `jaxmamba.nnunet_plans`)."""
        fields = nnunet_plans.parse(plans, dataset, configuration=configuration, source=source)
        try:
            return cls(**fields)
        except (TypeError, ValueError, AttributeError) as err:
            if isinstance(err, PlanError):
                raise
            raise nnunet_plans.wrong_type(err, source, configuration) from err

    @classmethod
    def load(cls, plans_path: str | Path, dataset_path: str | Path | None = None, *,
             configuration: str = CONFIGURATION) -> Plan:
        """Read `nnUNetPlans.json` and its `dataset.json`.

        Without `dataset_path`, looks for `dataset.json` beside the plans file, then for
        `<name>.dataset.json` next to `<name>.nnUNetPlans.json`.
        """
        plans, dataset = nnunet_plans.read(plans_path, dataset_path)
        return cls.from_nnunet(plans, dataset, configuration=configuration, source=str(plans_path))

    def to_nnunet(self) -> tuple[dict, dict]:
        """`(nnUNetPlans.json, dataset.json)` dictionaries with nnU-Net's field names (both the
        >= 2.4 `architecture` and the pre-2.4 keys: `jaxmamba.nnunet_plans.write`)."""
        return nnunet_plans.write(self)

    def to_record(self) -> dict:
        """`{"plans": ..., "dataset": ...}`: the plan as run directories' checkpoints store it."""
        plans, dataset = self.to_nnunet()
        return {"plans": plans, "dataset": dataset}

    @classmethod
    def from_record(cls, record: dict, *, source: str) -> Plan:
        """The inverse of `to_record`."""
        return cls.from_nnunet(record["plans"], record["dataset"], source=source)

    def save(self, plans_path: str | Path, dataset_path: str | Path | None = None) -> None:
        """Write `nnUNetPlans.json` (and `dataset.json` beside it unless given), atomically."""
        nnunet_plans.save(*self.to_nnunet(), plans_path, dataset_path)
