"""A peer process lost: every survivor of a multi-process command ends with one line naming it.

A process of a multi-process run can die at any moment (`kill -9`, a node lost, out of memory).
The survivors learn it in one of two ways, and both end them with exit status 1 and one line
`error: process i of n: lost process k ...`:

- inside a collective or a key-value exchange (gloo's "Connection closed by peer", the
  coordinator's UNAVAILABLE or DEADLINE_EXCEEDED): a Python exception, which
  `jaxmamba.distributed.leave_after_error` turns into the line (`lost_line`) instead of a
  traceback. During training this comes within seconds;
- from JAX's coordination service, which ends every process with `LOG(FATAL)` and `abort()` when
  the process hosting it (process 0) is gone, or when another one missed its heartbeats for
  JAX's heartbeat timeout (100 s), whatever the survivors are doing. `watch` installs a C-level
  SIGABRT handler that writes the line and exits with status 1 instead of a core-dumping abort;
  JAX's own message, with its C++ stack, comes before it (it is written before the abort).

Which process was lost is found, at that moment, from what the processes told each other at
start-up (host and process id; `watch`): a peer on this host whose process is gone, process 0 when
its coordinator no longer answers, or the only other process of two. JAX's
`missed_heartbeat_callback` would be the tidier hook, but jaxlib 0.10-0.12 cannot pass its status
to Python (`std::bad_cast`, then `terminate`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys

_PEER_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                 "Socket closed", "Failed to send RPC to coordination service",
                 "stopped sending heartbeats", "coordination service has stopped",
                 "leader task was preempted", "Gloo", "UNAVAILABLE", "DEADLINE_EXCEEDED")
_state: dict = {}  # this process, the process count, the coordinator, the peers' host and pid
_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


def watch(index: int, count: int, coordinator: str | None, peers: list[dict]) -> None:
    """Remember who the processes are (`peers[k]`: `{"host", "pid"}` of process k) and end
    this process with the lost-process line when JAX's runtime aborts it."""
    _state.update(index=index, count=count, coordinator=coordinator, peers=peers)
    if "handler" in _state or not hasattr(signal, "SIGABRT"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.signal.restype = ctypes.c_void_p
        libc.signal.argtypes = [ctypes.c_int, _HANDLER]
    except (OSError, AttributeError):  # no C library to ask: JAX's abort stays as it is
        return
    _state["handler"] = _HANDLER(_on_abort)  # kept: the C library holds only a pointer to it
    libc.signal(signal.SIGABRT, _state["handler"])


def _on_abort(signum: int) -> None:
    os.write(2, ("\n" + line(None) + "\n").encode(errors="replace"))
    os._exit(1)


def is_lost_peer(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) says that a peer process is gone."""
    if not _state or _state.get("count", 1) < 2:
        return False
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        text = str(err)
        if any(marker in text for marker in _PEER_MARKERS):
            return True
        err = err.__cause__ or err.__context__
    return False


def lost_line(err: BaseException) -> str | None:
    """The one line for an exception that says a peer process is gone, else None."""
    return line(err) if is_lost_peer(err) else None


def line(err: BaseException | None) -> str:
    """`error: process i of n: lost process k (...)`: what is known of who was lost, and of the
    error that told (None: JAX's runtime aborted this process)."""
    i, n = _state.get("index", "?"), _state.get("count", "?")
    lost = lost_processes()
    if lost:
        who = ("lost process " if len(lost) == 1 else "lost processes ") + ", ".join(
            str(k) for k in lost) + _describe(lost)
    elif err is None:
        who = "JAX's runtime ended this process (its message is above; a lost peer, most likely)"
    else:
        who = "lost a peer process"
    cause = f" ({_first_line(err)})" if err is not None else ""
    return (f"error: process {i} of {n}: {who}{cause}. The run cannot go on without every "
            f"process: start them all again to resume from the last checkpoint")


def lost_processes() -> list[int]:
    """The peers that are gone, as far as this process can tell."""
    i, n = _state.get("index"), _state.get("count", 1)
    peers = _state.get("peers") or []
    host = socket.gethostname()
    gone = [k for k, p in enumerate(peers)
            if k != i and p.get("host") == host and not _alive(p.get("pid"))]
    if gone:
        return gone
    if i != 0 and not _coordinator_answers():
        return [0]
    if n == 2 and i in (0, 1):
        return [1 - i]
    return []


def _describe(lost: list[int]) -> str:
    peers = _state.get("peers") or []
    parts = []
    for k in lost:
        p = peers[k] if k < len(peers) else {}
        where = f"pid {p.get('pid', '?')} on host {p.get('host', '?')}"
        if k == 0 and _state.get("coordinator"):
            where += f", hosting the coordinator at {_state['coordinator']}"
        parts.append(where)
    return " (" + "; ".join(parts) + ")"


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed, not yet reaped by its parent) is gone too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _coordinator_answers() -> bool:
    where = _state.get("coordinator") or ""
    host, _, port = where.rpartition(":")
    if not host or not port.isdigit():
        return True  # unknown (SLURM): cannot tell
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
        return True
    except OSError:
        return False


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0]
    text = text if len(text) <= 200 else text[:200] + " ..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
