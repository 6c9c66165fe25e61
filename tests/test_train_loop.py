"""The training loop end to end on synthetic phantoms (configs/tiny.yaml), on 4 fake CPU devices:
a two-step run and what it writes, exact resume, a non-finite loss, and bad input. Every run is
under `jax.transfer_guard("disallow")`: an implicit host/device copy in the loop fails its test."""

import json
import shutil

import numpy as np
import pytest
from conftest import TINY_CONFIG
from conftest import tiny_run_config as _cfg

from jaxmamba.config import ConfigError, load_config
from jaxmamba.plans import PlanError
from jaxmamba.rundir import RunDirError
from jaxmamba.train import loop
from jaxmamba.train.finite import NonFiniteLossError
from jaxmamba.train.preflight import DoesNotFitError


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """The runs here compile the same programs; a persistent cache makes the later ones loads."""
    import jax
    options = {"jax_compilation_cache_dir": str(tmp_path_factory.mktemp("xla_cache")),
               "jax_persistent_cache_min_compile_time_secs": 0.0,
               "jax_persistent_cache_min_entry_size_bytes": 0}
    before = {k: getattr(jax.config, k) for k in options}
    for k, v in options.items():
        jax.config.update(k, v)
    yield
    for k, v in before.items():
        jax.config.update(k, v)


def run(cfg, **kwargs):
    """`jaxmamba.train.loop.run` where every host/device copy must be explicit."""
    import jax
    with jax.transfer_guard("disallow"):
        return loop.run(cfg, **kwargs)


def _losses(history):
    return [(r["train_loss"], r["val_loss"], r["val_dice"]) for r in history]


@pytest.fixture(scope="module")
def uninterrupted(phantom):
    """Two epochs of one step each, without interruption."""
    run_dir = phantom / "runs" / "whole"
    return run_dir, run(_cfg(phantom, run_dir))


def test_two_step_run_writes_everything(uninterrupted):
    run_dir, summary = uninterrupted
    assert summary["step"] == 2 and len(summary["history"]) == 2
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1]
    assert all(np.isfinite(r["train_loss"]) and np.isfinite(r["val_loss"]) for r in lines)
    assert lines[0]["lr"] == pytest.approx(3e-4)
    assert (run_dir / "curves.png").stat().st_size > 1000
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (run_dir / "checkpoints" / "latest").iterdir()) == ["2"]
    assert list((run_dir / "checkpoints" / "best").iterdir())
    saved = load_config(run_dir / "config.yaml")
    assert saved.train.run_dir == str(run_dir) and saved.model.variant == "resencunet"
    assert (run_dir / "nnUNetPlans.json").is_file()
    # the sliding-window validation of the fold's whole validation cases at the end
    dice = summary["final_validation"]["validation"]
    assert set(dice) == {"ellipsoid", "box", "mean"} and 0 <= dice["mean"] <= 1
    assert (run_dir / "final_validation" / "validation" / "summary.json").is_file()


def test_resume_continues_bit_for_bit(phantom, uninterrupted, capsys):
    _, whole = uninterrupted
    run_dir = phantom / "runs" / "resumed"
    cfg = _cfg(phantom, run_dir, "train.final_validation=false")
    first = run(cfg, max_epochs=1)  # "interrupted" after epoch 1
    assert first["step"] == 1
    said = []
    second = run(cfg, say=said.append)  # resumes automatically
    assert second["step"] == 2
    assert said[0] == f"resumed {run_dir} at epoch 1 (step 1)"
    assert any(line.startswith("epoch 2: train loss ") for line in said), said
    assert capsys.readouterr().out == ""  # the library says its lines to `say`, never prints
    assert _losses(second["history"]) == _losses(whole["history"])  # exact, not approximate
    for a, b in zip(_leaves(second["state"].params), _leaves(whole["state"].params), strict=True):
        np.testing.assert_array_equal(a, b)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1]


def _leaves(tree):
    import jax
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_non_finite_loss_stops_and_keeps_checkpoint(phantom, uninterrupted):
    src, _ = uninterrupted
    run_dir = phantom / "runs" / "nan"
    shutil.copytree(src, run_dir)
    poisoned = phantom / "cache_nan"  # the same cache with NaN images
    shutil.copytree(phantom / "cache", poisoned)
    for f in poisoned.glob("3d_fullres/*.npy"):
        x = np.load(f)
        if x.dtype.kind == "f" and x.ndim == 4:
            np.save(f, np.full_like(x, np.nan))
    cfg = _cfg(phantom, run_dir, "train.epochs=3", f"data.preprocessed_dir={poisoned}")
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 3.*epoch 2 in.*"
                                                 r"jaxmamba check .*raw\)"):
        run(cfg)
    assert sorted(p.name for p in (run_dir / "checkpoints" / "latest").iterdir()) == ["2"]


@pytest.mark.slow
def test_non_finite_parameters_are_never_checkpointed(phantom, tmp_path):
    """lr 1e10: the loss of both steps of epoch 1 is finite (it is computed before the update),
    but the last update makes the parameters NaN; that state must not become a checkpoint, and
    the message must not call one good."""
    run_dir = tmp_path / "run"
    cfg = _cfg(phantom, run_dir, "optim.lr=1e10", "train.iters_per_epoch=2", "train.epochs=4",
               "train.final_validation=false")
    with pytest.raises(NonFiniteLossError, match=r"parameters or the optimizer state became "
                                                 r"non-finite .* in epoch 1 .*none written yet.*"
                                                 r"jaxmamba check .*raw"):
        run(cfg)
    latest = run_dir / "checkpoints" / "latest"
    assert not latest.exists() or not [p for p in latest.iterdir() if p.name.isdigit()]


