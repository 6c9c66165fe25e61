"""The data of a training run: build the bundled dataset if asked, preprocess, plan, split.

`prepare_data(config)` does it all and returns `(plan, cache folder, train ids, val ids)`;
`apply_plan_overrides` applies `data.plan_overrides` to a plan (`Plan.with_overrides` decides),
blaming the overrides for what does not fit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxmamba import console
from jaxmamba import data as jdata
from jaxmamba.config import Config, ConfigError
from jaxmamba.data.planner import preprocessed_beside
from jaxmamba.plans import Plan, PlanError


def apply_plan_overrides(plan: Plan, overrides: dict[str, Any]) -> Plan:
    """`plan.with_overrides(overrides)`; what the plan refuses is a `ConfigError` (a config
    error) naming the overrides and the plan they were applied to."""
    try:
        return plan.with_overrides(overrides)
    except PlanError as err:
        raise ConfigError(f"{err} (with the plan {plan.source})") from err


def cache_dir(cfg: Config) -> Path:
    raw = Path(cfg.data.raw_dir)
    return (Path(cfg.data.preprocessed_dir) if cfg.data.preprocessed_dir
            else preprocessed_beside(raw))


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
