"""Training's checkpoints: the train state through orbax `CheckpointManager`s, saved async
(README "Training").

The run directory's layout, names and errors are `jaxmamba.rundir`'s: `latest` every epoch with
params, train (optimizer state, step, non-parameter state), data (grain iterator state, one file
per process) and meta (JSON: the epoch, the step, the variant, the plan, checked on resume, and
the logger's history); `best` with params and meta by validation Dice; `preempted` as latest
when a signal stopped training mid-epoch. Orbax writes each checkpoint to a temporary directory
and renames it when complete, and deletes the previous `latest` only after that, so an
interrupted save keeps the last good checkpoint; `jaxmamba.rundir.clean_stale` removes what a
killed save or deletion leaves behind before the next run opens the folders.

On several processes each manager has its own barrier prefix: `latest` and `best` save the same
step in the same epoch, and orbax's barrier names are made of the step alone.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint

from jaxmamba.diskspace import check_room
from jaxmamba.rundir import (
    BEST,
    CHECKPOINTS_DIR,
    ITEMS,
    LATEST,
    PREEMPTED,
    RunDirError,
    settled_reads,
    unreadable,
)
from jaxmamba.train import saving


class IteratorSnapshot:
    """The state of a data iterator captured at save time, for grain's orbax handler.

    The handler may write after `save()` returns (async); the live iterator has moved on by then,
    so it gets this frozen copy. The handler json-dumps `get_state()` per process.
    """

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state)

    def start_prefetch(self) -> None:  # called by grain's handler after a restore
        pass


class Checkpointer:
    """`latest` every epoch and `best` by validation Dice, each keeping one checkpoint.

    `preempted/` exists only while it holds a checkpoint: its first save creates it and
    `drop_preempted` removes it."""

    def __init__(self, run_dir: str | Path, *, async_save: bool = True):
        self.dir = Path(run_dir).absolute() / CHECKPOINTS_DIR
        self._quiet = contextlib.ExitStack()  # until close(): one line for a failed save
        self._quiet.enter_context(saving.quiet())
        self._pending: tuple[str, int | None, str] | None = None  # the save in flight
        self.managers = {
            which: ocp.CheckpointManager(self.dir / which, item_names=items,
                                         options=ocp.CheckpointManagerOptions(
                                             max_to_keep=1, enable_async_checkpointing=async_save,
                                             create=which != PREEMPTED,
                                             multiprocessing_options=ocp.options.
                                             MultiprocessingOptions(
                                                 barrier_sync_key_prefix=f"jaxmamba_{which}")))
            for which, items in ITEMS.items()}

    def latest_epoch(self, which: str = LATEST) -> int | None:
        return self.managers[which].latest_step()

    def save(self, epoch: int, *, params, train, data_state: Any, meta: dict,
             best: bool) -> None:
        """Start an async save of `latest` (and `best`) for `epoch` completed epochs; refused
        first when the device has no room for it (`DiskFullError`)."""
        self.wait()  # the previous save's error, if any, is that save's
        needed = saving.save_bytes(params, train) + (saving.save_bytes(params) if best else 0)
        self._pending = (f"the checkpoint of epoch {epoch}", needed, self._kept())
        with self._saving():
            check_room(self.dir, *self._pending)
            self.managers[LATEST].save(epoch, args=_full_args(params, train, data_state, meta))
            if best:
                self.managers[BEST].save(epoch, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)))

    def save_preempted(self, step: int, *, params, train, data_state: Any, meta: dict) -> None:
        """Save the state at step `step`, inside an epoch, and wait until it is on disk."""
        self.wait()
        self._pending = (f"the checkpoint of step {step}", saving.save_bytes(params, train),
                         self._kept())
        with self._saving():
            check_room(self.dir, *self._pending)
            self.managers[PREEMPTED].save(step, args=_full_args(params, train, data_state, meta))
        self.wait()

    def _kept(self) -> str:
        epoch = self.latest_epoch()
        return (f"the checkpoint of epoch {epoch} ({self.dir / LATEST / str(epoch)}) is kept"
                if epoch is not None else "nothing was saved before")

    def _saving(self):
        what, needed, kept = self._pending or ("a checkpoint", None, "")
        return saving.failing_save(self.dir, what, needed, kept)

    def drop_preempted(self) -> None:
        """Remove the mid-epoch checkpoint once `latest` holds a later state (waits for it)."""
        manager = self.managers[PREEMPTED]
        if manager.latest_step() is not None:
            self.wait()
            for step in manager.all_steps():
                manager.delete(step)
            with contextlib.suppress(OSError):  # emptied; another process may have removed it
                (self.dir / PREEMPTED).rmdir()

    def read_meta(self, which: str = LATEST, epoch: int | None = None) -> dict:
        epoch = self.latest_epoch(which) if epoch is None else epoch
        if epoch is None:
            raise RunDirError(self.dir / which, "no checkpoint", "has training completed an epoch?")
        out = self._restore(which, epoch, meta=ocp.args.JsonRestore())
        return dict(out["meta"])

    def restore(self, abstract_params, abstract_train, *, which: str = LATEST,
                epoch: int | None = None, with_train: bool = True):
        """Restore `(params, train or None, data_state or None, meta)`.

        `abstract_*` are pytrees of `jax.ShapeDtypeStruct` (with shardings) or arrays giving
        the structure, shapes, dtypes and placement to restore into.
        """
        epoch = self.latest_epoch(which) if epoch is None else epoch
        if epoch is None:
            raise RunDirError(self.dir / which, "no checkpoint to restore",
                              "has training completed an epoch?")
        items = dict(params=ocp.args.StandardRestore(_abstract(abstract_params)),
                     meta=ocp.args.JsonRestore())
        if with_train and which in (LATEST, PREEMPTED):
            items.update(train=ocp.args.StandardRestore(_abstract(abstract_train)),
                         data=grain_checkpoint.CheckpointRestore(IteratorSnapshot()))
        out = self._restore(which, epoch, **items)
        data = out["data"].state if "data" in items else None
        train = _like(abstract_train, out["train"]) if "train" in items else None
        return _like(abstract_params, out["params"]), train, data, dict(out["meta"])

    def _restore(self, which: str, epoch: int, **items):
        try:
            with settled_reads():
                return self.managers[which].restore(epoch, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax/tensorstore raise many types for a damaged checkpoint
            raise unreadable(self.dir / which / str(epoch), err,
                             "move that folder away to train this run directory from scratch, "
                             "or choose a new train.run_dir") from err

    def wait(self) -> None:
        """Block until pending async saves are on disk (a failed one raises its one line)."""
        try:
            with self._saving():
                for m in self.managers.values():
                    m.wait_until_finished()
        finally:
            self._pending = None

    def close(self) -> None:
        try:
            with self._saving():
                for m in self.managers.values():
                    m.close()
        finally:
            self._pending = None
            self._quiet.close()


def _full_args(params, train, data_state, meta) -> ocp.args.Composite:
    return ocp.args.Composite(
        params=ocp.args.StandardSave(params), train=ocp.args.StandardSave(train),
        data=grain_checkpoint.CheckpointSave(IteratorSnapshot(copy.deepcopy(data_state))),
        meta=ocp.args.JsonSave(meta))


def _like(target, restored):
    """`restored` in the pytree structure of `target` (orbax returns NamedTuples as tuples)."""
    return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(restored))


def _abstract(tree):
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
    return jax.tree.map(leaf, tree)
