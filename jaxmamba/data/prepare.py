"""Whole-dataset preprocessing: raw folder → plan → cache → splits (`jaxmamba preprocess`).

The plan is, in order of preference: the one given (a `Plan` or an `nnUNetPlans.json`, used
unchanged), the one already in the cache folder, or a new one from the fingerprint. Cases run in
parallel with a progress bar; finished cases are skipped, so re-running resumes after a crash.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from tqdm import tqdm

from jaxmamba.atomic import remove_stale_temporaries
from jaxmamba.data.cache_check import redo_reason
from jaxmamba.data.dataset import RawDataset
from jaxmamba.data.fingerprint import extract_fingerprint, fingerprint_path
from jaxmamba.data.io import DataError, read_json, write_json
from jaxmamba.data.planner import plan_from_fingerprint
from jaxmamba.data.preprocess import CONFIG_DIR, plan_key, preprocess_to_cache
from jaxmamba.data.splits import load_or_create_splits
from jaxmamba.plans import Plan

PLANS_FILE = "nnUNetPlans.json"


def resolve_plan(dataset: RawDataset, cache: Path, plan: Plan | str | Path | None = None, *,
                 num_workers: int = 0, progress: bool = True) -> Plan:
    """The plan to preprocess with (see module docstring); saved to `cache/nnUNetPlans.json`."""
    if isinstance(plan, (str, Path)):
        _require_identity_transpose(Path(plan))
        plan = Plan.load(plan)
    elif plan is None and (cache / PLANS_FILE).is_file():
        plan = Plan.load(cache / PLANS_FILE)
    elif plan is None:
        fp = extract_fingerprint(dataset, num_workers=num_workers, progress=progress)
        write_json(fingerprint_path(cache), fp)
        plan = plan_from_fingerprint(fp, dataset.meta, name=dataset.root.resolve().name)
    if plan.channel_names != dataset.channel_names:
        raise DataError(f"{plan.source}: channels {list(plan.channel_names)} differ from "
                        f"{dataset.root / 'dataset.json'} {list(dataset.channel_names)}")
    if dict(plan.labels) != dataset.labels:
        raise DataError(f"{plan.source}: labels {dict(plan.labels)} differ from "
                        f"{dataset.root / 'dataset.json'} {dataset.labels}")
    if not _holds(cache / PLANS_FILE, plan):  # a read-only cache with this plan is used as is
        plan.save(cache / PLANS_FILE)
    return plan


def _holds(path: Path, plan: Plan) -> bool:
    """Whether `path` and the dataset.json beside it are what `plan.save(path)` would write."""
    plans, dataset = plan.to_nnunet()
    try:
        return (json.loads(path.read_text()) == json.loads(json.dumps(plans)) and
                json.loads(path.with_name("dataset.json").read_text())
                == json.loads(json.dumps(dataset)))
    except (OSError, ValueError):
        return False


def _require_identity_transpose(plans_file: Path) -> None:
    """nnU-Net may plan in a transposed axis order (`transpose_forward`); `Plan` does not carry
    it, so such a plans file would be misread: refuse it."""
    transpose = read_json(plans_file).get("transpose_forward", [0, 1, 2])
    if list(transpose) != [0, 1, 2]:
        raise DataError(f"{plans_file}: transpose_forward {transpose} is not supported (only "
                        f"[0, 1, 2]); re-plan with `jaxmamba plan`")


def preprocess_dataset(raw: str | Path, cache: str | Path, plan: Plan | str | Path | None = None,
                       *, num_workers: int = 0, progress: bool = True,
                       case_ids: list[str] | None = None,
                       say: Callable[[str], None] | None = None) -> tuple[Plan, list[str]]:
    """Preprocess every (or the listed) training case of `raw` into `cache`.

    Returns `(plan, errors)`; `errors` names each case that failed (the others are complete).
    Cases already in the cache are skipped unless their raw files changed or their arrays are
    damaged (`jaxmamba.data.cache_check`): `say` gets one line for each of those, which are
    redone. A full disk stops it (`jaxmamba.diskspace.DiskFullError`). Writes
    `splits_final.json` (5 folds, nnU-Net's seed) unless one exists, once no case fails.
    Stable API.
    """
    dataset = RawDataset.open(raw)
    cache = Path(cache)
    if not dataset.cases:
        raise DataError(f"{dataset.root / 'imagesTr'}: no training cases; run `jaxmamba check "
                        f"{dataset.root}`" + "".join(f"\n  {p}" for p in dataset.problems))
    remove_stale_temporaries(cache / CONFIG_DIR)
    cases = list(dataset.cases)
    if case_ids is not None:
        cases = [dataset.case(c) for c in case_ids]
    plan = resolve_plan(dataset, cache, plan, num_workers=num_workers, progress=progress)
    key = plan_key(plan)
    todo = []
    for c in cases:
        done, why = redo_reason(cache, c, key)
        if not done:
            todo.append(c)
        if why and say is not None:
            say(f"redoing {why}")
    errors = [p for p in dataset.problems]
    bar = tqdm(total=len(cases), initial=len(cases) - len(todo), desc="preprocess", unit="case",
               disable=not progress)
    if num_workers > 0 and len(todo) > 1:
        # spawn, not fork: the caller may hold JAX threads (fork would copy them mid-flight)
        with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn")) as pool:
            for err in pool.map(preprocess_to_cache, todo, [plan] * len(todo), [cache] * len(todo)):
                errors += [err] if err else []
                bar.update()
    else:
        for case in todo:
            err = preprocess_to_cache(case, plan, cache)
            errors += [err] if err else []
            bar.update()
    bar.close()
    done = [c.case_id for c in dataset.cases if redo_reason(cache, c, key)[0]]
    if len(done) >= 5 and not errors:  # a split over the cases that failed would hide them
        load_or_create_splits(cache, done)
    return plan, errors
