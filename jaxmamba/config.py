"""Typed run configuration: the schema (dataclasses), loading with `key=value` overrides, and the
value checks that types cannot express (configs/README.md).

A config file is YAML whose keys mirror the dataclasses below; `base: other.yaml` (relative to the
file) merges the file onto another one first. Command-line overrides use dotted keys
(`optim.lr=1e-3`, `data.plan_overrides.patch_size=[32,32,32]`) and YAML values. Unknown keys, wrong
types, non-finite numbers and values outside a field's choices raise `ConfigError` naming the
dotted key and where its value came from (the file, or the command line for an override).
Every run saves its resolved config (`Config.to_dict` / `save_config`) in its run directory.

The YAML engine is `jaxmamba.typed_yaml`; the choices are `jaxmamba.choices`'; what a plan
override may be is `jaxmamba.plans`'. Nothing here imports JAX, so the schema reads without it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxmamba.atomic import write_text
from jaxmamba.choices import (
    DEFAULT_REMAT,
    BundledDataset,
    MambaPrecision,
    Precision,
    Recipe,
    Remat,
    ScanImplementation,
    Variant,
)
from jaxmamba.plans import override_problem
from jaxmamba.typed_yaml import (
    ConfigError,
    Source,
    build,
    numbers,
    parse_override,
    plain,
    read_yaml,
    set_dotted,
)

__all__ = ["Config", "ConfigError", "DataConfig", "LogConfig", "MeshConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "from_dict", "load_config", "save_config",
           "saved_config_differs"]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the dataset lives and how it is planned, cached and split."""

    raw_dir: str = ""  # nnU-Net raw folder: dataset.json, imagesTr/, labelsTr/ (required)
    preprocessed_dir: str = ""  # preprocessing cache; "" = <raw_dir>_preprocessed
    plans: str | None = None  # nnUNetPlans.json to use; None = plan from the dataset fingerprint
    build: BundledDataset | None = None  # build this dataset at raw_dir if it is absent
    #: nnU-Net 5-fold split (splits_final.json), nnunetv2 `generate_crossval_split`; "all"
    #: trains on every case (nnU-Net's fold `all`), with no validation
    fold: int | Literal["all"] = 0
    num_workers: int = 0  # grain worker processes for training patches (0 = in-process)
    plan_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # Plan fields


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network; the fields named as `jaxmamba.layers.options.MambaOptions`'s are its options
    (the choices of each are `jaxmamba.choices`')."""

    variant: Variant = "segmamba"
    precision: Precision = "float32"  # convolutions and norms (Mamba: mamba_precision)
    scan_implementation: ScanImplementation | None = None  # None = fastest
    # what the Mamba layers keep for the backward (jaxmamba.layers.remat): "none" everything,
    # "scan" the scan's output and chunk states, "states" only the chunk states (least memory)
    remat: Remat = DEFAULT_REMAT
    # the Mamba block's computation: "float32" throughout (the reference's SegMamba, BiSegMamba,
    # SegMambaSkip), "bf16" projections, causal conv and scan inputs with float32 state and sums
    # (as the reference's MultiSegMamba runs under fp16 autocast)
    mamba_precision: MambaPrecision = "float32"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Recipe and its hyper-parameters; defaults are the reference's (configs/README.md)."""

    recipe: Recipe = "nnunet"
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
        return plain(dataclasses.asdict(self))


# ---------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                ) -> Config:
    """Read a YAML config (or the defaults when `path` is None) and apply `key=value` overrides."""
    raw: dict[str, Any] = {} if path is None else read_yaml(Path(path))
    source = str(path) if path is not None else "<defaults>"
    keys = []
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value, source="command line")
        keys.append(key)
    return from_dict(raw, source=source, command_line=keys)


def from_dict(raw: dict[str, Any], *, source: str = "<dict>",
              command_line: list[str] | tuple[str, ...] = ()) -> Config:
    """Validate a nested dictionary into a `Config`; errors in the keys of `command_line` (the
    dotted keys of the overrides) are blamed on the command line, the others on `source`."""
    where = Source(source, tuple(command_line))
    cfg = build(Config, raw, source=where)
    _check(cfg, where)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def saved_config_differs(cfg: Config, path: str | Path) -> bool:
    """Whether the YAML file `path` (a run's saved config) holds another config than `cfg`."""
    return cfg.to_dict() != yaml.safe_load(Path(path).read_text())


# ---------------------------------------------------------------------- value checks
def _check(cfg: Config, source: Source) -> None:
    """Value checks that types cannot express."""
    for key, value in numbers(cfg):
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
    for name, value in cfg.data.plan_overrides.items():  # early: before any preprocessing
        key = f"data.plan_overrides.{name}"
        if problem := override_problem(name, value):
            raise ConfigError(f"{source.of(key)}: {key}{problem}")


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
