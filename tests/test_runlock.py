"""One writer per run directory (`jaxmamba.runlock`): a second writer is refused naming the
holder, a dead holder's lock (kill -9) is taken over with a note, a clean end leaves nothing, and
a run directory inside the dataset or its cache is refused before it is created. The holders are
real processes; the end-to-end test runs `train.py` three times on one run directory."""

import errno
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import TINY_CONFIG
from launching import ROOT, clean_env

from jaxmamba.cli import main
from jaxmamba.runlock import LOCK_FILE, RunLock, RunLockError

HOLD = ("import sys, time\n"
        "from jaxmamba.runlock import RunLock\n"
        "lock = RunLock(sys.argv[1])\n"
        "print(lock.acquire(), flush=True)\n"
        "time.sleep(120)\n")


def _holder(run_dir):
    """A real process holding `run_dir`'s lock (it says so on its first line)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True, env=clean_env(1), cwd=ROOT)
    assert proc.stdout.readline().strip() == "None"  # taken, nothing taken over
    return proc


def _kill(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()


def test_a_second_writer_is_refused_and_a_dead_holders_lock_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        record = json.loads((run_dir / LOCK_FILE).read_text())
        assert record["pid"] == holder.pid and record["host"] == socket.gethostname()
        with pytest.raises(RunLockError) as refused:
            RunLock(run_dir).acquire()
        message = str(refused.value)
        assert "\n" not in message
        assert f"another training run is writing this run directory: process {holder.pid} on " \
               f"host {socket.gethostname()}, started 20" in message
        assert str(run_dir / LOCK_FILE) in message and "choose another train.run_dir" in message
    finally:
        _kill(holder)
    # kill -9 left the file; the kernel dropped the lock with the process
    assert (run_dir / LOCK_FILE).is_file()
    lock = RunLock(run_dir)
    note = lock.acquire()
    assert f"took over the lock of process {holder.pid} on host" in note and "is gone" in note
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run_dir / LOCK_FILE).exists() and run_dir.is_dir()  # the folder was there before


def test_a_lock_that_made_the_run_directory_removes_it_when_nothing_was_written(tmp_path):
    lock = RunLock(tmp_path / "a" / "run")
    assert lock.acquire() is None
    lock.release()
    assert not (tmp_path / "a" / "run").exists()
    lock = RunLock(tmp_path / "b")
    lock.acquire()
    (tmp_path / "b" / "config.yaml").write_text("x")
    lock.release()
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["config.yaml"]


def test_without_record_locks_the_holders_record_decides(tmp_path, monkeypatch):
    """A filesystem without POSIX record locks (some cluster filesystems): a live holder on this
    host or one on another host is refused (with the file to delete), a dead one taken over."""
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    monkeypatch.setattr(fcntl, "lockf", no_locks)
    try:
        with pytest.raises(RunLockError, match=f"process {holder.pid} .*if that process is gone, "
                                               f"delete {run_dir / LOCK_FILE}"):
            RunLock(run_dir).acquire()
    finally:
        _kill(holder)
    record = json.loads((run_dir / LOCK_FILE).read_text())
    note = RunLock(run_dir).acquire()
    assert f"process {holder.pid}" in note and "is gone" in note
    (run_dir / LOCK_FILE).write_text(json.dumps({**record, "host": "elsewhere", "pid": 1}))
    with pytest.raises(RunLockError, match="process 1 on host elsewhere"):
        RunLock(run_dir).acquire()


@pytest.mark.parametrize("inside", ["raw", "raw/runs/a", "cache", "cache/3d_fullres/x"])
def test_a_run_directory_in_the_data_is_refused_before_it_is_made(phantom, inside, capsys):
    """At the raw folder training would rewrite its dataset.json, at the cache its plan."""
    before = {p: p.read_bytes() for p in phantom.rglob("*.json")}
    run_dir = phantom / inside
    capsys.readouterr()
    rc = main(["train", str(TINY_CONFIG), f"data.raw_dir={phantom / 'raw'}",
               f"data.preprocessed_dir={phantom / 'cache'}", f"train.run_dir={run_dir}",
               "log.progress=false"])
    out = capsys.readouterr()
    where = "data.raw_dir" if inside.startswith("raw") else "the preprocessing cache"
    assert rc == 2 and out.err.count("\n") == 1, out
    assert out.err.startswith(f"error: train.run_dir = {run_dir} is") and where in out.err
    assert "give train.run_dir a folder outside it" in out.err
    assert {p: p.read_bytes() for p in phantom.rglob("*.json")} == before
    assert not list(phantom.rglob(LOCK_FILE))
    if "/" in inside:
        assert not run_dir.exists()


def _train(run_dir, phantom, log, *more):
    args = [sys.executable, str(ROOT / "train.py"), str(TINY_CONFIG),
            f"data.raw_dir={phantom / 'raw'}", f"data.preprocessed_dir={phantom / 'cache'}",
            f"train.run_dir={run_dir}", "log.progress=false", "log.tensorboard=false",
            "log.plot=false", "train.final_validation=false", *more]
    with open(log, "w") as f:
        return subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=clean_env(1, phantom / "xla"))


def _wait_for(predicate, proc, seconds, what, log):
    deadline = time.monotonic() + seconds
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"never saw {what}:\n{log.read_text()}")
        time.sleep(0.2)


@pytest.mark.slow
def test_two_train_py_on_one_run_directory(phantom, tmp_path):
    """A runs; B on the same run directory is refused in one line naming A and leaves A's
    in-flight save alone; A is killed with -9; C takes its lock over, cleans what A left, trains
    to the end (exit 0) and leaves no lock behind. Every process bounded by a deadline."""
    run_dir = tmp_path / "run"
    logs = {k: tmp_path / f"{k}.log" for k in "ABC"}
    a = _train(run_dir, phantom, logs["A"], "train.iters_per_epoch=100000")
    try:
        _wait_for(lambda: "compiled the train step" in logs["A"].read_text(), a, 300,
                  "A compiling", logs["A"])
        in_flight = run_dir / "checkpoints" / "latest" / "99.orbax-checkpoint-tmp-0"
        in_flight.mkdir(parents=True)  # as if A were saving now
        b = _train(run_dir, phantom, logs["B"])
        assert b.wait(timeout=120) == 1
        said = logs["B"].read_text()
        assert said.startswith(f"error: {run_dir}: another training run is writing this run "
                               f"directory: process {a.pid} on host {socket.gethostname()}"), said
        assert said.count("\n") == 1 and "Traceback" not in said
        assert in_flight.is_dir() and a.poll() is None
    finally:
        a.kill()
        a.wait(timeout=60)
    c = _train(run_dir, phantom, logs["C"])
    try:
        assert c.wait(timeout=300) == 0, logs["C"].read_text()
    finally:
        c.kill()
    said = logs["C"].read_text()
    assert f"took over the lock of process {a.pid} on host" in said, said
    assert not in_flight.exists() and not (run_dir / LOCK_FILE).exists()
    epochs = [json.loads(x)["epoch"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]  # one writer: no epoch twice


def test_the_holder_cleans_what_a_killed_save_left_also_on_a_fresh_start(tmp_path):
    """A half-written `preempted` save of a run killed before its first epoch: the next run
    starts fresh (no checkpoint to resume) and still removes it, under the lock."""
    from jaxmamba.runlock import held

    left = tmp_path / "run" / "checkpoints" / "preempted" / "7.orbax-checkpoint-tmp-12"
    left.mkdir(parents=True)
    said = []
    with held(tmp_path / "run", said.append):
        assert not left.exists() and (tmp_path / "run" / LOCK_FILE).is_file()
    assert said == [] and not (tmp_path / "run" / LOCK_FILE).exists()
