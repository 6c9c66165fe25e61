"""A full disk, said in one line: which folder, how many bytes were needed, how many are free.

Writers that know how much they are about to write (a checkpoint, a case's preprocessed arrays)
check the room first (`check_room`), and turn a write that fails for want of room anyway (another
writer filled the disk meanwhile) into the same error (`is_disk_full`, `full_error`): a
`DiskFullError` naming the folder, the bytes needed and the bytes free, and what was kept.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from jaxmamba.errors import UserError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_FULL_TEXTS = ("No space left on device", "Disk quot", "File too large", "os_error_code='28'",
               "os_error_code='122'")


class DiskFullError(UserError, OSError):
    """Not enough room on a device for what had to be written."""


def free_bytes(path: str | Path) -> int | None:
    """Bytes free for this user on the device of `path` (or of its nearest existing parent)."""
    path = Path(path).absolute()
    for folder in (path, *path.parents):
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def human(n: int | float | None) -> str:
    """`12.3 MB` (decimal units, as `df -H`), or `an unknown amount` for None."""
    if n is None:
        return "an unknown amount"
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # unreachable


def is_disk_full(err: BaseException | None, folder: str | Path | None = None,
                 needed: int | None = None) -> bool:
    """Whether `err` (or an error in its chain) is a write that found no room; with `folder` and
    `needed`, also a short write (`N requested and M written`, numpy's) where less than `needed`
    bytes are free there now."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, DiskFullError):
            return True
        if isinstance(err, OSError) and err.errno in _FULL_ERRNOS:
            return True
        text = str(err)
        if any(t in text for t in _FULL_TEXTS):
            return True
        if (folder is not None and needed is not None and "requested and" in text
                and "written" in text):
            free = free_bytes(folder)
            return free is not None and free < needed
        err = err.__cause__ or err.__context__
    return False


def full_error(folder: str | Path, what: str, needed: int | None, kept: str = "") -> DiskFullError:
    """`FOLDER: no space left on the device for WHAT: it needs about N, M are free; KEPT`."""
    free = free_bytes(folder)
    return DiskFullError(f"{folder}: no space left on the device for {what}: it needs about "
                         f"{human(needed)}, {human(free)} free" + (f"; {kept}" if kept else "")
                         + "; free some space (or choose another folder) and run the same "
                         "command again")


def check_room(folder: str | Path, what: str, needed: int, kept: str = "") -> None:
    """Refuse to start writing `needed` bytes under `folder` when fewer are free."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise full_error(folder, what, needed, kept)
