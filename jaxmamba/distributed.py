"""Several processes, one program (`jax.distributed`): joining, agreeing, and doing work once.

Every process runs the same command. Launch them with `JAX_COORDINATOR_ADDRESS=host:port`,
`JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` each (process 0 hosts the coordinator at that address;
`JAX_COORDINATOR_BIND_ADDRESS` changes where it listens), or with `srun` under SLURM, where JAX
reads `SLURM_*` itself. Processes that do not all join within `JAXMAMBA_JOIN_TIMEOUT` seconds
(default 300) end with a message naming the address, not a hang; a process lost later ends the
others with a line naming it (`jaxmamba.peers`), at the latest after
`JAXMAMBA_HEARTBEAT_TIMEOUT` seconds (default 100, JAX's heartbeat timeout).

After joining, the processes talk through the coordinator's key-value store (no XLA
computation): `agree` exchanges small JSON payloads (the resolved config, whose hash every
process compares at start-up), `run_once` lets process 0 do shared file work (building and
preprocessing the dataset, writing the run directory's config and plan) while the others wait for
its result or its error, and `barrier` waits for all. One process, no variables: all are no-ops.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax

from jaxmamba import compile_cache, peers
from jaxmamba.errors import UserError, brief

JOIN_TIMEOUT_ENV = "JAXMAMBA_JOIN_TIMEOUT"
#: Seconds without heartbeats after which JAX's coordinator declares a process lost (JAX's 100 by
#: default); every survivor then ends with a line naming it (`jaxmamba.peers`)
HEARTBEAT_TIMEOUT_ENV = "JAXMAMBA_HEARTBEAT_TIMEOUT"
#: How long a process waits for process 0's shared work or for the others at a barrier. Long on
#: purpose (preprocessing a large dataset takes hours): a process that dies is noticed sooner by
#: JAX's heartbeats, which end every process.
WAIT_S = 24 * 3600
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
               "SLURM_LOCALID")
_sequence = [0]  # calls of agree/run_once/barrier so far: the same on every process


class DistributedError(UserError, RuntimeError):
    """Processes that cannot work together; the message says which and what to do."""


class BackendError(UserError, RuntimeError):
    """JAX cannot start the backend it was asked for (JAX_PLATFORMS)."""


def initialize() -> None:
    """Join the other processes when launched as several (see the module docstring), then
    check that JAX can start its backend (`BackendError` in one line if not); several CPU
    processes on a JAX that deadlocks on cached executables compile everything
    (`compile_cache.off_for_cpu_processes`)."""
    if jax.distributed.is_initialized():
        return
    _join()
    try:
        jax.devices()
    except Exception as err:  # jax 0.10 raises a bare AssertionError for a missing plugin
        asked = os.environ.get("JAX_PLATFORMS")
        what = f"JAX_PLATFORMS={asked}: JAX cannot start that backend" if asked else \
            "JAX cannot start a backend"
        raise BackendError(f"{what} on this machine ({brief(err)}); install the jaxlib plugin "
                           f"it needs (e.g. pip install 'jax[cuda12]') or set JAX_PLATFORMS to "
                           f"a backend this machine has (cpu)") from err
    note = compile_cache.off_for_cpu_processes()
    if note and is_main():
        print(note, flush=True)


def _join() -> None:
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            n, i = int(env["JAX_NUM_PROCESSES"]), int(env["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as err:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID (integers) for every process too") from err
        if not 0 <= i < n:
            raise ValueError(f"JAX_PROCESS_ID={i}: must be 0..{n - 1} (JAX_NUM_PROCESSES={n})")
        where, kwargs = env["JAX_COORDINATOR_ADDRESS"], dict(num_processes=n, process_id=i)
    elif all(v in env for v in _SLURM_VARS) and int(env["SLURM_NTASKS"]) > 1:
        n, i, kwargs = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"]), {}
        where = f"the first node of {env['SLURM_STEP_NODELIST']} (SLURM)"
    else:
        return
    timeout = _join_timeout()
    # JAX aborts with a C++ stack dump when joining times out; this watchdog ends the process
    # first, with a message that says what to check.
    watchdog = threading.Timer(timeout, _join_failed, (where, i, n, timeout))
    watchdog.daemon = True
    watchdog.start()
    jax.distributed.initialize(initialization_timeout=int(timeout) + 60,
                               heartbeat_timeout_seconds=int(_seconds(HEARTBEAT_TIMEOUT_ENV,
                                                                      "100")), **kwargs)
    watchdog.cancel()
    from jax._src import distributed as jax_distributed
    peers.watch(i, n, jax_distributed.global_state.coordinator_address,
                agree("peers", {"host": socket.gethostname(), "pid": os.getpid()}))


def _join_timeout() -> float:
    return _seconds(JOIN_TIMEOUT_ENV, "300")


def _seconds(name: str, default: str) -> float:
    raw = os.environ.get(name, default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ValueError(f"{name}={raw}: expected a number of seconds > 0")
    return value


def _join_failed(where: str, i: int, n: int, timeout: float) -> None:
    hint = ""
    if i != 0 and ":" in where:
        host, port = where.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=2).close()
            hint = " (the coordinator answers: another process is missing)"
        except (OSError, ValueError):
            hint = (f" (nothing answers at {where}: is process 0 running there, and can this "
                    f"host reach it?)")
    print(f"error: process {i} of {n}: the {n} processes did not all join at {where} within "
          f"{timeout:.0f} s{hint}. Start all {n} with the same JAX_COORDINATOR_ADDRESS and "
          f"JAX_NUM_PROCESSES and JAX_PROCESS_ID 0..{n - 1} (process 0 hosts the coordinator), "
          f"or raise {JOIN_TIMEOUT_ENV}. Nothing was written.", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(1)


def is_main() -> bool:
    return jax.process_index() == 0


def process_prefix() -> str:
    """`"process i: "` on several processes, else `""` (for messages every process prints)."""
    return f"process {jax.process_index()}: " if jax.process_count() > 1 else ""


def leave_after_error() -> int:
    """For an `except` block around a command: on one process the error goes on as usual; on
    several its traceback is printed and the process leaves at once (see `leave`)."""
    if not jax.distributed.is_initialized():
        raise  # noqa: PLE0704 (the error being handled by the caller)
    lost = peers.lost_line(sys.exc_info()[1])
    if lost:  # one line, and no wait for the others at the leaving barrier: one is gone
        print(lost, file=sys.stderr)
        peers.flush()
        os._exit(1)
    traceback.print_exc()
    return leave(1)


def leave(status: int) -> int:
    """`status`, for `sys.exit`; on several processes a failing one ends at once instead: a
    normal exit would wait for the others at JAX's shutdown barrier (minutes), while its end
    lets them notice and stop."""
    if status and jax.distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        try:  # when all fail (a bad config, say) they meet here, so that process 0, which
            # hosts the coordinator, ends last: its end aborts any process still there
            _client().wait_at_barrier("jaxmamba/leaving", 10_000)
            if is_main():
                time.sleep(2)
        except Exception:  # noqa: BLE001 (the others are still working: leave alone)
            pass
        os._exit(status)
    return status


def _client():
    # The coordinator's key-value store, as orbax's multihost utilities use it.
    from jax._src import distributed
    return distributed.global_state.client


def _key(name: str) -> str:
    _sequence[0] += 1
    return f"jaxmamba/{_sequence[0]}/{name}"


def barrier(name: str, timeout_s: float = WAIT_S) -> None:
    """Wait until every process has come here."""
    if jax.process_count() == 1:
        return
    _client().wait_at_barrier(_key(name), int(timeout_s * 1000))


def agree(name: str, payload: Any, timeout_s: float = WAIT_S) -> list[Any]:
    """Every process's JSON-able `payload`, in process order."""
    if jax.process_count() == 1:
        return [payload]
    key, client = _key(name), _client()
    client.key_value_set(f"{key}/{jax.process_index()}", json.dumps(payload))
    return [json.loads(client.blocking_key_value_get(f"{key}/{p}", int(timeout_s * 1000)))
            for p in range(jax.process_count())]


