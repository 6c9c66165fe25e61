"""`jaxmamba.rundir`: the names training and `convert-torch` write under, finding a checkpoint,
and errors that name the path, say what was expected and what to do."""

import asyncio
import pickle
import threading

import pytest
from conftest import tiny_plan

from jaxmamba import rundir
from jaxmamba.errors import UserError
from jaxmamba.plans import Plan
from jaxmamba.rundir import BEST, LATEST, PREEMPTED, RunDirError


def _plan(**changes) -> Plan:
    return tiny_plan(**{"spacing": (2.0, 1.0, 1.0), "labels": (("background", 0), ("a", 1)),
                        **changes})


def _steps(run_dir, which, *names):
    for name in names:
        (rundir.checkpoint_dir(run_dir, which) / name).mkdir(parents=True)


def test_layout_names():
    assert rundir.checkpoint_dir("r", LATEST).as_posix() == "r/checkpoints/latest"
    assert (BEST, PREEMPTED, rundir.CHECKPOINTS) == ("best", "preempted", ("latest", "best"))
    assert set(rundir.ITEMS) == {LATEST, BEST, PREEMPTED}
    assert (rundir.CONFIG_FILE, rundir.PLANS_FILE, rundir.DATASET_FILE) == (
        "config.yaml", "nnUNetPlans.json", "dataset.json")
    assert rundir.resumed_config_file(3) == "config.resumed-epoch3.yaml"
    assert set(rundir.PREDICTION_FIELDS) < set(rundir.NETWORK_FIELDS)


def test_steps_are_numeric_and_skip_temporaries(tmp_path):
    assert rundir.steps(tmp_path, LATEST) == []
    _steps(tmp_path, LATEST, "9", "10", "2", "11.orbax-checkpoint-tmp-5", "notes")
    assert rundir.steps(tmp_path, LATEST) == [2, 9, 10]


def test_find_checkpoint_prefers_latest_then_best(tmp_path):
    _plan().save(tmp_path / rundir.PLANS_FILE)
    _steps(tmp_path, BEST, "0")
    assert rundir.find_checkpoint(tmp_path) == BEST  # a converted run
    _steps(tmp_path, LATEST, "3")
    assert rundir.find_checkpoint(tmp_path) == LATEST
    assert rundir.find_checkpoint(tmp_path, BEST) == BEST


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such run directory; give a folder written by training"),
    ("no plans", "no nnUNetPlans.json, so this is not a jaxmamba run directory; training"),
    ("empty", "no latest or best checkpoint in {run}/checkpoints; has training completed"),
    ("only best", "no latest checkpoint in {run}/checkpoints; it has: best"),
    ("unknown", "no checkpoint 'final'; expected one of latest, best"),
])
def test_find_checkpoint_errors_name_the_run_directory(tmp_path, case, expected):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case not in ("missing", "no plans"):
        _plan().save(run / rundir.PLANS_FILE)
    if case == "only best":
        _steps(run, BEST, "0")
    with pytest.raises(RunDirError) as err:
        rundir.find_checkpoint(run, {"only best": LATEST, "unknown": "final"}.get(case))
    assert err.value.path == run and isinstance(err.value, UserError)
    assert str(err.value).startswith(f"{run}: " + expected.format(run=run))


def test_error_message_and_pickle(tmp_path):
    err = RunDirError(tmp_path / "r", "no checkpoint", "train first")
    assert str(err) == f"{tmp_path / 'r'}: no checkpoint; train first"
    assert str(RunDirError(tmp_path, "bad")) == f"{tmp_path}: bad"
    again = pickle.loads(pickle.dumps(err))  # e.g. across processes
    assert (str(again), again.path, again.hint) == (str(err), err.path, "train first")
    damaged = rundir.unreadable(tmp_path / "checkpoints" / BEST / "4", ValueError("x\ny"), "hint")
    assert str(damaged) == (f"{tmp_path / 'checkpoints' / 'best' / '4'}: the best checkpoint "
                            f"cannot be read, it is damaged or incomplete (ValueError: x); hint")


def _failed_restore() -> asyncio.Task:
    """What orbax does when one read of a damaged checkpoint fails: a fresh event loop runs a
    gather of reads until the first error, then closes; returns the read still in flight."""
    slow = []

    async def read(fails: bool):
        if fails:
            raise OSError("damaged")
        await asyncio.sleep(60)

    async def restore():
        slow.append(asyncio.ensure_future(read(False)))
        await asyncio.gather(slow[0], read(True))

    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(OSError, match="damaged"):
            loop.run_until_complete(restore())
    finally:
        loop.close()
    return slow[0]


def test_a_failed_read_leaves_nothing_pending():
    """`settled_reads`: the loop that orbax closes on the first error first cancels and awaits
    the other reads (left pending, they would raise when collected, failing a later test)."""
    policy = asyncio.get_event_loop_policy()
    left = _failed_restore()
    assert not left.done()  # the defect: pending on a closed loop
    left.get_coro().close()  # (what collecting it would do, now, not in a later test)
    with rundir.settled_reads():
        settled = _failed_restore()
    assert settled.cancelled()
    assert asyncio.get_event_loop_policy() is policy  # put back


