"""Typed run configuration: dataclasses, YAML loading, `key=value` overrides (DESIGN §7).

A config file is YAML whose keys mirror the dataclasses below; `base: other.yaml` (relative to the
file) merges the file onto another one first. Command-line overrides use dotted keys
(`optim.lr=1e-3`, `data.plan_overrides.patch_size=[32,32,32]`) and YAML values. Unknown keys, wrong
types and values outside a field's choices raise `ConfigError` naming the dotted key and the file.
Every run saves its resolved config (`Config.to_dict` / `save_config`) in its run directory.

Nothing here imports the rest of jaxmamba, so the schema can be read without JAX.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxmamba.atomic import write_text

VARIANTS = ("resencunet", "segmamba", "bisegmamba", "segmambaskip", "multisegmamba")
RECIPES = ("nnunet", "radam_cosine", "radam_onecycle")


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the dotted key."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the dataset lives and how it is planned, cached and split."""

    raw_dir: str = ""  # nnU-Net raw folder: dataset.json, imagesTr/, labelsTr/ (required)
    preprocessed_dir: str = ""  # preprocessing cache; "" = <raw_dir>_preprocessed
    plans: str | None = None  # nnUNetPlans.json to use; None = plan from the dataset fingerprint
    build: Literal["demo", "phantom"] | None = None  # build this dataset at raw_dir if it is absent
    fold: int = 0  # nnU-Net 5-fold split (splits_final.json), paper_spec §3.4
    num_workers: int = 0  # grain worker processes for training patches (0 = in-process)
    plan_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Plan fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    variant: Literal["resencunet", "segmamba", "bisegmamba", "segmambaskip", "multisegmamba"] = (
        "segmamba")
    precision: Literal["float32", "bf16"] = "float32"  # convolutions; Mamba always float32
    scan_implementation: Literal["reference", "xla", "pallas"] | None = None  # None = fastest


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Recipe and its hyper-parameters; defaults are the reference's (paper_spec §4.1–4.2)."""

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


@dataclasses.dataclass(frozen=True)
class LogConfig:
    progress: bool = True  # tqdm progress bar
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
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value, source="command line")
    return from_dict(raw, source=source)


def from_dict(raw: dict[str, Any], *, source: str = "<dict>") -> Config:
    """Validate a nested dictionary into a `Config`."""
    cfg = _build(Config, raw, prefix="", source=source)
    _check(cfg, source)
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


def _build(cls: type, raw: Any, *, prefix: str, source: str):
    where = prefix.rstrip(".") or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key {prefix}{unknown[0]} (valid keys in {where}: "
                          f"{', '.join(fields)})")
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, key=f"{prefix}{name}", source=source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, key: str, source: str) -> Any:
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
            f"{source}: {key} = {value!r}: expected {_describe(tp)}")
    if origin is Literal:
        if any(a == value and type(a) is type(value) for a in args):
            return value
        raise ConfigError(f"{source}: {key} = {value!r}: expected one of "
                          f"{', '.join(repr(a) for a in args)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{source}: {key} = {value!r}: expected null")
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a list ({_describe(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key=f"{key}[{i}]", source=source)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{source}: {key} = {value!r}: expected {len(args)} entries")
        return tuple(_coerce(a, v, key=f"{key}[{i}]", source=source)
                     for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} = {value!r}: expected a mapping")
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
    raise ConfigError(f"{source}: {key} = {value!r}: expected {_describe(tp)}")


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(cfg: Config, source: str) -> None:
    """Value checks that types cannot express."""
    t, o = cfg.train, cfg.optim
    positive = {"train.epochs": t.epochs, "train.iters_per_epoch": t.iters_per_epoch,
                "optim.cosine_t_max": o.cosine_t_max, "optim.clip_norm": o.clip_norm}
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{source}: {key} = {value}: must be > 0")
    nonneg = {"train.val_iters": t.val_iters, "data.fold": cfg.data.fold,
              "data.num_workers": cfg.data.num_workers, "optim.weight_decay": o.weight_decay}
    for key, value in nonneg.items():
        if value < 0:
            raise ConfigError(f"{source}: {key} = {value}: must be >= 0")
    if cfg.optim.lr is not None and cfg.optim.lr <= 0:
        raise ConfigError(f"{source}: optim.lr = {cfg.optim.lr}: must be > 0 (or null)")
    if not 0 < cfg.optim.onecycle_pct_start < 1:
        raise ConfigError(f"{source}: optim.onecycle_pct_start = {cfg.optim.onecycle_pct_start}: "
                          f"must be in (0, 1)")
    if cfg.mesh.data == 0 or cfg.mesh.data < -1:
        raise ConfigError(f"{source}: mesh.data = {cfg.mesh.data}: must be -1 (all devices) "
                          f"or >= 1")
    if cfg.mesh.spatial < 1:
        raise ConfigError(f"{source}: mesh.spatial = {cfg.mesh.spatial}: must be >= 1 (the "
                          f"devices that share each sample; 1 = data parallelism only)")
    if not cfg.data.raw_dir:
        raise ConfigError(f"{source}: data.raw_dir is required: pass data.raw_dir=/path/to/"
                          f"DatasetXXX_Name (an nnU-Net raw folder)")
    if not cfg.train.run_dir:
        raise ConfigError(f"{source}: train.run_dir must not be empty")


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
