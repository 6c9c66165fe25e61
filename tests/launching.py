"""Launching real jaxmamba processes for the multi-process tests: 127.0.0.1, CPU, a clean
environment, N processes of D fake CPU devices each, every launch under a timeout."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(devices: int, cache_dir: Path | None = None, **extra: str) -> dict[str, str]:
    """What a child gets: no variables of the test process (no pytest XLA_FLAGS, no SLURM_*) but
    its choice of XLA's fast compiles (tests/conftest.py)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_DISABLE_MOST_OPTIMIZATIONS": os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS", "0"),
           "JAXMAMBA_COMPILE_CACHE": str(cache_dir) if cache_dir is not None else "off"}
    if cache_dir is not None:  # the runs compile the same programs: later ones load them
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


@dataclass
class Launch:
    """Processes started together; `wait` bounds them by a deadline."""

    procs: list[subprocess.Popen]
    logs: list[Path]
    started: float

    def wait(self, timeout: float) -> list[int]:
        """Exit statuses; a process still running at the deadline is killed and fails."""
        deadline = self.started + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(deadline - time.monotonic(), 0.1)))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"processes still running after {timeout:.0f} s "
                                     f"(a hang):\n{self.output()}") from None
        return codes

    def kill(self, sig: int = 9) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(sig)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def log(self, i: int) -> str:
        return self.logs[i].read_text(errors="replace") if self.logs[i].is_file() else ""

    def output(self) -> str:
        return "\n".join(f"--- process {i}:\n{self.log(i)[-3000:]}" for i in range(len(self.procs)))

    def seconds(self) -> float:
        return time.monotonic() - self.started


def launch(args: list[str], log_dir: Path, *, processes: int = 2, devices: int = 2,
           cache_dir: Path | None = None, env: dict[str, str] | None = None,
           extra_args: dict[int, list[str]] | None = None, only: list[int] | None = None,
           slurm: bool = False) -> Launch:
    """Start `python ARGS...` as `processes` processes (JAX_COORDINATOR_ADDRESS variables, or
    simulated SLURM_* ones with `slurm=True`); `extra_args[i]` go to process i only; `only`
    starts some of them (the others never join)."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for i in (range(processes) if only is None else only):
        if slurm:
            dist = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_NTASKS": str(processes), "SLURM_PROCID": str(i),
                    "SLURM_LOCALID": str(i), "JAX_COORDINATOR_PORT": str(port)}
        elif processes > 1:
            dist = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                    "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i)}
        else:
            dist = {}
        child_env = clean_env(devices, cache_dir, **dist, **(env or {}))
        log = log_dir / f"process{i}.log"
        with open(log, "w") as f:
            command = [sys.executable, *args, *(extra_args or {}).get(i, [])]
            procs.append(subprocess.Popen(command, cwd=ROOT, env=child_env,
                                          stdout=f, stderr=subprocess.STDOUT))
        logs.append(log)
    return Launch(procs, logs, time.monotonic())


def wait_for(predicate, timeout: float, launch: Launch, what: str) -> None:
    """Poll until `predicate()`; fail (killing the launch) after `timeout` s or if it ended."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline or all(p.poll() is not None for p in launch.procs):
            launch.kill()
            raise AssertionError(f"never saw {what}:\n{launch.output()}")
        time.sleep(0.2)
