"""The plan: everything about a dataset that networks, preprocessing and training agree on.

A `Plan` holds nnU-Net's `nnUNetPlans.json` `3d_fullres` configuration plus what `dataset.json`
adds (input channels, labels), in nnU-Net's axis order (DESIGN §3). nnU-Net plans files load
unchanged (`Plan.load`), and `Plan.to_nnunet` writes them back with nnU-Net's field names, so a
jaxmamba plan is also an nnU-Net plan. This module is shared by `models/` and `data/` and imports
neither.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from jaxmamba.atomic import write_text
from jaxmamba.errors import UserError

CONFIGURATION = "3d_fullres"

_DEFAULT_RESAMPLING = {
    "resampling_fn_data_kwargs": {
        "is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {
        "is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities_kwargs": {
        "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None
    },
}


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


class PlanError(UserError, ValueError):
    """A plans or dataset.json file that cannot be used; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """nnU-Net `3d_fullres` plan + dataset description. Spatial tuples are in nnU-Net axis order."""

    dataset_name: str
    patch_size: tuple[int, ...]
    batch_size: int
    spacing: tuple[float, ...]
    normalization_schemes: tuple[str, ...]  # per channel: "CTNormalization", "ZScoreNormalization"
    use_mask_for_norm: tuple[bool, ...]
    strides: tuple[tuple[int, ...], ...]  # nnU-Net "pool_op_kernel_sizes", one per stage
    kernel_sizes: tuple[tuple[int, ...], ...]  # nnU-Net "conv_kernel_sizes", one per stage
    n_blocks_encoder: tuple[int, ...]  # "n_conv_per_stage_encoder": residual blocks per stage
    n_blocks_decoder: tuple[int, ...]  # "n_conv_per_stage_decoder": one per decoder stage
    channel_names: tuple[str, ...]  # dataset.json "channel_names", in channel order
    labels: tuple[tuple[str, int], ...]  # dataset.json "labels" as (name, value), value order
    base_num_features: int = 32
    max_num_features: int = 320
    batch_dice: bool = False
    median_image_size: tuple[float, ...] = ()
    foreground_intensity_properties: tuple[dict[str, float], ...] = ()  # per channel
    file_ending: str = ".nii.gz"
    resampling: dict[str, Any] = dataclasses.field(
        default_factory=lambda: json.loads(json.dumps(_DEFAULT_RESAMPLING)))
    source: str = "<plan>"  # where the plan came from, for error messages

    def __post_init__(self):
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
        """`min(base · 2^s, max)` for each stage (paper_spec §3.2)."""
        return tuple(min(self.base_num_features * 2**s, self.max_num_features)
                     for s in range(self.num_stages))

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size)))

    @property
    def deep_supervision_scales(self) -> tuple[tuple[float, ...], ...]:
        """Each decoder output's scale relative to the patch, full resolution first (spec §4.1)."""
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

    # ------------------------------------------------------------------ nnU-Net I/O
    @classmethod
    def from_nnunet(cls, plans: dict, dataset: dict, *, configuration: str = CONFIGURATION,
                    source: str = "<nnUNetPlans>") -> Plan:
        """Build from parsed `nnUNetPlans.json` and `dataset.json` dictionaries."""
        configs = plans.get("configurations")
        if not isinstance(configs, dict) or configuration not in configs:
            have = sorted(configs) if isinstance(configs, dict) else "none"
            raise PlanError(f"{source}: no configurations.{configuration} (found: {have})")
        cfg = _resolve_inheritance(configs, configuration, source)

        def need(d: dict, key: str, where: str):
            if key not in d:
                raise PlanError(f"{source}: missing key {where}{key}")
            return d[key]

        where = f"configurations.{configuration}."
        channel_names = need(dataset, "channel_names", "dataset.json ")
        labels = need(dataset, "labels", "dataset.json ")
        for name, value in labels.items():
            if not isinstance(value, int):
                raise PlanError(f"{source}: dataset.json label {name!r} = {value!r}: region-based "
                                f"labels are not supported for training; use integer labels")
        fg = plans.get("foreground_intensity_properties_per_channel", {})
        try:
            return cls(
                dataset_name=str(plans.get("dataset_name", dataset.get("name", "dataset"))),
                patch_size=tuple(int(v) for v in need(cfg, "patch_size", where)),
                batch_size=int(need(cfg, "batch_size", where)),
                spacing=tuple(float(v) for v in need(cfg, "spacing", where)),
                normalization_schemes=tuple(need(cfg, "normalization_schemes", where)),
                use_mask_for_norm=tuple(bool(v) for v in need(cfg, "use_mask_for_norm", where)),
                strides=tuple(tuple(int(x) for x in s)
                              for s in need(cfg, "pool_op_kernel_sizes", where)),
                kernel_sizes=tuple(tuple(int(x) for x in k)
                                   for k in need(cfg, "conv_kernel_sizes", where)),
                n_blocks_encoder=tuple(int(v) for v in need(cfg, "n_conv_per_stage_encoder",
                                                            where)),
                n_blocks_decoder=tuple(int(v) for v in need(cfg, "n_conv_per_stage_decoder",
                                                            where)),
                channel_names=tuple(str(channel_names[k])
                                    for k in sorted(channel_names, key=int)),
                labels=tuple(sorted(((str(k), int(v)) for k, v in labels.items()),
                                    key=lambda x: x[1])),
                base_num_features=int(need(cfg, "UNet_base_num_features", where)),
                max_num_features=int(cfg.get("unet_max_num_features", 320)),
                batch_dice=bool(cfg.get("batch_dice", False)),
                median_image_size=tuple(float(v)
                                        for v in cfg.get("median_image_size_in_voxels", ())),
                foreground_intensity_properties=tuple(
                    {k: float(v) for k, v in fg[c].items()} for c in sorted(fg, key=int)),
                file_ending=str(dataset.get("file_ending", ".nii.gz")),
                resampling={k: cfg.get(k, v) for k, v in _DEFAULT_RESAMPLING.items()},
                source=source,
            )
        except (TypeError, ValueError, AttributeError) as err:
            if isinstance(err, PlanError):
                raise
            raise PlanError(f"{source}: {where.rstrip('.')}: a value of the wrong type "
                            f"({type(err).__name__}: {err})") from err

    @classmethod
    def load(cls, plans_path: str | Path, dataset_path: str | Path | None = None, *,
             configuration: str = CONFIGURATION) -> Plan:
        """Read `nnUNetPlans.json` and its `dataset.json`.

        Without `dataset_path`, looks for `dataset.json` beside the plans file, then for
        `<name>.dataset.json` next to `<name>.nnUNetPlans.json`.
        """
        plans_path = Path(plans_path)
        if dataset_path is None:
            candidates = [plans_path.with_name("dataset.json")]
            if plans_path.name.endswith(".nnUNetPlans.json"):
                stem = plans_path.name[: -len(".nnUNetPlans.json")]
                candidates.insert(0, plans_path.with_name(f"{stem}.dataset.json"))
            dataset_path = next((c for c in candidates if c.is_file()), None)
            if dataset_path is None:
                raise PlanError(f"{plans_path}: no dataset.json found (looked for "
                                f"{', '.join(str(c) for c in candidates)}); pass it explicitly")
        plans = _read_json(plans_path)
        dataset = _read_json(Path(dataset_path))
        return cls.from_nnunet(plans, dataset, configuration=configuration, source=str(plans_path))

    def to_nnunet(self) -> tuple[dict, dict]:
        """`(nnUNetPlans.json, dataset.json)` dictionaries with nnU-Net's field names."""
        cfg = {
            "data_identifier": f"nnUNetPlans_{CONFIGURATION}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": self.batch_size,
            "patch_size": list(self.patch_size),
            "median_image_size_in_voxels": list(self.median_image_size),
            "spacing": list(self.spacing),
            "normalization_schemes": list(self.normalization_schemes),
            "use_mask_for_norm": list(self.use_mask_for_norm),
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": self.base_num_features,
            "n_conv_per_stage_encoder": list(self.n_blocks_encoder),
            "n_conv_per_stage_decoder": list(self.n_blocks_decoder),
            "num_pool_per_axis": [sum(s[a] > 1 for s in self.strides) for a in range(3)],
            "pool_op_kernel_sizes": [list(s) for s in self.strides],
            "conv_kernel_sizes": [list(k) for k in self.kernel_sizes],
            "unet_max_num_features": self.max_num_features,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            **json.loads(json.dumps(self.resampling)),
            "batch_dice": self.batch_dice,
        }
        plans = {
            "dataset_name": self.dataset_name,
            "plans_name": "nnUNetPlans",
            "original_median_spacing_after_transp": list(self.spacing),
            "original_median_shape_after_transp": [int(round(v)) for v in self.median_image_size],
            "image_reader_writer": "NibabelIO",
            "transpose_forward": [0, 1, 2],
            "transpose_backward": [0, 1, 2],
            "configurations": {CONFIGURATION: cfg},
            "experiment_planner_used": "jaxmamba",
            "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {
                str(i): dict(p) for i, p in enumerate(self.foreground_intensity_properties)},
        }
        dataset = {
            "name": self.dataset_name,
            "channel_names": {str(i): n for i, n in enumerate(self.channel_names)},
            "labels": dict(self.labels),
            "file_ending": self.file_ending,
        }
        return plans, dataset

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
        plans, dataset = self.to_nnunet()
        plans_path = Path(plans_path)
        _write_json(plans_path, plans)
        _write_json(Path(dataset_path) if dataset_path else plans_path.with_name("dataset.json"),
                    dataset)


def _resolve_inheritance(configs: dict, name: str, source: str) -> dict:
    """nnU-Net configurations may say `inherits_from`; merge parents first."""
    cfg, seen = dict(configs[name]), {name}
    while "inherits_from" in cfg:
        parent = cfg.pop("inherits_from")
        if parent in seen or parent not in configs:
            raise PlanError(f"{source}: configurations.{name} inherits from unknown or cyclic "
                            f"configuration {parent!r}")
        seen.add(parent)
        cfg = {**configs[parent], **cfg}
    return cfg


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError as err:
        raise PlanError(f"{path}: file not found") from err
    except json.JSONDecodeError as err:
        raise PlanError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object at the top level")
    return data


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")
