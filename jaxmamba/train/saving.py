"""A checkpoint save that fails says so in one line, and leaves no threads or loops behind.

Orbax saves in background threads, each running its writes in a fresh event loop. When a write
fails (a full disk, a folder that went away) every one of them logs the error with its
traceback (up to a hundred, with kilobytes of tensorstore specs), the loops close with reads
still pending ("Event loop is closed" when they complete), and the error reaches the training
loop as a bare `[Errno 28]` without a path. Around a `Checkpointer` (`quiet`): orbax's error
records are dropped (the error itself still reaches the loop, and `JAXMAMBA_DEBUG=1` keeps
them) and every new event loop settles its tasks before it closes
(`jaxmamba.rundir.settled_reads`). Around each save and wait (`failing_save`): a full disk
becomes a `DiskFullError` naming the folder, the bytes needed and free and the checkpoint kept,
another `OSError` a `RunDirError` naming the folder; `save_bytes` is what a checkpoint needs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import jax

from jaxmamba import peers
from jaxmamba.diskspace import full_error, is_disk_full
from jaxmamba.errors import brief
from jaxmamba.rundir import RunDirError, settled_reads

#: Room a save needs beyond its arrays (orbax's metadata, the data iterator's state, the meta)
_OVERHEAD_BYTES = 256 * 1024
_ORBAX = f"{os.sep}orbax{os.sep}"


def save_bytes(*trees) -> int:
    """Bytes of the arrays in `trees` as this process writes them, plus orbax's overhead."""
    total = 0
    for tree in trees:
        for leaf in jax.tree.leaves(tree):
            shards = getattr(leaf, "addressable_shards", None)
            if shards is not None:  # this process writes its replica-0 shards only
                total += sum(s.data.nbytes for s in shards if s.replica_id == 0)
            else:
                total += getattr(leaf, "nbytes", 0)
    return total + _OVERHEAD_BYTES


class _DropOrbaxErrors(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR or _ORBAX not in (record.pathname or "")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """While a checkpoint manager lives: orbax's error tracebacks dropped, event loops settled."""
    drop = None
    if os.environ.get("JAXMAMBA_DEBUG", "") in ("", "0"):
        drop = _DropOrbaxErrors()
        logging.getLogger("absl").addFilter(drop)
    try:
        with settled_reads():
            yield
    finally:
        if drop is not None:
            logging.getLogger("absl").removeFilter(drop)


@contextlib.contextmanager
def failing_save(folder: Path, what: str, needed: int | None, kept: str) -> Iterator[None]:
    """Turn a failed save of `what` into `folder` into one line (see the module docstring)."""
    try:
        yield
    except Exception as err:
        if peers.is_lost_peer(err):  # not the disk's fault: the process's end says it
            raise
        if is_disk_full(err, folder, needed):
            raise full_error(folder, what, needed, kept) from err
        if isinstance(err, OSError) or "orbax" in type(err).__module__:
            raise RunDirError(folder, f"saving {what} failed ({brief(err)})",
                              f"{kept}; run the same command again to resume from it"
                              if kept else None) from err
        raise
