"""Run directories: the one layout that training writes and resumes, `jaxmamba convert-torch`
writes and exports, and `jaxmamba predict` reads (README "Training", "Predict and evaluate").

```
RUN_DIR/
  config.yaml                    the resolved config of a trained run (a resume with another
                                 config adds config.resumed-epoch<N>.yaml)
  nnUNetPlans.json, dataset.json the plan, nnU-Net field names (`jaxmamba.plans.Plan.load`); it
                                 names the network, so nnU-Net can rebuild it
  checkpoints/latest/<epoch>/    params, train (optimizer state, step, non-parameter state),
                                 data (grain iterator state, one file per process), meta (JSON)
  checkpoints/best/<epoch>/      params, meta: the epoch with the best EMA pseudo-Dice; a
                                 converted run holds only best/0
  checkpoints/preempted/<step>/  as latest, written when a signal stopped training mid-epoch
                                 (meta also holds the epoch's partial sums); removed once the
                                 epoch it belongs to is complete
  metrics.jsonl, curves.png, tensorboard/         what `jaxmamba.train.writers` writes
  training.json                  parameters, and per session the card, compiled train-step
                                 memory and compile time (`jaxmamba.train.record`)
  final_validation/<set>/, final_validation/results.json   `jaxmamba.train.validate`'s results
```
`<epoch>` counts completed epochs. `meta` holds the epoch, the variant, the plan
(`Plan.to_record`), and the network's other build arguments, the precisions: as `precision` and
`mamba_precision` (a converted run) or in the run's `config` (a trained run: `model.precision`,
`model.mamba_precision`; its meta also holds the step, the process count and the logger's
history); a run without `mamba_precision` computes its Mamba path in float32.

This module owns the names, finding a checkpoint (`find_checkpoint`, `steps`), a run's weights
with its plan and build arguments (`save_run`, `load_run`), the plan checks (`check_run_plan`,
`check_same_plan`), the cleanup after a killed save (`clean_stale`) and the one error,
`RunDirError`. The train state's orbax I/O (optimizer state, data iterator, async saves) is
`jaxmamba.train.checkpoint.Checkpointer`, which takes its names and errors from here.

The names, finding and errors need only the standard library and `jaxmamba.plans`, so the
commands' `--help` can use them without JAX; `save_run` and `load_run` import orbax and the
networks when called.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxmamba.errors import UserError, brief
from jaxmamba.plans import Plan

if TYPE_CHECKING:
    from jaxmamba.models.unet import UNet

CONFIG_FILE = "config.yaml"
PLANS_FILE, DATASET_FILE = "nnUNetPlans.json", "dataset.json"
METRICS_FILE, CURVES_FILE, TENSORBOARD_DIR = "metrics.jsonl", "curves.png", "tensorboard"
TRAINING_FILE = "training.json"
FINAL_VALIDATION_DIR, FINAL_VALIDATION_DONE = "final_validation", "results.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST, BEST, PREEMPTED = "latest", "best", "preempted"
#: The checkpoints a run is predicted with, in the order `find_checkpoint` prefers them.
CHECKPOINTS = (LATEST, BEST)
#: The orbax items of each checkpoint.
ITEMS = {LATEST: ("params", "train", "data", "meta"), BEST: ("params", "meta"),
         PREEMPTED: ("params", "train", "data", "meta")}
_ORBAX_TEMPORARY = ".orbax-checkpoint-tmp"

#: Plan fields that preprocessing and prediction depend on (an ensemble's runs must agree on
#: them), with their nnU-Net keys.
PREDICTION_FIELDS = {
    "patch_size": "patch_size", "spacing": "spacing",
    "normalization_schemes": "normalization_schemes", "use_mask_for_norm": "use_mask_for_norm",
    "channel_names": "dataset.json channel_names", "labels": "dataset.json labels",
    "foreground_intensity_properties": "foreground_intensity_properties_per_channel",
    "resampling": "resampling_fn_*_kwargs",
}
#: Plan fields a trained network and its preprocessing depend on, with their nnU-Net keys.
NETWORK_FIELDS = {
    **PREDICTION_FIELDS,
    "strides": "pool_op_kernel_sizes", "kernel_sizes": "conv_kernel_sizes",
    "n_blocks_encoder": "n_conv_per_stage_encoder", "n_blocks_decoder": "n_conv_per_stage_decoder",
    "base_num_features": "UNet_base_num_features", "max_num_features": "unet_max_num_features",
}


class RunDirError(UserError, ValueError):
    """A run directory (or a file or folder in it) that cannot be used as asked.

    `str(err)` is `"{path}: {problem}; {hint}"`: the path, what is wrong or what was expected,
    and what to do about it."""

    def __init__(self, path: str | Path, problem: str, hint: str | None = None):
        super().__init__(Path(path), problem, hint)
        self.path, self.problem, self.hint = Path(path), problem, hint

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" + (f"; {self.hint}" if self.hint else "")


def resumed_config_file(epoch: int) -> str:
    """The name of the config a run resumed at `epoch` with another config is saved under."""
    return f"config.resumed-epoch{epoch}.yaml"


def unreadable(folder: Path, err: BaseException, hint: str | None) -> RunDirError:
    """The error for a checkpoint folder that orbax or tensorstore cannot read."""
    return RunDirError(folder, f"the {folder.parent.name} checkpoint cannot be read, it is damaged "
                               f"or incomplete ({brief(err)})", hint)


class _SettlingLoop(asyncio.SelectorEventLoop):
    """An event loop that cancels and awaits its pending tasks before it closes."""

    def close(self) -> None:
        if not self.is_running() and not self.is_closed():
            pending = [task for task in asyncio.all_tasks(self) if not task.done()]
            for task in pending:
                task.cancel()
            if pending:  # return_exceptions: each task's error is retrieved, none is reported
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()

    def call_soon_threadsafe(self, callback, *args, context=None):
        """A read that finishes after the loop closed (tensorstore's thread resolving the future
        of a task cancelled by `close`) has nobody waiting for it: dropped, instead of raising
        "Event loop is closed" into that thread, which reports it as an unraisable exception."""
        try:
            return super().call_soon_threadsafe(callback, *args, context=context)
        except RuntimeError:
            if self.is_closed():
                return None
            raise


class _SettlingPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _SettlingLoop()


@contextlib.contextmanager
def settled_reads() -> Iterator[None]:
    """Orbax reads in a fresh event loop and closes it as soon as one read fails, leaving the
    other reads of a damaged checkpoint pending: their tensorstore reads later complete into the
    closed loop ("Event loop is closed") and their coroutines raise when collected, at any later
    point of the process. Within this context every new event loop cancels and awaits its
    pending tasks before it closes and drops what a read completes into it once closed, so a
    failed restore leaves nothing behind."""
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_SettlingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)


# ---------------------------------------------------------------------- finding
def checkpoint_dir(run_dir: str | Path, which: str) -> Path:
    """`RUN_DIR/checkpoints/<which>`, the folder of one orbax checkpoint manager."""
    return Path(run_dir) / CHECKPOINTS_DIR / which


def steps(run_dir: str | Path, which: str) -> list[int]:
    """The saved epochs (steps for `preempted`) of checkpoint `which`, oldest first."""
    folder = checkpoint_dir(run_dir, which)
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) \
        if folder.is_dir() else []


def find_checkpoint(run_dir: str | Path, checkpoint: str | None = None) -> str:
    """The checkpoint to predict with: `checkpoint` if given, else `latest` (the end of training,
    as nnU-Net's `checkpoint_final`) when present, else `best` (all a converted run holds)."""
    run_dir = Path(run_dir)
    if checkpoint not in (None, *CHECKPOINTS):
        raise RunDirError(run_dir, f"no checkpoint {checkpoint!r}",
                          f"expected one of {', '.join(CHECKPOINTS)}")
    if not run_dir.is_dir():
        raise RunDirError(run_dir, "no such run directory",
                          "give a folder written by training or by `jaxmamba convert-torch`")
    if not (run_dir / PLANS_FILE).is_file():
        raise RunDirError(run_dir, f"no {PLANS_FILE}, so this is not a jaxmamba run directory",
                          "training writes it at the start; `jaxmamba convert-torch` imports "
                          "PyTorch checkpoints")
    present = [c for c in CHECKPOINTS if steps(run_dir, c)]
    if checkpoint is None and present:
        return present[0]
    if checkpoint not in present:
        raise RunDirError(run_dir, f"no {checkpoint or 'latest or best'} checkpoint in "
                                   f"{run_dir / CHECKPOINTS_DIR}",
                          f"it has: {', '.join(present)}" if present
                          else "has training completed an epoch?")
    return checkpoint


def clean_stale(run_dir: str | Path) -> list[Path]:
    """Remove what killed saves and deletions leave in `RUN_DIR/checkpoints/*/`: orbax's
    temporary folders and every step but the newest (a half-deleted older checkpoint). Call on
    one process, before any checkpoint manager opens the folders; returns what was removed."""
    removed = []
    for folder in (checkpoint_dir(run_dir, w) for w in ITEMS):
        if not folder.is_dir():
            continue
        saved = sorted((p for p in folder.iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
        stale = [p for p in folder.iterdir() if _ORBAX_TEMPORARY in p.name] + saved[:-1]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ---------------------------------------------------------------------- plans
def plan_differences(expected: Plan, found: Plan, fields: dict[str, str] = NETWORK_FIELDS
                     ) -> list[tuple[str, Any, Any]]:
    """`(nnU-Net key, expected value, found value)` for each of `fields` that differs."""
    return [(key, getattr(expected, f), getattr(found, f)) for f, key in fields.items()
            if getattr(expected, f) != getattr(found, f)]


def check_run_plan(run_dir: str | Path, plan: Plan) -> None:
    """The run directory's `nnUNetPlans.json` must be the plan its checkpoint was made with."""
    path = Path(run_dir) / PLANS_FILE
    if not path.is_file():
        return
    differences = plan_differences(Plan.load(path), plan)
    if differences:
        raise RunDirError(path, f"disagrees with the plan its checkpoint records in {plan.source} ("
                                + "; ".join(f"{key}: plans file {a}, checkpoint {b}"
                                            for key, a, b in differences) + ")",
                          "restore the run's nnUNetPlans.json, or convert or train again with "
                          "the new plan")


# ---------------------------------------------------------------------- weights
@dataclasses.dataclass
class LoadedRun:
    run_dir: Path
    checkpoint: str  # "latest" or "best"
    folder: Path  # the checkpoint's step folder
    variant: str
    plan: Plan
    model: UNet
    non_finite: int  # NaN or inf parameter values (0 unless loaded with allow_non_finite)


def save_run(out_dir: str | Path, model: UNet, plan: Plan, *, source: str) -> Path:
    """Write `model`'s parameters, variant, precisions and plan as a new run directory (a `best`
    checkpoint of epoch 0, `source` recorded in its meta); returns its path."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxmamba.models import VARIANTS, canonical_variant

    out = Path(out_dir).absolute()
    if (out / CHECKPOINTS_DIR).exists():
        raise RunDirError(out, "already holds checkpoints", "choose a new output directory")
    # the plan names the network, so nnU-Net rebuilds this one from the run directory
    plan = plan.with_network(VARIANTS[canonical_variant(model.variant)].reference_name)
    plan.save(out / PLANS_FILE, out / DATASET_FILE)
    meta = {"epoch": 0, "variant": model.variant, "precision": model.precision,
            "mamba_precision": model.mamba_precision, "plan": plan.to_record(), "source": source}
    with ocp.CheckpointManager(checkpoint_dir(out, BEST), item_names=ITEMS[BEST],
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
            meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    return out


def load_run(run_dir: str | Path, checkpoint: str | None = None, *,
             allow_non_finite: bool = False) -> LoadedRun:
    """The network (parameters restored, on the first local device) and plan of `run_dir`'s
    checkpoint (see `find_checkpoint`): a trained or a converted run.

    A checkpoint that cannot be read (damaged, half-copied), whose plan disagrees with the run's
    `nnUNetPlans.json`, or whose parameters hold NaN or inf (unless `allow_non_finite`) is a
    `RunDirError` naming its folder.
    """
    from flax import nnx

    run_dir = Path(run_dir)
    which = find_checkpoint(run_dir, checkpoint)
    folder = checkpoint_dir(run_dir, which) / str(steps(run_dir, which)[-1])
    other = [c for c in CHECKPOINTS if c != which and steps(run_dir, c)]
    hint = f"try --checkpoint {other[0]}" if other else None
    try:
        with settled_reads():
            model, plan = _restore(folder)
    except UserError:  # the run directory's own problems (a plan that disagrees) say it all
        raise
    except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
        raise unreadable(folder, err, hint) from err
    bad = count_non_finite(nnx.state(model, nnx.Param))
    if bad and not allow_non_finite:
        raise RunDirError(folder, f"the {which} checkpoint holds {bad} non-finite parameter "
                                  f"value(s) (NaN or inf), so its predictions would be meaningless",
                          (f"{hint}, or " if hint else "")
                          + "retrain with a lower optim.lr (--allow-non-finite predicts anyway)")
    return LoadedRun(run_dir, which, folder, model.variant, plan, model, bad)


def _restore(folder: Path) -> tuple[UNet, Plan]:
    """The network and plan of one checkpoint step folder (`RUN_DIR/checkpoints/<which>/<n>`)."""
    import jax
    import orbax.checkpoint as ocp
    from flax import nnx

    from jaxmamba.layers import MambaOptions
    from jaxmamba.models import build_model

    step = int(folder.name)
    # params and meta: what every checkpoint holds
    with ocp.CheckpointManager(folder.parent.absolute(), item_names=ITEMS[BEST]) as manager:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        plan = Plan.from_record(meta["plan"], source=str(folder / "meta"))
        check_run_plan(folder.parents[2], plan)
        model_cfg = meta.get("config", {}).get("model", {})
        precision = meta.get("precision") or model_cfg.get("precision", "float32")
        # the Mamba blocks compute as they trained (runs written before the option: float32)
        mamba = MambaOptions(mamba_precision=meta.get("mamba_precision") or model_cfg.get(
            "mamba_precision", "float32"))
        model = nnx.eval_shape(lambda: build_model(meta["variant"], plan, precision=precision,
                                                   mamba=mamba))
        device = jax.sharding.make_single_device_sharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              nnx.state(model, nnx.Param))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
    nnx.update(model, params)
    return model, plan


def count_non_finite(tree) -> int:
    """How many values of a pytree of arrays are NaN or inf (on the host)."""
    import jax
    import numpy as np

    return sum(int(np.size(a) - np.isfinite(np.asarray(a)).sum()) for a in jax.tree.leaves(tree))


def check_same_plan(runs: Sequence[LoadedRun]) -> None:
    """An ensemble needs one plan: the same `PREDICTION_FIELDS` (patch, spacing, channels,
    labels, normalisation, resampling)."""
    first = runs[0]
    for run in runs[1:]:
        differences = plan_differences(first.plan, run.plan, PREDICTION_FIELDS)
        if differences:
            raise RunDirError(run.run_dir, f"its plan differs from {first.run_dir}'s ("
                              + "; ".join(f"{key}: {b} vs {a}" for key, a, b in differences)
                              + ")", "an ensemble needs runs of one plan")
