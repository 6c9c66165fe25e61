"""One writer per run directory: the lock training takes before it touches a run directory.

`RUN_DIR/train.lock` holds who writes the run directory (host, process id, start time, the
command's process count) and is locked with a POSIX record lock (`fcntl.lockf`) for as long as
that process lives. The kernel drops the record lock when the process ends in any way, `kill -9`
included, so a second `train.py` on the same run directory meets a held lock and is refused in
one line naming the holder, while a lock file left by a dead process is taken over, with a note
naming that process. A clean end removes the file (and the run directory, if the lock made it and
nothing else was written). Record locks are per process (a forked data worker does not inherit
them) and work across hosts on NFS; on a filesystem without them the holder's record decides:
a dead process on this host is stale, one on another host is refused with the file to delete.
POSIX drops a process's record lock when it closes any descriptor of the file, so nothing but
`RunLock` opens `train.lock` in the holding process.

On several processes (`jaxmamba.distributed`) process 0 takes the lock for all of them and the
others wait for its answer: a refusal ends every process with the same line. Everything that
cleans or writes the run directory comes after the lock (README "Training").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from jaxmamba import rundir
from jaxmamba.config import ConfigError
from jaxmamba.errors import UserError
from jaxmamba.paths import check_apart

LOCK_FILE = "train.lock"
#: errnos of a filesystem without POSIX record locks
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class RunLockError(UserError, RuntimeError):
    """Another process writes the run directory; the message names it and what to do."""


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot; None where /proc cannot say)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(holder: dict) -> bool:
    """Whether the process a lock record names still runs (only answerable on its host)."""
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    ticks = _start_ticks(pid)  # the same pid, but a later process?
    return ticks is None or holder.get("start_ticks") in (None, ticks)


def describe(holder: dict) -> str:
    """`process 123 on host h (started 2026-12-07 10:00:00)`, from a lock record."""
    started = holder.get("started")
    when = (time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
            if isinstance(started, int | float) else "at an unknown time")
    count = holder.get("processes", 1)
    of = f" (process 0 of {count})" if isinstance(count, int) and count > 1 else ""
    return (f"process {holder.get('pid', '?')}{of} on host {holder.get('host', '?')}, "
            f"started {when}")


class RunLock:
    """The lock of one run directory: `acquire()` takes it or raises `RunLockError`,
    `release()` gives it back."""

    def __init__(self, run_dir: str | Path, processes: int = 1):
        self.run_dir = Path(run_dir).absolute()
        self.path = self.run_dir / LOCK_FILE
        self.processes = processes
        self.fd: int | None = None
        self.made_dir = False

    def acquire(self) -> str | None:
        """Take the lock; returns a note when a dead process's lock was taken over."""
        self.made_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # a holder may remove the file between our open and our lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                locked = self._lock(fd)
                same = _same_file(fd, self.path)
            except BaseException:
                os.close(fd)
                raise
            if same:
                break
            os.close(fd)
        else:
            raise RunLockError(f"{self.path}: could not lock it (it was replaced 10 times "
                               f"while locking); is another training run starting here?")
        try:
            previous = _read(fd)
            if previous and not locked and (previous.get("host") != socket.gethostname()
                                            or _alive(previous)):
                raise self._refusal(previous, checked=False)
            record = {"host": socket.gethostname(), "pid": os.getpid(),
                      "start_ticks": _start_ticks(os.getpid()), "started": time.time(),
                      "processes": self.processes}
            data = (json.dumps(record) + "\n").encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        if previous:
            return (f"{self.run_dir}: took over the lock of {describe(previous)}, which is "
                    f"gone (it was killed or lost its host); cleaning what it left")
        return None

    def _lock(self, fd: int) -> bool:
        """Lock `fd`: True when locked, False on a filesystem without record locks; a lock
        held by a live process raises the refusal."""
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                raise self._refusal(_read(fd), checked=True) from None
            if err.errno in _NO_LOCKS:
                return False
            raise

    def _refusal(self, holder: dict, checked: bool) -> RunLockError:
        who = describe(holder) if holder else "a process that has not yet written its name"
        hint = ("wait for it to finish or stop it (Ctrl-C or SIGTERM saves first), or choose "
                "another train.run_dir")
        if not checked:  # no record locks here: the record's word, which may be stale
            hint += f"; if that process is gone, delete {self.path}"
        return RunLockError(f"{self.run_dir}: another training run is writing this run "
                            f"directory: {who} (lock {self.path}); {hint}")

    def release(self) -> None:
        """Remove the lock file and unlock; the run directory goes too when the lock made it
        and nothing else is in it (a launch refused before any work)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self.fd, self.path):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None
        if self.made_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only when empty


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict:
    """The lock record in `fd` ({} when empty or not a record: a holder killed while writing)."""
    try:
        text = os.pread(fd, 4096, 0).decode(errors="replace")
        record = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


@contextlib.contextmanager
def held(run_dir: str | Path, say: Callable[[str], None], *,
         inputs: Mapping[str, str | Path] | None = None) -> Iterator[RunLock]:
    """Hold `run_dir`'s lock for the block: taken by process 0 for every process of the
    command (the others get its refusal as theirs), then what killed saves left in
    `checkpoints/` is removed (`jaxmamba.rundir.clean_stale`): only the holder cleans. Released
    when the block ends. A run directory equal to or inside one of `inputs` (config key ->
    folder: the dataset, its cache) is refused first (`ConfigError`), before it is created."""
    import jax

    from jaxmamba import distributed

    check_apart(run_dir, "train.run_dir", inputs or {}, error=ConfigError)
    lock = RunLock(run_dir, processes=jax.process_count())

    def take() -> str | None:
        note = lock.acquire()
        rundir.clean_stale(lock.run_dir)
        return note

    try:
        note = distributed.run_once("lock the run directory", take)
        if note:
            say(note)
        yield lock
    finally:
        lock.release()
