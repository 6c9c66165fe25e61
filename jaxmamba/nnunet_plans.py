# nnU-Net's plans-file format: every 2.x layout read into a plan's fields, and written back.
"""`nnUNetPlans.json` + `dataset.json`, as nnU-Net 2.1-2.8 read and write them.

Every nnU-Net 2.x plans layout loads (`parse`):

- before nnU-Net 2.4: the network as `UNet_class_name`, `UNet_base_num_features`,
  `unet_max_num_features`, `pool_op_kernel_sizes`, `conv_kernel_sizes`,
  `n_conv_per_stage_encoder`, `n_conv_per_stage_decoder` (TamingMambas' nnunetv2 2.1.1 fork);
- nnU-Net >= 2.4: `architecture` = {`network_class_name`, `arch_kwargs` (`n_stages`,
  `features_per_stage`, `strides`, `kernel_sizes`, `n_conv_per_stage` or `n_blocks_per_stage`,
  `n_conv_per_stage_decoder`, ...), `_kw_requires_import`};

with `inherits_from` between configurations resolved as nnU-Net's `PlansManager` does. `write`
writes both layouts in one file, so nnU-Net 2.1-2.8 builds the network the plan is for
(`network_class_name`: dynamic-network-architectures' `PlainConvUNet` or `ResidualEncoderUNet`,
or TamingMambas' `nnunetv2.nets.<Class>.<Class>`). The value these fields make is
`jaxmamba.plans.Plan`, which reads and writes files through here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jaxmamba.atomic import write_text
from jaxmamba.errors import UserError
from jaxmamba.jsonfile import read_json

CONFIGURATION = "3d_fullres"


class PlanError(UserError, ValueError):
    """A plans or dataset.json file that cannot be used; the message names the file and the key."""


#: Network classes a plan can be for: class name -> the dotted path nnU-Net >= 2.4 writes
#: (dynamic-network-architectures >= 0.4 for the first two; TamingMambas' `nnunetv2/nets/`).
NETWORK_CLASSES = {
    "PlainConvUNet": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "ResidualEncoderUNet": "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet",
    "SegMamba": "nnunetv2.nets.SegMamba.SegMamba",
    "PanSegMamba": "nnunetv2.nets.PanSegMamba.PanSegMamba",
    "SegMambaSkip": "nnunetv2.nets.SegMambaSkip.SegMambaSkip",
    "MultiSegMamba": "nnunetv2.nets.MultiSegMamba.MultiSegMamba",
}
#: Other names of the same classes (the reference's parameter-count tables say "ResEncUNet").
_CLASS_ALIASES = {"ResEncUNet": "ResidualEncoderUNet"}

#: `arch_kwargs` jaxmamba's networks are built with; a plan asking for other values is refused.
_FIXED_ARCH_KWARGS: dict[str, Any] = {
    "conv_op": "torch.nn.modules.conv.Conv3d",
    "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None,
    "dropout_op_kwargs": None,
    "nonlin": "torch.nn.LeakyReLU",
    "nonlin_kwargs": {"inplace": True},
}
_KW_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
#: arch_kwargs that may appear with these values (the classes' defaults).
_DEFAULT_ARCH_KWARGS: dict[str, Any] = {
    "deep_supervision": None, "nonlin_first": False, "block": None,
    "bottleneck_channels": None, "stem_channels": None,
}  # `deep_supervision` is chosen at training time, whatever the plan says
_TORCH_ALIASES = {"torch.nn.Conv3d": "torch.nn.modules.conv.Conv3d",
                  "torch.nn.InstanceNorm3d": "torch.nn.modules.instancenorm.InstanceNorm3d",
                  "torch.nn.modules.activation.LeakyReLU": "torch.nn.LeakyReLU"}

#: nnU-Net's resampling of images, labels and probabilities (the plan's defaults).
DEFAULT_RESAMPLING = {
    "resampling_fn_data_kwargs": {
        "is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {
        "is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities_kwargs": {
        "is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None
    },
}


def network_class_path(name: str) -> str:
    """The dotted path nnU-Net >= 2.4 writes for a network class, given its name
    (`"ResidualEncoderUNet"`) or any dotted path ending in it; `ValueError` for classes jaxmamba
    cannot build."""
    short = name.rsplit(".", 1)[-1]
    short = _CLASS_ALIASES.get(short, short)
    if short not in NETWORK_CLASSES:
        raise ValueError(f"unknown network class {name!r}; jaxmamba builds "
                         f"{', '.join(NETWORK_CLASSES)}")
    return NETWORK_CLASSES[short]


def reader_writer_for(file_ending: str) -> str:
    """The image reader/writer nnU-Net 2.8 picks for a file ending (its
    `determine_reader_writer_from_file_ending`, first match in `LIST_OF_IO_CLASSES`)."""
    return "SimpleITKIO" if file_ending.lower() == ".nii.gz" else "NibabelIO"


def encoder_blocks_key(network_class: str) -> str:
    """The `arch_kwargs` key of the encoder's blocks per stage for a network class: residual
    blocks (`n_blocks_per_stage`, ResidualEncoderUNet) or convolutions / blocks
    (`n_conv_per_stage`, PlainConvUNet and TamingMambas' networks)."""
    return "n_blocks_per_stage" if network_class == "ResidualEncoderUNet" else "n_conv_per_stage"


# ---------------------------------------------------------------------- files
def read(plans_path: str | Path, dataset_path: str | Path | None = None) -> tuple[dict, dict]:
    """The parsed `nnUNetPlans.json` and its `dataset.json`.

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
    return _read_json(plans_path), _read_json(Path(dataset_path))


def save(plans: dict, dataset: dict, plans_path: str | Path,
         dataset_path: str | Path | None = None) -> None:
    """Write `nnUNetPlans.json` (and `dataset.json` beside it unless given), atomically."""
    plans_path = Path(plans_path)
    _write_json(plans_path, plans)
    _write_json(Path(dataset_path) if dataset_path else plans_path.with_name("dataset.json"),
                dataset)


def _read_json(path: Path) -> dict:
    data = read_json(path, PlanError)
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a JSON object at the top level")
    return data


def _write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------- parsing
def wrong_type(err: Exception, source: str, configuration: str = CONFIGURATION) -> PlanError:
    """The error for a plans value of the wrong type (found while converting it)."""
    return PlanError(f"{source}: configurations.{configuration}: a value of the wrong type "
                     f"({type(err).__name__}: {err})")


def parse(plans: dict, dataset: dict, *, configuration: str = CONFIGURATION,
          source: str = "<nnUNetPlans>") -> dict[str, Any]:
    """The `Plan` fields of parsed `nnUNetPlans.json` and `dataset.json` dictionaries (any
    nnU-Net 2.x layout; see the module docstring)."""
    configs = plans.get("configurations")
    if not isinstance(configs, dict) or configuration not in configs:
        have = sorted(configs) if isinstance(configs, dict) else "none"
        raise PlanError(f"{source}: no configurations.{configuration} (found: {have})")
    cfg = _resolve_inheritance(configs, configuration, source)
    where = f"configurations.{configuration}."

    def need(d: dict, key: str, at: str = where):
        return _need(d, key, source, at)

    channel_names = need(dataset, "channel_names", "dataset.json ")
    labels = need(dataset, "labels", "dataset.json ")
    for name, value in labels.items():
        if not isinstance(value, int):
            raise PlanError(f"{source}: dataset.json label {name!r} = {value!r}: region-based "
                            f"labels are not supported for training; use integer labels")
    net = (_architecture(need(cfg, "architecture"), source, where + "architecture.")
           if "architecture" in cfg else _legacy_architecture(cfg, need, source, where))
    fg = plans.get("foreground_intensity_properties_per_channel", {})
    file_ending = str(dataset.get("file_ending", ".nii.gz"))
    try:
        return dict(
            dataset_name=str(plans.get("dataset_name", dataset.get("name", "dataset"))),
            patch_size=tuple(int(v) for v in need(cfg, "patch_size")),
            batch_size=int(need(cfg, "batch_size")),
            spacing=tuple(float(v) for v in need(cfg, "spacing")),
            normalization_schemes=tuple(need(cfg, "normalization_schemes")),
            use_mask_for_norm=tuple(bool(v) for v in need(cfg, "use_mask_for_norm")),
            channel_names=tuple(str(channel_names[k])
                                for k in sorted(channel_names, key=int)),
            labels=tuple(sorted(((str(k), int(v)) for k, v in labels.items()),
                                key=lambda x: x[1])),
            batch_dice=bool(cfg.get("batch_dice", False)),
            median_image_size=tuple(float(v)
                                    for v in cfg.get("median_image_size_in_voxels", ())),
            foreground_intensity_properties=tuple(
                {k: float(v) for k, v in fg[c].items()} for c in sorted(fg, key=int)),
            file_ending=file_ending,
            resampling={k: cfg.get(k, v) for k, v in DEFAULT_RESAMPLING.items()},
            plans_name=str(plans.get("plans_name", "nnUNetPlans")),
            data_identifier=str(cfg.get("data_identifier", f"nnUNetPlans_{configuration}")),
            image_reader_writer=str(plans.get("image_reader_writer")
                                    or reader_writer_for(file_ending)),
            experiment_planner=str(plans.get("experiment_planner_used", "jaxmamba")),
            source=source,
            **net,
        )
    except (TypeError, ValueError, AttributeError) as err:
        if isinstance(err, PlanError):
            raise
        raise wrong_type(err, source, configuration) from err


def _need(d: Any, key: str, source: str, at: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise PlanError(f"{source}: missing key {at}{key}")
    return d[key]


def _resolve_inheritance(configs: dict, name: str, source: str) -> dict:
    """nnU-Net configurations may say `inherits_from`; parents first, children override."""
    chain = [name]
    while "inherits_from" in configs[chain[-1]]:
        parent = configs[chain[-1]]["inherits_from"]
        if parent in chain:
            raise PlanError(f"{source}: configurations.{chain[-1]}.inherits_from = {parent!r} "
                            f"makes a cycle ({' -> '.join([*chain, parent])})")
        if parent not in configs:
            raise PlanError(f"{source}: configurations.{chain[-1]}.inherits_from = {parent!r}: "
                            f"no such configuration (found: {sorted(configs)})")
        chain.append(parent)
    cfg: dict = {}
    for c in reversed(chain):
        cfg.update(configs[c])
    cfg.pop("inherits_from", None)
    return cfg


def _base_and_max(features: list[int], source: str, key: str) -> tuple[int, int]:
    """`(base, max)` with `features[s] == min(base * 2**s, max)`, the only form jaxmamba's
    networks take (and what every nnU-Net planner writes). `max` is nnU-Net's 3-D cap of 320
    where the features are consistent with it (then it does not bind)."""
    base = int(features[0])
    top = 320 if [min(base * 2**s, 320) for s in range(len(features))] == list(features) \
        else int(max(features))
    if [min(base * 2**s, top) for s in range(len(features))] != [int(f) for f in features]:
        raise PlanError(f"{source}: {key} = {list(features)} is not min(base * 2^stage, max) "
                        f"(expected {[min(base * 2**s, top) for s in range(len(features))]})")
    return base, top


def _tuples(value, source: str, key: str) -> tuple[tuple[int, ...], ...]:
    try:
        return tuple(tuple(int(x) for x in v) for v in value)
    except TypeError:
        raise PlanError(f"{source}: {key} = {value!r}: expected one list of 3 integers per "
                        f"stage") from None


def _architecture(arch: dict, source: str, where: str) -> dict[str, Any]:
    """Plan fields from nnU-Net >= 2.4's `architecture` entry."""
    def need(d, key, at):
        return _need(d, key, source, at)

    name = str(need(arch, "network_class_name", where))
    try:
        path = network_class_path(name)
    except ValueError as err:
        raise PlanError(f"{source}: {where}network_class_name: {err}") from None
    at = where + "arch_kwargs."
    kw = need(arch, "arch_kwargs", where)
    blocks_key = next((k for k in ("n_blocks_per_stage", "n_conv_per_stage") if k in kw), None)
    if blocks_key is None:
        raise PlanError(f"{source}: missing key {at}n_blocks_per_stage (or n_conv_per_stage)")
    if bad := _unsupported_arch_kwargs(kw, blocks_key):
        key, value, expected = bad[0]
        raise PlanError(f"{source}: {at}{key} = {value!r}: jaxmamba's networks are built with "
                        f"{expected}")
    features = need(kw, "features_per_stage", at)
    base, top = _base_and_max(features, source, at + "features_per_stage")
    strides = _tuples(need(kw, "strides", at), source, at + "strides")
    if int(need(kw, "n_stages", at)) != len(strides):
        raise PlanError(f"{source}: {at}n_stages = {kw['n_stages']} but strides has "
                        f"{len(strides)} entries")
    if len(features) != len(strides):
        raise PlanError(f"{source}: {at}features_per_stage has {len(features)} entries, expected "
                        f"{len(strides)} (one per stage, as strides)")
    return {
        "network_class_name": path,
        "strides": strides,
        "kernel_sizes": _tuples(need(kw, "kernel_sizes", at), source, at + "kernel_sizes"),
        "n_blocks_encoder": tuple(int(v) for v in need(kw, blocks_key, at)),
        "n_blocks_decoder": tuple(int(v) for v in need(kw, "n_conv_per_stage_decoder", at)),
        "base_num_features": base,
        "max_num_features": top,
    }


def _unsupported_arch_kwargs(kw: dict, blocks_key: str) -> list[tuple[str, Any, str]]:
    """`(key, value, what jaxmamba builds)` for each `arch_kwargs` entry it cannot honour.
    Missing entries take the dynamic-network-architectures defaults."""
    def name(key):
        value = kw.get(key)
        return _TORCH_ALIASES.get(value, value) if isinstance(value, str) else value

    norm_kw = kw.get("norm_op_kwargs") or {}
    nonlin_kw = kw.get("nonlin_kwargs") or {}
    checks = [
        ("conv_op", name("conv_op") == _FIXED_ARCH_KWARGS["conv_op"], "torch.nn.Conv3d"),
        ("conv_bias", kw.get("conv_bias", False) is True, "True"),
        ("norm_op", name("norm_op") == _FIXED_ARCH_KWARGS["norm_op"], "InstanceNorm3d"),
        ("norm_op_kwargs", norm_kw.get("eps", 1e-5) == 1e-5 and norm_kw.get("affine") is True,
         "{'eps': 1e-05, 'affine': True}"),
        ("dropout_op", kw.get("dropout_op") is None, "None"),
        ("nonlin", name("nonlin") == _FIXED_ARCH_KWARGS["nonlin"], "torch.nn.LeakyReLU"),
        ("nonlin_kwargs", nonlin_kw.get("negative_slope", 0.01) == 0.01, "negative_slope 0.01"),
        *((key, kw.get(key) in (None, default), f"{default!r}")
          for key, default in _DEFAULT_ARCH_KWARGS.items() if key != "deep_supervision"),
    ]
    bad = [(key, kw.get(key), expected) for key, ok, expected in checks if not ok]
    known = {*_FIXED_ARCH_KWARGS, *_DEFAULT_ARCH_KWARGS, "n_stages", "features_per_stage",
             "kernel_sizes", "strides", blocks_key, "n_conv_per_stage_decoder"}
    bad += [(key, kw[key], "no such argument") for key in sorted(set(kw) - known)]
    return bad


def _legacy_architecture(cfg: dict, need, source: str, where: str) -> dict[str, Any]:
    """Plan fields from the pre-2.4 keys (`UNet_class_name`, `pool_op_kernel_sizes`, ...)."""
    name = str(cfg.get("UNet_class_name", "PlainConvUNet"))
    try:
        path = network_class_path(name)
    except ValueError as err:
        raise PlanError(f"{source}: {where}UNet_class_name: {err}") from None
    return {
        "network_class_name": path,
        "strides": _tuples(need(cfg, "pool_op_kernel_sizes"), source,
                           where + "pool_op_kernel_sizes"),
        "kernel_sizes": _tuples(need(cfg, "conv_kernel_sizes"), source,
                                where + "conv_kernel_sizes"),
        "n_blocks_encoder": tuple(int(v) for v in need(cfg, "n_conv_per_stage_encoder")),
        "n_blocks_decoder": tuple(int(v) for v in need(cfg, "n_conv_per_stage_decoder")),
        "base_num_features": int(need(cfg, "UNet_base_num_features")),
        "max_num_features": int(cfg.get("unet_max_num_features", 320)),
    }


# ---------------------------------------------------------------------- writing
def write(plan: Any) -> tuple[dict, dict]:
    """`(nnUNetPlans.json, dataset.json)` dictionaries of `plan` (a `jaxmamba.plans.Plan`, which
    this module does not import: it imports this one) with nnU-Net's field names: the
    network both as nnU-Net >= 2.4's `architecture` and in the pre-2.4 keys (which nnU-Net
    >= 2.4 ignores when `architecture` is there)."""
    n = plan.num_stages
    arch_kwargs = {
        "n_stages": n,
        "features_per_stage": list(plan.features_per_stage),
        "conv_op": _FIXED_ARCH_KWARGS["conv_op"],
        "kernel_sizes": [list(k) for k in plan.kernel_sizes],
        "strides": [list(s) for s in plan.strides],
        encoder_blocks_key(plan.network_class): list(plan.n_blocks_encoder),
        "n_conv_per_stage_decoder": list(plan.n_blocks_decoder),
        **{k: v for k, v in json.loads(json.dumps(_FIXED_ARCH_KWARGS)).items()
           if k != "conv_op"},
    }
    cfg = {
        "data_identifier": plan.data_identifier,
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": plan.batch_size,
        "patch_size": list(plan.patch_size),
        "median_image_size_in_voxels": list(plan.median_image_size),
        "spacing": list(plan.spacing),
        "normalization_schemes": list(plan.normalization_schemes),
        "use_mask_for_norm": list(plan.use_mask_for_norm),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        **json.loads(json.dumps(plan.resampling)),
        "architecture": {
            "network_class_name": plan.network_class_name,
            "arch_kwargs": arch_kwargs,
            "_kw_requires_import": list(_KW_REQUIRES_IMPORT),
        },
        "batch_dice": plan.batch_dice,
        # nnU-Net < 2.4 (TamingMambas' fork) reads the network from these
        "UNet_class_name": plan.network_class,
        "UNet_base_num_features": plan.base_num_features,
        "unet_max_num_features": plan.max_num_features,
        "n_conv_per_stage_encoder": list(plan.n_blocks_encoder),
        "n_conv_per_stage_decoder": list(plan.n_blocks_decoder),
        "num_pool_per_axis": [sum(s[a] > 1 for s in plan.strides) for a in range(3)],
        "pool_op_kernel_sizes": [list(s) for s in plan.strides],
        "conv_kernel_sizes": [list(k) for k in plan.kernel_sizes],
    }
    plans = {
        "dataset_name": plan.dataset_name,
        "plans_name": plan.plans_name,
        "original_median_spacing_after_transp": list(plan.spacing),
        "original_median_shape_after_transp": [int(round(v)) for v in plan.median_image_size],
        "image_reader_writer": plan.image_reader_writer,
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: cfg},
        "experiment_planner_used": plan.experiment_planner,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            str(i): dict(p) for i, p in enumerate(plan.foreground_intensity_properties)},
    }
    dataset = {
        "name": plan.dataset_name,
        "channel_names": {str(i): n for i, n in enumerate(plan.channel_names)},
        "labels": dict(plan.labels),
        "file_ending": plan.file_ending,
    }
    return plans, dataset
