"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides (configs/README.md).

A config file is YAML whose keys mirror the dataclasses below; `base: other.yaml` (relative to the
file) merges the file onto another one first. Command-line overrides use dotted keys
(`optim.lr=1e-3`, `data.plan_overrides.patch_size=[32,32,32]`) and YAML values. Unknown keys, wrong
types, non-finite numbers and values outside a field's choices raise `ConfigError` naming the
dotted key and where its value came from (the file, or the command line for an override).
Every run saves its resolved config (`Config.to_dict` / `save_config`) in its run directory.

Nothing here imports the rest of jaxmamba, so the schema can be read without JAX.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxmamba.atomic import write_text
from jaxmamba.errors import UserError

VARIANTS = (
    "plainconvunet", "resencunet", "segmamba", "bisegmamba", "segmambaskip", "multisegmamba")
RECIPES = ("nnunet", "radam_cosine", "radam_onecycle")


class ConfigError(UserError, ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the dataset lives and how it is planned, cached and split."""

    raw_dir: str = ""  # nnU-Net raw folder: dataset.json, imagesTr/, labelsTr/ (required)
    preprocessed_dir: str = ""  # preprocessing cache; "" = <raw_dir>_preprocessed
    plans: str | None = None  # nnUNetPlans.json to use; None = plan from the dataset fingerprint
    build: Literal["demo", "phantom"] | None = None  # build this dataset at raw_dir if it is absent
    #: nnU-Net 5-fold split (splits_final.json), nnunetv2 `generate_crossval_split`; "all"
    #: trains on every case (nnU-Net's fold `all`), with no validation
    fold: int | Literal["all"] = 0
    num_workers: int = 0  # grain worker processes for training patches (0 = in-process)
    plan_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Plan fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    variant: Literal["plainconvunet", "resencunet", "segmamba", "bisegmamba", "segmambaskip",
                     "multisegmamba"] = "segmamba"
    precision: Literal["float32", "bf16"] = "float32"  # convolutions; Mamba always float32
    scan_implementation: Literal["reference", "xla", "pallas"] | None = None  # None = fastest
    # what the Mamba layers keep for the backward (jaxmamba.layers.remat): "none" everything,
    # "scan" the scan's output and chunk states, "states" only the chunk states (least memory)
    remat: Literal["none", "scan", "states"] = "states"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Recipe and its hyper-parameters; defaults are the reference's (configs/README.md)."""

    recipe: Literal["nnunet", "radam_cosine", "radam_onecycle"] = "nnunet"
    lr: float | None = None  # None = recipe default: 1e-2 (nnunet), 3e-4 (RAdam recipes)
    weight_decay: float = 3e-5  # coupled L2, added to the gradient (torch SGD/RAdam)
    clip_norm: float = 12.0  # global gradient norm clip (nnU-Net fork default)
    momentum: float = 0.99  # nnunet: Nesterov momentum
    poly_exponent: float = 0.9  # nnunet: lr·(1 − epoch/epochs)^0.9
    cosine_t_max: int = 100  # radam_cosine: CosineAnnealingLR T_max in epochs (periodic)
    cosine_eta_min: float = 5e-6
    onecycle_pct_start: float = 0.1  # radam_onecycle: OneCycleLR, total_steps = epochs
    onecycle_div_factor: float = 25.0
    onecycle_final_div_factor: float = 1e8
    onecycle_beta1: tuple[float, float] = (0.85, 0.95)  # (base, max) momentum cycled into β1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1000
    iters_per_epoch: int = 250  # nnU-Net: 250 training iterations per epoch
    val_iters: int = 50  # validation batches for the online pseudo-Dice per epoch
    run_dir: str = "runs/default"
    resume: bool | None = None  # None: resume if run_dir has a checkpoint; True: must; False: never
    final_validation: bool = True  # sliding-window validation of the held-out fold at the end
    preflight: bool = True  # compile ahead and refuse a step that will not fit the device memory
    memory_limit_gib: float | None = None  # None = what the device reports
    #: JAX's persistent compilation cache (jaxmamba/compile_cache.py): auto =
    #: $JAXMAMBA_COMPILE_CACHE, else ~/.cache/jaxmamba/xla; a directory; off
    compile_cache: str | Literal[False] = "auto"


@dataclasses.dataclass(frozen=True)
class LogConfig:
    progress: bool | Literal["auto"] = "auto"  # progress bars; auto: only on a terminal
    tensorboard: bool = True  # event files in run_dir/tensorboard (needs the tensorboard package)
    plot: bool = True  # run_dir/curves.png, refreshed every epoch


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # devices on the `data` axis; -1 = all devices of all processes / spatial
    spatial: int = 1  # devices sharing each sample, its volume split along S0 (token parallelism)


@dataclasses.dataclass(frozen=True)
class Config:
    name: str = "run"
    seed: int = 0  # parameters, dropout-free training noise; data uses seed + 1
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    log: LogConfig = LogConfig()
    mesh: MeshConfig = MeshConfig()

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML-safe dictionary (tuples become lists)."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                ) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {} if path is None else _read_yaml(Path(path), seen=())
    source = str(path) if path is not None else "<defaults>"
    keys = []
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, source="command line")
        keys.append(key)
    return from_dict(raw, source=source, command_line=keys)


