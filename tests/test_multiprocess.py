"""Training and prediction as 2 real processes x 2 fake CPU devices on 127.0.0.1 (gloo), in a
clean environment, every launch under a deadline: what a multi-host user runs, end to end.

The reference runs are one process in this test process (4 fake CPU devices, tests/conftest.py).
"""

import json
import signal
import time

import jax
import nibabel as nib
import numpy as np
import pytest
from conftest import assert_close_to, build_phantom, check_reference, once_per_run
from flax import nnx
from launching import ROOT, launch, wait_for

from jaxmamba import compile_cache
from jaxmamba.config import load_config
from jaxmamba.data import fold_cases
from jaxmamba.ops.mesh import make_mesh
from jaxmamba.rundir import load_run
from jaxmamba.train import loop, validate

# one xdist worker for the module: its training fixture runs once, and no two gloo jobs compete
pytestmark = [pytest.mark.slow, pytest.mark.newest_jax, pytest.mark.xdist_group("multiprocess")]
#: seconds a launch may take before it counts as a hang (a 2 x 2 run took 82 s on a loaded
#: 2-core AMD EPYC VM, compiling everything)
LIMIT = 400


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return build_phantom(tmp_path_factory, "multi", n_cases=6)


def _args(setup, run_dir, *more):
    return ["train.py", "configs/tiny.yaml", f"data.raw_dir={setup / 'raw'}",
            f"data.preprocessed_dir={setup / 'cache'}", f"train.run_dir={run_dir}",
            "train.iters_per_epoch=2", "log.progress=false", "log.tensorboard=false",
            "log.plot=false", *more]


def _params(run_dir):
    model = load_run(run_dir, "latest").model
    return jax.tree.leaves(nnx.state(model, nnx.Param))


