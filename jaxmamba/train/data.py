"""The data of a training run: build the bundled dataset if asked, preprocess, plan, split.

`prepare_data(config)` does it all and returns `(plan, cache folder, train ids, val ids)`;
`apply_plan_overrides` applies `data.plan_overrides` to a plan, blaming the overrides for what
does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxmamba import console
from jaxmamba import data as jdata
from jaxmamba.config import PLAN_OVERRIDES, Config, ConfigError
from jaxmamba.plans import Plan, PlanError

#: Plan fields a config may override: they change the network or the batches, not preprocessing.
OVERRIDABLE = tuple(PLAN_OVERRIDES)


def apply_plan_overrides(plan: Plan, overrides: dict[str, Any]) -> Plan:
    """`plan` with `data.plan_overrides` applied; other keys, and overrides that do not fit the
    plan, are `ConfigError`s naming the overrides (not the plans file)."""
    for key in overrides:
        if key not in OVERRIDABLE:
            raise ConfigError(f"data.plan_overrides.{key}: not overridable (choose from "
                              f"{', '.join(OVERRIDABLE)}; preprocessing fields come from the plan)")
    def as_tuple(v):
        return tuple(as_tuple(x) for x in v) if isinstance(v, list | tuple) else v
    changes = {k: as_tuple(v) for k, v in overrides.items()}
    try:
        plan.replace(**changes, source="data.plan_overrides")  # validated, blamed on the overrides
    except PlanError as err:
        raise ConfigError(f"{err} (with the plan {plan.source})") from err
    return plan.replace(**changes)


def cache_dir(cfg: Config) -> Path:
    raw = Path(cfg.data.raw_dir)
    return Path(cfg.data.preprocessed_dir) if cfg.data.preprocessed_dir else raw.with_name(
        raw.name + "_preprocessed")


def prepare_data(cfg: Config, *, progress: bool = True, say: Callable[[str], None] | None = None):
    """Build (if asked), preprocess and split the dataset: `(plan, cache, train ids, val ids)`.
    `say` gets the one line said before a bundled dataset is built (default: none)."""
    raw = Path(cfg.data.raw_dir)
    if not (raw / "dataset.json").is_file():
        if cfg.data.build is None:
            raise FileNotFoundError(f"data.raw_dir = {raw}: no dataset.json there; give an nnU-Net "
                                    f"raw folder, or data.build=demo to build the demo dataset")
        from jaxmamba.datasets import build
        if say is not None:
            say(console.building_line(cfg.data.build, raw))
        build(cfg.data.build, raw)
    given = None
    if cfg.data.plans is not None:
        given = apply_plan_overrides(Plan.load(cfg.data.plans, raw / "dataset.json"),
                                     cfg.data.plan_overrides)
    cache = cache_dir(cfg)
    plan, errors = jdata.preprocess_dataset(raw, cache, given, num_workers=cfg.data.num_workers,
                                            progress=progress, say=say)
    if errors:
        raise jdata.DataError(f"{raw}: preprocessing failed for {len(errors)} case(s): "
                              + "; ".join(errors[:5]))
    plan = apply_plan_overrides(plan, cfg.data.plan_overrides)
    train_ids, val_ids = jdata.fold_cases(cache, cfg.data.fold)
    return plan, cache, train_ids, val_ids