def test_bad_input_is_refused_before_any_work(phantom, uninterrupted, tmp_path):
    src, _ = uninterrupted
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    with pytest.raises(RunDirError, match="train.resume=false"):
        run(_cfg(phantom, src, "train.resume=false"))
    with pytest.raises(RunDirError, match="variant 'resencunet'.*'segmamba'"):
        run(_cfg(phantom, src, "model.variant=segmamba"))
    with pytest.raises(RunDirError, match="data.num_workers=0, the config asks for 2"):
        run(_cfg(phantom, src, "data.num_workers=2"))
    with pytest.raises(RunDirError, match="another plan"):
        run(_cfg(phantom, src, "data.plan_overrides.base_num_features=2"))
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before
    with pytest.raises(RunDirError, match="no checkpoint to resume"):
        run(_cfg(phantom, tmp_path / "new", "train.resume=true"))
    with pytest.raises(ValueError, match="batch size 3 is not divisible by the 4 devices"):
        run(_cfg(phantom, tmp_path / "b3", "data.plan_overrides.batch_size=3"))
    with pytest.raises(FileNotFoundError, match="no dataset.json"):
        run(_cfg(phantom, tmp_path / "r", f"data.raw_dir={tmp_path / 'none'}", "data.build=null"))
    with pytest.raises(PlanError, match="missing.json: file not found"):
        run(_cfg(phantom, tmp_path / "p", f"data.plans={tmp_path / 'missing.json'}"))
    with pytest.raises(ValueError, match="data.plan_overrides.spacing: not overridable"):
        run(_cfg(phantom, tmp_path / "s", "data.plan_overrides.spacing=[1, 1, 1]"))
    with pytest.raises(DoesNotFitError, match="will not fit.*plan_overrides.batch_size=2, now 4"):
        run(_cfg(phantom, tmp_path / "m", "train.memory_limit_gib=0.000001"))
    with pytest.raises(ConfigError, match="model.variant = 'unet'"):
        _cfg(phantom, tmp_path / "v", "model.variant=unet")
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").rglob("*.json"))


@pytest.mark.slow
def test_plainconvunet_trains(phantom):
    """nnU-Net's default network through the same loop: one step lowers nothing to NaN and the
    checkpoint records the variant; the Hippocampus config selects it."""
    run_dir = phantom / "runs" / "plain"
    summary = run(_cfg(phantom, run_dir, "model.variant=plainconvunet", "train.epochs=1",
                       "train.final_validation=false", "log.tensorboard=false", "log.plot=false"))
    assert summary["step"] == 1 and np.isfinite(summary["history"][0]["train_loss"])
    assert load_config(run_dir / "config.yaml").model.variant == "plainconvunet"
    hippocampus = load_config(TINY_CONFIG.parent / "hippocampus" / "plainconvunet.yaml")
    assert hippocampus.model.variant == "plainconvunet" and hippocampus.optim.recipe == "nnunet"


def test_ctrl_c_in_final_validation_exits_cleanly_and_rerun_finishes_it(phantom, uninterrupted,
                                                                         monkeypatch):
    import os
    import signal
    import time

    from jaxmamba.train import validate
    from jaxmamba.train.signals import Stopped
    run_dir = phantom / "runs" / "ctrl-c-in-validation"
    cfg = _cfg(phantom, run_dir)
    real = validate.predict_cases

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)
        raise AssertionError("SIGINT did not stop the validation")

    monkeypatch.setattr(validate, "predict_cases", interrupted)
    with pytest.raises(Stopped) as stopped:
        run(cfg)
    assert stopped.value.status == 130
    assert "the last complete epoch (2) is saved" in str(stopped.value)
    assert validate.done(run_dir, 2) is None
    monkeypatch.setattr(validate, "predict_cases", real)
    again = run(cfg)  # used to say "nothing to do" and never validate
    assert again["final_validation"] == uninterrupted[1]["final_validation"]
    assert validate.done(run_dir, 2) == again["final_validation"]


def test_sigint_mid_epoch_saves_that_step_and_resumes_exactly(phantom, monkeypatch):
    import os
    import signal

    import jax

    from jaxmamba.train import epoch
    from jaxmamba.train.signals import Stopped
    opts = ("train.iters_per_epoch=3", "train.epochs=1", "train.final_validation=false")
    whole = run(_cfg(phantom, phantom / "runs" / "sigint-whole", *opts))
    run_dir = phantom / "runs" / "sigint"
    real = epoch.consume

    def consume(pending, *args, **kwargs):  # step 1's metrics are read while step 2 runs
        if pending[0] == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real(pending, *args, **kwargs)

    monkeypatch.setattr(epoch, "consume", consume)
    with pytest.raises(Stopped) as stopped:
        run(_cfg(phantom, run_dir, *opts))
    assert stopped.value.status == 130 and stopped.value.saved
    assert "at step 2 (2 of 3 steps of epoch 1)" in str(stopped.value)
    assert _checkpoint_steps(run_dir, "preempted") == ["2"]
    monkeypatch.setattr(epoch, "consume", real)
    resumed = run(_cfg(phantom, run_dir, *opts))
    assert _losses(resumed["history"]) == _losses(whole["history"])
    for a, b in zip(jax.tree.leaves(resumed["state"].params),
                    jax.tree.leaves(whole["state"].params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert _checkpoint_steps(run_dir, "preempted") == []


def _checkpoint_steps(run_dir, which):
    folder = run_dir / "checkpoints" / which
    return sorted(p.name for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
