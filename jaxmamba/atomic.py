"""Atomic writes: a file appears under its final name complete or not at all.

Every module that writes results (plans, configs, caches, checkpoints' side files, predictions,
summaries, plots) writes through `atomic_path`, so an interrupted run never leaves a truncated file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed onto it when the block succeeds, removed otherwise.

    The temporary name keeps the suffix (`.nii.gz` included), so writers that pick the format from
    the file name (nibabel, matplotlib) behave as for the final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    suffix = ".nii.gz" if name.endswith(".nii.gz") else path.suffix
    tmp = path.with_name(f".{name[: len(name) - len(suffix)]}.tmp{os.getpid()}{suffix}")
    # the name matches _TEMPORARY: a kill -9 leaves it, and remove_stale_temporaries finds it
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


_TEMPORARY = re.compile(r"^\..+\.tmp(\d+)(\.[A-Za-z0-9.]*)?$")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries of `atomic_path` in `folder` whose writing process is gone (a
    `kill -9` mid-write leaves them); returns what was removed. Hidden names, so listings skip
    them; a temporary of a live process is left alone."""
    folder = Path(folder)
    removed = []
    for f in sorted(folder.iterdir()) if folder.is_dir() else ():
        m = _TEMPORARY.match(f.name)
        if m and f.is_file() and not process_alive(int(m.group(1))):
            f.unlink(missing_ok=True)
            removed.append(f)
    return removed


def process_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process does; another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def write_text(path: str | Path, text: str) -> None:
    """`Path.write_text`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