def from_dict(raw: dict[str, Any], *, source: str = "<dict>",
              command_line: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a nested dictionary into a `Config`; errors in the keys of `command_line` (the
    dotted keys of the overrides) are blamed on the command line, the others on `source`."""
    where = _Source(source, tuple(command_line))
    cfg = _build(Config, raw, prefix="", source=where)
    _check(cfg, where)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """`"optim.lr=1e-3"` -> `("optim.lr", 0.001)`; the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. optim.lr=1e-3")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({err})") from err
    return key.strip(), value


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


# ---------------------------------------------------------------------- internals
@dataclasses.dataclass(frozen=True)
class _Source:
    """Where a key's value came from: the config file, or the command line for an override."""

    file: str
    command_line: tuple[str, ...] = ()

    def of(self, key: str) -> str:
        for k in self.command_line:
            if key == k or key.startswith((f"{k}.", f"{k}[")):
                return "command line"
        return self.file


def _read_yaml(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    if path.resolve() in seen:
        raise ConfigError(f"{path}: `base` chain loops back to itself")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a path to another YAML file, got {base!r}")
    merged = _read_yaml(path.parent / base, seen + (path.resolve(),))
    _deep_merge(merged, data)
    return merged


def _deep_merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        # plan_overrides and other free dicts merge too, which is what a derived config wants.
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _set_dotted(raw: dict, key: str, value: Any, *, source: str) -> None:
    node, parts = raw, key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: {'.'.join(parts[:i + 1])} is a value, not a section; "
                              f"cannot set {key}")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, *, prefix: str, source: _Source):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source.of(where)}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source.of(prefix + unknown[0])}: unknown key {prefix}{unknown[0]} "
                          f"(valid keys in {where}: {', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: _Source) -> Any:
    """Check `value` against the annotation `tp`; convert lists to tuples and ints to floats."""
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix=f"{key}.", source=source)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            try:
                return _coerce(option, value, key=key, source=source)
            except ConfigError as err:
                errors.append(err)
        raise errors[-1] if len(args) == 1 else ConfigError(
            f"{source.of(key)}: {key} = {value!r}: expected {_describe(tp)}")
    if origin is Literal:
        if any(a == value and type(a) is type(value) for a in args):
            return value
        raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected one of "
                          f"{', '.join(repr(a) for a in args)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected a list "
                              f"({_describe(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key=f"{key}[{i}]", source=source)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected {len(args)} entries")
        return tuple(_coerce(a, v, key=f"{key}[{i}]", source=source)
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected a mapping")
        return copy.deepcopy(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{source.of(key)}: {key} = {value!r}: expected {_describe(tp)}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(cfg: Config, source: _Source) -> None:
    """Value checks that types cannot express."""
    for key, value in _numbers(cfg):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{source.of(key)}: {key} = {value}: must be a finite number")
    t, o = cfg.train, cfg.optim
    positive = {"train.epochs": t.epochs, "train.iters_per_epoch": t.iters_per_epoch,
                "optim.cosine_t_max": o.cosine_t_max, "optim.clip_norm": o.clip_norm}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source.of(key)}: {key} = {value}: must be > 0")
    nonneg = {"train.val_iters": t.val_iters,
              "data.fold": cfg.data.fold if isinstance(cfg.data.fold, int) else 0,
              "data.num_workers": cfg.data.num_workers}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{source.of(key)}: {key} = {value}: must be >= 0")
    for key, value, ok, expected in _bounds(cfg):
        if not ok:
            raise ConfigError(f"{source.of(key)}: {key} = {value}: must be {expected}")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"{source.of('optim.lr')}: optim.lr = {cfg.optim.lr}: must be > 0 (or "
                          f"null for the recipe's default)")
    if not 0 < cfg.optim.onecycle_pct_start < 1:
        key = "optim.onecycle_pct_start"
        raise ConfigError(f"{source.of(key)}: {key} = {cfg.optim.onecycle_pct_start}: must be "
                          f"in (0, 1)")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError(f"{source.of('mesh.data')}: mesh.data = {cfg.mesh.data}: must be -1 "
                          f"(all devices) or >= 1")
    if cfg.mesh.spatial < 1:
        raise ConfigError(f"{source.of('mesh.spatial')}: mesh.spatial = {cfg.mesh.spatial}: must "
                          f"be >= 1 (the devices that share each sample; 1 = data parallelism "
                          f"only)")
    if not cfg.data.raw_dir:
        raise ConfigError(f"{source.of('data.raw_dir')}: data.raw_dir is required: pass "
                          f"data.raw_dir=/path/to/DatasetXXX_Name (an nnU-Net raw folder)")
    if not cfg.train.run_dir:
        raise ConfigError(f"{source.of('train.run_dir')}: train.run_dir must not be empty")
    _check_plan_overrides(cfg.data.plan_overrides, source)