def test_a_read_finishing_after_the_loop_closed_is_dropped():
    """tensorstore resolves an awaited read from its own thread through
    `loop.call_soon_threadsafe`; a read still running when the failed restore's loop closed
    finishes later into the closed loop, which raised "Event loop is closed" into that thread
    (an unraisable exception: test_damaged_checkpoint_is_one_line failed 1 run in 3)."""
    def finish_from_a_thread(loop) -> list[BaseException]:
        errors = []

        def finish():
            try:
                loop.call_soon_threadsafe(lambda: None)
            except RuntimeError as err:
                errors.append(err)

        thread = threading.Thread(target=finish)
        thread.start()
        thread.join()
        return errors

    plain = asyncio.new_event_loop()
    plain.close()
    assert [str(e) for e in finish_from_a_thread(plain)] == ["Event loop is closed"]  # the defect
    with rundir.settled_reads():
        loop = asyncio.new_event_loop()
    loop.close()
    assert finish_from_a_thread(loop) == []
    with rundir.settled_reads():
        settling = asyncio.new_event_loop()
    assert settling.call_soon_threadsafe(lambda: None) is not None  # open: scheduled as before
    settling.close()


def test_clean_stale_keeps_the_newest_step_only(tmp_path):
    """What kills leave: orbax temporaries (a killed save, of any checkpoint) and an older step
    (a killed deletion)."""
    _steps(tmp_path, LATEST, "1", "2", "3.orbax-checkpoint-tmp-1")
    _steps(tmp_path, BEST, "1")
    _steps(tmp_path, PREEMPTED, "5.orbax-checkpoint-tmp-3")
    (rundir.checkpoint_dir(tmp_path, LATEST) / "1" / "x").write_text("x")  # not empty
    removed = rundir.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == ["1", "3.orbax-checkpoint-tmp-1",
                                               "5.orbax-checkpoint-tmp-3"]
    assert (rundir.steps(tmp_path, LATEST), rundir.steps(tmp_path, BEST)) == ([2], [1])
    assert not any(rundir.checkpoint_dir(tmp_path, PREEMPTED).iterdir())


def test_plan_checks_name_the_file_and_the_field(tmp_path):
    _plan().save(tmp_path / rundir.PLANS_FILE)
    saved = Plan.load(tmp_path / rundir.PLANS_FILE)  # as a checkpoint's meta records it
    rundir.check_run_plan(tmp_path, saved)
    rundir.check_run_plan(tmp_path / "elsewhere", _plan(patch_size=(8, 8, 8)))  # no plans file
    recorded = saved.replace(patch_size=(8, 8, 16), source="ckpt/meta")
    with pytest.raises(RunDirError) as err:
        rundir.check_run_plan(tmp_path, recorded)
    assert err.value.path == tmp_path / rundir.PLANS_FILE
    assert "patch_size: plans file (8, 16, 16), checkpoint (8, 8, 16)" in str(err.value)
    assert "ckpt/meta" in str(err.value) and "restore the run's nnUNetPlans.json" in str(err.value)
    assert [k for k, *_ in rundir.plan_differences(_plan(), _plan(base_num_features=8))] == [
        "UNet_base_num_features"]


def test_an_ensemble_needs_one_plan(tmp_path):
    def run(name, plan):
        return rundir.LoadedRun(tmp_path / name, LATEST, tmp_path / name, "segmamba", plan,
                                None, 0)
    rundir.check_same_plan([run("a", _plan()), run("b", _plan(base_num_features=8))])
    with pytest.raises(RunDirError, match=r"b: its plan differs from .*a's \(spacing: "
                                          r"\(1.0, 1.0, 1.0\) vs \(2.0, 1.0, 1.0\)\); an "
                                          r"ensemble needs runs of one plan") as err:
        rundir.check_same_plan([run("a", _plan()), run("b", _plan(spacing=(1.0, 1.0, 1.0)))])
    assert err.value.path == tmp_path / "b"


def test_save_run_writes_the_layout_and_refuses_a_used_directory(tmp_path):
    from jaxmamba.models import build_model
    plan = _plan()
    out = rundir.save_run(tmp_path / "run", build_model("plainconvunet", plan, rngs=0), plan,
                          source="test")
    assert (out / rundir.PLANS_FILE).is_file() and (out / rundir.DATASET_FILE).is_file()
    assert rundir.steps(out, BEST) == [0] and rundir.find_checkpoint(out) == BEST
    loaded = rundir.load_run(out)
    assert (loaded.checkpoint, loaded.folder, loaded.variant, loaded.non_finite) == (
        BEST, rundir.checkpoint_dir(out, BEST) / "0", "plainconvunet", 0)
    with pytest.raises(RunDirError, match="already holds checkpoints; choose a new output") as err:
        rundir.save_run(out, loaded.model, plan, source="test")
    assert err.value.path == out


def test_a_run_keeps_its_mamba_precision(tmp_path):
    """A network with a bf16 Mamba path loads with one (prediction computes as training did)."""
    from flax import nnx

    from jaxmamba.layers import MambaOptions
    from jaxmamba.models import build_model
    plan = _plan()
    model = nnx.jit(lambda: build_model("segmamba", plan, rngs=0, mamba=MambaOptions(
        mamba_precision="bf16")))()
    loaded = rundir.load_run(rundir.save_run(tmp_path / "run", model, plan, source="test"))
    assert loaded.model.mamba_precision == "bf16"
    assert loaded.model.encoder.mamba_layers[0].mamba.mamba.options.mamba_precision == "bf16"