def _history(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_same_run(a, b):
    """Bit for bit: parameters and every logged loss and pseudo-Dice."""
    reference = _params(b)
    check_reference(reference)
    for x, y in zip(_params(a), reference, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    keys = ("step", "train_loss", "train_dice", "val_loss", "val_dice", "val_dice_ema", "best")
    assert [{k: r.get(k) for k in keys} for r in _history(a)] == \
        [{k: r.get(k) for k in keys} for r in _history(b)]


def _no_orbax_leftovers(run_dir):
    return not list(run_dir.glob("checkpoints/*/*orbax-checkpoint-tmp*"))


@pytest.fixture(scope="module")
def two_by_two(setup, tmp_path_factory):
    """The uninterrupted 2-process run: 2 epochs of 2 steps, final validation."""
    once_per_run(tmp_path_factory, "two_by_two")
    run_dir = setup / "runs" / "2x2"
    run = launch(_args(setup, run_dir), setup / "logs" / "2x2", cache_dir=setup / "xla")
    codes = run.wait(LIMIT)
    print(f"2 x 2 training run: {run.seconds():.0f} s")
    assert codes == [0, 0], run.output()
    return run_dir, run


def test_two_processes_train_validate_and_write_once(setup, two_by_two):
    run_dir, run = two_by_two
    # latest and best were saved in the same epoch (the first is always the best so far)
    assert _history(run_dir)[0]["best"] is True
    assert sorted(p.name for p in (run_dir / "checkpoints" / "latest").iterdir()) == ["2"]
    assert [p.name for p in (run_dir / "checkpoints" / "best").iterdir() if p.name.isdigit()]
    assert _no_orbax_leftovers(run_dir)
    # shared work and closing lines once, on process 0
    assert run.log(0).count("next: jaxmamba predict") == 1 and "next:" not in run.log(1)
    assert "building the phantom dataset" not in run.log(1)
    # the final validation, split over the processes, equals one process's of the same network
    results = json.loads((run_dir / "final_validation" / "results.json").read_text())
    assert results["epoch"] == 2
    assert (run_dir / "final_validation" / "validation" / "summary.json").is_file()
    loaded = load_run(run_dir, "latest")
    model, plan = loaded.model, loaded.plan
    _, val_ids = fold_cases(setup / "cache", 0)
    assert len(val_ids) == 2  # one per process
    alone = validate.final_validation(model, plan, setup / "raw", val_ids, setup / "alone",
                                      epoch=2, mesh=make_mesh(2),
                                      progress=False)
    assert alone == results["results"]


def test_one_process_of_four_devices_matches_two_of_two(setup, two_by_two):
    """The global patch stream and foreground oversampling do not depend on the process count:
    1 process x 4 devices computes what 2 x 2 do, up to float rounding of the reductions."""
    run_dir, _ = two_by_two
    cfg = load_config(ROOT / "configs" / "tiny.yaml", _args(setup, setup / "runs" / "1x4")[2:]
                      + ["train.final_validation=false"])
    one = loop.run(cfg)["history"]
    two = _history(run_dir)
    for a, b in zip(one, two, strict=True):
        assert_close_to(a["train_loss"], b["train_loss"], rtol=1e-5)
        assert_close_to(a["val_loss"], b["val_loss"], rtol=1e-5)
        assert_close_to(a["val_dice"], b["val_dice"], rtol=1e-4)


def test_kill_both_processes_and_restart_is_bit_exact(setup, two_by_two):
    run_dir = setup / "runs" / "killed"
    args = _args(setup, run_dir, "train.final_validation=false")
    run = launch(args, setup / "logs" / "killed", cache_dir=setup / "xla")
    wait_for(lambda: (run_dir / "checkpoints" / "latest" / "1").is_dir(), LIMIT, run,
             "the checkpoint of epoch 1")
    run.kill(signal.SIGKILL)
    # the cache holds the 2 x 2 run's programs: on JAX 0.12.1 process 0 hung in the first
    # all-reduce of the one it loaded, so such runs compile (jaxmamba/compile_cache.py)
    cache_off = jax.__version_info__ >= compile_cache.CPU_PROCESSES_DEADLOCK_FROM
    assert ("the compilation cache is off" in run.log(0)) == cache_off, run.log(0)
    again = launch(args, setup / "logs" / "killed-again", cache_dir=setup / "xla")
    assert again.wait(LIMIT) == [0, 0], again.output()
    print(f"restart after kill -9: {again.seconds():.0f} s")
    assert "resumed" in again.log(0)
    _assert_same_run(run_dir, two_by_two[0])
    assert _no_orbax_leftovers(run_dir)


def test_sigterm_saves_on_every_process_and_resumes_exactly(setup, two_by_two):
    """SLURM's preemption notice: SIGTERM to one process stops both at the same step, saved."""
    run_dir = setup / "runs" / "preempted"
    args = _args(setup, run_dir, "train.final_validation=false")
    run = launch(args, setup / "logs" / "preempted", cache_dir=setup / "xla")
    wait_for(lambda: "compiled the train step" in run.log(0), LIMIT, run, "training start")
    run.procs[1].send_signal(signal.SIGTERM)
    assert run.wait(LIMIT) == [143, 143], run.output()
    for i in range(2):
        assert f"process {i}: stopped by SIGTERM" in run.log(i) and "saved in" in run.log(i)
        assert "Traceback" not in run.log(i)
    again = launch(args, setup / "logs" / "preempted-again", cache_dir=setup / "xla")
    assert again.wait(LIMIT) == [0, 0], again.output()
    _assert_same_run(run_dir, two_by_two[0])
    assert not list((run_dir / "checkpoints" / "preempted").glob("[0-9]*"))


def test_predict_two_processes_under_slurm_equals_one_process(setup, two_by_two):
    """`srun` as SLURM starts it (simulated SLURM_* variables): the cases split over the two
    processes, and the outputs equal those of one process with as many devices bit for bit."""
    run_dir = two_by_two[0]
    common = ["-m", "jaxmamba.cli", "predict", "-m", str(run_dir), "-i",
              str(setup / "raw" / "imagesTr"), "--no-mirroring", "--save-probabilities"]
    two = launch([*common, "-o", str(setup / "pred2")], setup / "logs" / "predict",
                 cache_dir=setup / "xla", slurm=True)
    one = launch([*common, "-o", str(setup / "pred1")], setup / "logs" / "predict1",
                 cache_dir=setup / "xla", processes=1)
    assert two.wait(LIMIT) == [0, 0], two.output()
    print(f"2-process predict: {two.seconds():.0f} s")
    assert one.wait(LIMIT) == [0], one.output()
    assert "over 2 processes" in two.log(0) and "wrote 6 prediction(s)" in two.log(0)
    written = sorted((setup / "pred1").glob("*.nii.gz"))
    assert [p.name for p in written] == sorted(p.name for p in (setup / "pred2").glob("*.nii.gz"))
    assert len(written) == 6
    for p in written:
        a, b = nib.load(p), nib.load(setup / "pred2" / p.name)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
        np.testing.assert_array_equal(a.affine, b.affine)
        pa = np.load(p.with_name(p.name.replace(".nii.gz", ".npz")))["probabilities"]
        pb = np.load(setup / "pred2" / p.name.replace(".nii.gz", ".npz"))["probabilities"]
        check_reference(pb)
        np.testing.assert_array_equal(pa, pb)


def test_bad_launches_end_every_process_quickly_writing_nothing(setup):
    """A batch the devices cannot split, different configs, an unreachable coordinator and a
    process that never joins: a message on every process, exit 1, nothing in the run dir."""
    runs = setup / "runs"
    quick = {"JAXMAMBA_JOIN_TIMEOUT": "5"}
    cases = {
        "batch": (launch(_args(setup, runs / "batch6", "data.plan_overrides.batch_size=6"),
                         setup / "logs" / "batch6"), runs / "batch6",
                  "batch size 6 is not divisible by the 4 devices"),
        "configs": (launch(_args(setup, runs / "differ"), setup / "logs" / "differ",
                           extra_args={1: ["optim.lr=0.001"]}), runs / "differ",
                    "different configs (hashes"),
        "unreachable": (launch(_args(setup, runs / "alone1"), setup / "logs" / "alone1",
                               only=[1], env=quick), runs / "alone1", "nothing answers at"),
        "never joins": (launch(_args(setup, runs / "alone0"), setup / "logs" / "alone0",
                               only=[0], env=quick), runs / "alone0",
                        "did not all join at 127.0.0.1"),
    }
    for name, (run, run_dir, message) in cases.items():
        codes = run.wait(180)
        assert codes == [1] * len(run.procs), (name, run.output())
        for i in range(len(run.procs)):
            assert message in run.log(i), (name, run.output())
            assert "Traceback" not in run.log(i), (name, run.output())
        assert not run_dir.exists(), name
    assert "differ in optim.lr (optim.lr: process 0 None, process 1 0.001)" in \
        cases["configs"][0].log(1)


@pytest.mark.parametrize("when", ["starting", "training"])
def test_a_lost_process_ends_every_survivor_in_one_line(setup, request, when):
    """kill -9 of one process, while the run starts (data, initialisation, compiling: only the
    heartbeats notice) or mid-training (a collective fails, or the heartbeats): the other ends
    with exit status 1 and one `error:` line naming the lost process, whichever was lost.
    Process 0's coordinator goes with it and JAX's runtime aborts the survivor at once (after its
    own message); a lost process 1 is declared by a failed collective or after the heartbeat
    timeout (20 s here, 100 by default). Mid-training, the programs come from the compilation
    cache the 2 x 2 run filled."""
    for lost in (1, 0):
        survivor = 1 - lost
        run_dir = setup / "runs" / f"lost{lost}-{when}"
        if when == "starting":
            run = launch(_args(setup, run_dir), setup / "logs" / f"lost{lost}-{when}",
                         env={"JAXMAMBA_HEARTBEAT_TIMEOUT": "20"})
            wait_for(lambda d=run_dir: (d / "train.lock").is_file(), LIMIT, run,
                     "the run's lock")
        else:
            request.getfixturevalue("two_by_two")
            run = launch(_args(setup, run_dir, "train.iters_per_epoch=1000", "train.epochs=1",
                               "train.final_validation=false"),
                         setup / "logs" / f"lost{lost}-{when}", cache_dir=setup / "xla",
                         env={"JAXMAMBA_HEARTBEAT_TIMEOUT": "20"})
            wait_for(lambda r=run: "throughput:" in r.log(0), LIMIT, run, "training steps")
        run.procs[lost].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        try:
            assert run.procs[survivor].wait(timeout=90) == 1, run.output()
        finally:
            run.kill()
        print(f"{when}: process {lost} lost: process {survivor} ended "
              f"{time.monotonic() - killed:.1f} s later")
        said = run.log(survivor)
        errors = [line for line in said.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, said
        assert errors[0].startswith(f"error: process {survivor} of 2: lost process {lost} (pid "
                                    f"{run.procs[lost].pid} on host"), said
        assert "start them all again to resume from the last checkpoint" in errors[0]
        assert "Traceback" not in said, said


def test_a_second_set_of_processes_meets_the_lock(setup):
    """Process 0 takes the run directory's lock for all of its processes: a 2-process launch on
    a run directory another training holds ends on both processes, naming the holder."""
    import subprocess
    import sys

    from launching import clean_env

    run_dir = setup / "runs" / "held"
    hold = ("import sys, time\nfrom jaxmamba.runlock import RunLock\n"
            "print(RunLock(sys.argv[1]).acquire(), flush=True)\ntime.sleep(300)\n")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(run_dir)], stdout=subprocess.PIPE,
                              text=True, env=clean_env(1), cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "None"
        run = launch(_args(setup, run_dir), setup / "logs" / "held")
        assert run.wait(180) == [1, 1], run.output()
    finally:
        holder.kill()
        holder.wait(timeout=30)
        holder.stdout.close()
    said = f"another training run is writing this run directory: process {holder.pid} on host"
    assert f"error: {run_dir}: {said}" in run.log(0), run.output()
    assert f"process 0 failed (lock the run directory): {run_dir}: {said}" in run.log(1)
    assert "Traceback" not in run.log(0) + run.log(1)
    assert sorted(p.name for p in run_dir.iterdir()) == ["train.lock"]  # nothing else written