def _bounds(cfg: Config):
    """`(key, value, within bounds?, the bounds in words)` of the values a type cannot bound:
    beyond them training fails late (a traceback, a NaN blamed on optim.lr) or silently (a
    negative learning rate is gradient ascent)."""
    o, t, d = cfg.optim, cfg.train, cfg.data
    unit = "in [0, 1)"
    yield ("seed", cfg.seed, 0 <= cfg.seed <= 2**63 - 2,
           "an integer in [0, 2**63 - 2] (the data pipeline is seeded with seed + 1)")
    yield "optim.momentum", o.momentum, 0 <= o.momentum < 1, unit
    yield "optim.weight_decay", o.weight_decay, 0 <= o.weight_decay < 1, unit
    yield ("optim.cosine_eta_min", o.cosine_eta_min, o.cosine_eta_min >= 0,
           ">= 0 (the learning rate's floor; below 0 it would climb the loss)")
    yield "optim.poly_exponent", o.poly_exponent, o.poly_exponent >= 0, ">= 0"
    for key in ("onecycle_div_factor", "onecycle_final_div_factor"):
        value = getattr(o, key)
        yield (f"optim.{key}", value, value > 0,
               "> 0 (the learning rate is divided by it)")
    for i, beta in enumerate(o.onecycle_beta1):
        yield f"optim.onecycle_beta1[{i}]", beta, 0 <= beta < 1, unit
    yield ("train.memory_limit_gib", t.memory_limit_gib,
           t.memory_limit_gib is None or t.memory_limit_gib > 0,
           "> 0 GiB, or null for what the device reports")
    yield ("data.plans", repr(d.plans), d.plans is None or bool(d.plans.strip()),
           "the path of an nnUNetPlans.json, or null to plan from the dataset")


def _numbers(node: Any, prefix: str = ""):
    """`(dotted key, value)` of every number in a config (tuple entries as `key[i]`)."""
    if dataclasses.is_dataclass(node):
        for f in dataclasses.fields(node):
            yield from _numbers(getattr(node, f.name), f"{prefix}{f.name}.")
    elif isinstance(node, tuple):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix.rstrip('.')}[{i}]")
    elif isinstance(node, int | float) and not isinstance(node, bool):
        yield prefix.rstrip("."), node


def _positive_int(v: Any) -> bool:
    return type(v) is int and v >= 1


def _ints(n: int | None, ok=_positive_int):
    return lambda v: isinstance(v, list | tuple) and (n is None or len(v) == n) and all(
        ok(x) for x in v)


def _per_stage(entry):
    return lambda v: isinstance(v, list | tuple) and len(v) >= 1 and all(entry(x) for x in v)


#: Bounds of a patch and a batch (beyond them the data loader cannot even index the patches)
MAX_PATCH_VOXELS, MAX_BATCH = 2**27, 2**16

#: Plan fields `data.plan_overrides` may set (they change the network or the batches, not the
#: preprocessing), each with what its value must be and a check of it.
PLAN_OVERRIDES: dict[str, tuple[str, Any]] = {
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


def _check_plan_overrides(overrides: dict[str, Any], source: _Source) -> None:
    for name, value in overrides.items():
        key = f"data.plan_overrides.{name}"
        if name not in PLAN_OVERRIDES:
            raise ConfigError(f"{source.of(key)}: {key}: not overridable (choose from "
                              f"{', '.join(PLAN_OVERRIDES)}; preprocessing fields come from the "
                              f"plan)")
        expected, ok = PLAN_OVERRIDES[name]
        if not ok(value):
            raise ConfigError(f"{source.of(key)}: {key} = {value!r}: must be {expected}")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
