"""Run directories as prediction inputs (a run directory is self-contained).

Training's runs and `jaxmamba convert-torch` outputs share one layout (`jaxmamba.train.checkpoint`,
`jaxmamba.interop.checkpoint`): `nnUNetPlans.json` and `dataset.json` at the top, parameters and
a JSON `meta` (variant, plan) under `checkpoints/{latest,best}/<epoch>/`. This module checks a
run directory and says what is wrong with it; `jaxmamba.interop.checkpoint.load_run` restores it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from flax import nnx

from jaxmamba.errors import UserError, brief
from jaxmamba.plans import Plan

CHECKPOINTS = ("latest", "best")


class RunError(UserError, ValueError):
    """A run directory that cannot be predicted with; the message names it and says why."""


@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: str  # "latest" or "best"
    variant: str
    plan: Plan
    model: nnx.Module


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> str:
    """The checkpoint to predict with: `checkpoint` if given, else `latest` (the end of training,
    as nnU-Net's `checkpoint_final`) when present, else `best` (all a converted run holds)."""
    run_dir = Path(run_dir)
    if checkpoint not in (None, *CHECKPOINTS):
        raise RunError(f"checkpoint {checkpoint!r}: expected one of {CHECKPOINTS}")
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not (run_dir / "nnUNetPlans.json").is_file():
        raise RunError(f"{run_dir}: no nnUNetPlans.json, so this is not a jaxmamba run directory "
                       f"(training writes it at the start; `jaxmamba convert-torch` imports "
                       f"PyTorch checkpoints)")
    present = [c for c in CHECKPOINTS if (run_dir / "checkpoints" / c).is_dir() and any(
        p.name.isdigit() for p in (run_dir / "checkpoints" / c).iterdir())]
    if checkpoint is None and present:
        return present[0]
    if checkpoint not in present:
        hint = (f"; it has: {', '.join(present)}" if present
                else " (has training completed an epoch?)")
        raise RunError(f"{run_dir}: no {checkpoint or 'latest or best'} checkpoint in "
                       f"{run_dir / 'checkpoints'}{hint}")
    return checkpoint


def load_run(run_dir: str | Path, checkpoint: str | None = None, *,
             allow_non_finite: bool = False) -> LoadedRun:
    """The network and plan of `run_dir`'s checkpoint (see `find_checkpoint`).

    A checkpoint that cannot be read (damaged, half-copied) is a `RunError` naming its folder; one
    whose parameters hold NaN or inf is refused unless `allow_non_finite`.
    """
    from jaxmamba.interop.checkpoint import load_run as restore  # orbax: only when loading

    which = find_checkpoint(run_dir, checkpoint)
    folder = Path(run_dir) / "checkpoints" / which
    folder = max((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    other = [c for c in CHECKPOINTS if c != which and (Path(run_dir) / "checkpoints" / c).is_dir()]
    hint = f"; try --checkpoint {other[0]}" if other else ""
    try:
        model, plan = restore(run_dir, which=which)
    except UserError:  # the run directory's own problems (a plan that disagrees) say it all
        raise
    except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
        raise RunError(f"{folder}: the {which} checkpoint cannot be read, it is damaged or "
                       f"incomplete ({brief(err)}){hint}") from err
    bad = count_non_finite(nnx.state(model, nnx.Param))
    if bad and not allow_non_finite:
        raise RunError(f"{folder}: the {which} checkpoint holds {bad} non-finite parameter "
                       f"value(s) (NaN or inf), so its predictions would be meaningless{hint}, "
                       f"or retrain with a lower optim.lr (--allow-non-finite predicts anyway)")
    if bad:
        print(f"WARNING: {folder}: {bad} non-finite parameter value(s); predicting anyway "
              f"(--allow-non-finite)")
    return LoadedRun(Path(run_dir), which, model.variant, plan, model)


def count_non_finite(tree) -> int:
    """How many values of a pytree of arrays are NaN or inf (on the host)."""
    import jax
    import numpy as np

    return sum(int(np.size(a) - np.isfinite(np.asarray(a)).sum()) for a in jax.tree.leaves(tree))


def check_same_plan(runs: Sequence[LoadedRun]) -> None:
    """An ensemble needs one plan: same patch, spacing, channels, labels and normalisation."""
    fields = ("patch_size", "spacing", "channel_names", "labels", "normalization_schemes",
              "use_mask_for_norm", "foreground_intensity_properties", "resampling")
    first = runs[0]
    for run in runs[1:]:
        for f in fields:
            if getattr(run.plan, f) != getattr(first.plan, f):
                raise RunError(f"{run.run_dir} and {first.run_dir} have different plans ({f}: "
                               f"{getattr(run.plan, f)} vs {getattr(first.plan, f)}); an ensemble "
                               f"needs runs of one plan")