def run_once(name: str, fn: Callable[[], Any], timeout_s: float = WAIT_S) -> Any:
    """`fn()` on process 0 only; the others wait for it. Returns its (JSON-able) result on every
    process; an error on process 0 is raised on every process (`DistributedError` on the others)
    so that all of them stop with the same message."""
    if jax.process_count() == 1:
        return fn()
    key, client = _key(name), _client()
    if is_main():
        try:
            result = fn()
        except Exception as err:
            client.key_value_set(key, json.dumps({"error": str(err)}))
            raise
        client.key_value_set(key, json.dumps({"result": result}))
        return result
    reply = json.loads(client.blocking_key_value_get(key, int(timeout_s * 1000)))
    if "error" in reply:
        raise DistributedError(f"process 0 failed ({name}): {reply['error']}")
    return reply["result"]


def config_hash(flat: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()[:12]


def check_same_config(config: dict[str, Any]) -> None:
    """Refuse to start when the processes resolved different configs, naming the keys."""
    flat = _flatten(config)
    mine = {"hash": config_hash(flat), "config": flat}
    every = agree("config", mine)
    if len({p["hash"] for p in every}) == 1:
        return
    keys = sorted({k for p in every for k in p["config"]}
                  - {k for k in flat if all(p["config"].get(k, object()) == flat[k]
                                            for p in every)})
    shown = "; ".join(f"{k}: " + ", ".join(f"process {i} {p['config'].get(k, '(unset)')!r}"
                                           for i, p in enumerate(every)) for k in keys[:5])
    raise DistributedError(
        f"the {len(every)} processes were started with different configs (hashes "
        f"{', '.join(p['hash'] for p in every)}); they differ in {', '.join(keys)} ({shown}). "
        f"Start every process with the same config file and overrides")


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def split(items: list, index: int | None = None, count: int | None = None) -> list:
    """This process's share of `items`: every `count`-th from `index` (round robin)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    return items[index::count]
