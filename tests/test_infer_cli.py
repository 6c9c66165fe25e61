"""`jaxmamba predict` from a run directory in the training format, then `jaxmamba evaluate`."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import assert_close_to, check_reference, tiny_plan
from flax import nnx

from jaxmamba.cli import main
from jaxmamba.infer.network import network_apply_fn
from jaxmamba.models import build_model
from jaxmamba.rundir import RunDirError, find_checkpoint, load_run, save_run
from jaxmamba.train.checkpoint import Checkpointer


def _plan():
    return tiny_plan(spacing=(2.0, 1.0, 1.0))


def _plan_dict(plan):
    plans, dataset = plan.to_nnunet()
    return {"plans": plans, "dataset": dataset}


def _make_run(run_dir, seed, variant="resencunet", nan=False):
    """A run directory as training leaves it, with perturbed (non-initial) parameters (with
    `nan`, one of them NaN)."""
    plan = _plan()
    plan.save(run_dir / "nnUNetPlans.json")
    model = build_model(variant, plan, rngs=seed)
    _, params, _ = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda x: jnp.asarray(
        np.asarray(x) + 0.05 * np.sin(np.arange(x.size).reshape(x.shape)), x.dtype), params)
    if nan:
        leaves, tree = jax.tree.flatten(params)
        params = jax.tree.unflatten(tree, [leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan),
                                           *leaves[1:]])
    ckpt = Checkpointer(run_dir, async_save=False)
    ckpt.save(3, params=params, train={"step": jnp.zeros((), jnp.int32)}, data_state=None,
              meta={"epoch": 3, "variant": variant, "plan": _plan_dict(plan),
                    "config": {"model": {"variant": variant, "precision": "float32"}}},
              best=True)
    ckpt.wait()
    ckpt.close()
    return plan, params


@pytest.fixture
def setup(tmp_path):
    rng = np.random.default_rng(5)
    for d in ("in", "gt"):
        (tmp_path / d).mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for i in range(2):
        image = rng.normal(size=(20, 18, 9)).astype(np.float32) + 3.0
        labels = np.zeros((20, 18, 9), np.uint8)
        labels[4:14, 3:12, 2:7] = 1 + i
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "in" / f"c{i}_0000.nii.gz")
        nib.save(nib.Nifti1Image(labels, affine), tmp_path / "gt" / f"c{i}.nii.gz")
    return tmp_path


def test_load_run_restores_the_saved_parameters(tmp_path):
    plan, params = _make_run(tmp_path / "run", seed=1)
    loaded = load_run(tmp_path / "run", "best")
    assert (loaded.variant, loaded.plan.patch_size) == ("resencunet", (8, 16, 16))
    assert find_checkpoint(tmp_path / "run") == "latest"
    _, got, _ = nnx.split(loaded.model, nnx.Param, ...)
    assert jax.tree.structure(got) == jax.tree.structure(params)
    check_reference(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the network predicts the full-resolution logits only
    x = np.random.default_rng(0).normal(size=(2, *plan.patch_size, 1)).astype(np.float32)
    logits = network_apply_fn(loaded.model)(x)
    assert logits.shape == (2, *plan.patch_size, 3) and np.isfinite(logits).all()


def test_converted_run_predicts_without_options(tmp_path):
    plan = _plan()
    model = build_model("resencunet", plan, rngs=4)
    save_run(tmp_path / "converted", model, plan, source="test")
    loaded = load_run(tmp_path / "converted")
    assert loaded.checkpoint == "best" and loaded.plan.labels == plan.labels
    x = np.random.default_rng(1).normal(size=(1, *plan.patch_size, 1)).astype(np.float32)
    model.set_deep_supervision(False)
    assert_close_to(network_apply_fn(loaded.model)(x), model(jnp.asarray(x))[0],
                    rtol=1e-5, atol=1e-5)


def test_predict_then_evaluate(setup, capsys, monkeypatch):
    root = setup
    import jaxmamba.infer.predict as predict_module
    previews = []  # the legend's class names come from the run's plan
    real_save_preview = predict_module.save_preview
    monkeypatch.setattr(predict_module, "save_preview", lambda path, labels, **kw: (
        previews.append(kw["class_names"]), real_save_preview(path, labels, **kw)))
    _make_run(root / "run0", seed=1)
    _make_run(root / "run1", seed=2)
    args = ["predict", "-m", str(root / "run0"), str(root / "run1"), "-i", str(root / "in"),
            "-o", str(root / "out"), "--mirror-axes", "2", "--save-probabilities", "--preview"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wrote 2 prediction(s)" in out and "jaxmamba evaluate" in out
    for i in range(2):
        pred = nib.load(root / "out" / f"c{i}.nii.gz")
        assert pred.shape == (20, 18, 9)
        np.testing.assert_allclose(pred.affine, np.diag([1.0, 1.0, 2.0, 1.0]))
        assert np.load(root / "out" / f"c{i}.npz")["probabilities"].shape == (3, 9, 18, 20)
        assert (root / "out" / "previews" / f"c{i}.png").read_bytes()[:4] == b"\x89PNG"
    assert previews == [{0: "background", 1: "a", 2: "b"}] * 2
    assert main(args) == 0
    assert "skipped 2 case(s)" in capsys.readouterr().out
    assert main(["evaluate", "-p", str(root / "out"), "-g", str(root / "gt"),
                 "-d", str(root / "out" / "dataset.json")]) == 0
    summary = json.loads((root / "out" / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 2 and set(summary["mean"]) == {"a", "b", "mean"}


def test_bad_run_directories(setup, capsys):
    root = setup
    (root / "empty").mkdir()
    base = ["predict", "-i", str(root / "in"), "-o", str(root / "out"), "-m"]
    assert main([*base, str(root / "empty")]) == 1
    assert "no nnUNetPlans.json" in capsys.readouterr().err
    _plan().save(root / "nockpt" / "nnUNetPlans.json")
    assert main([*base, str(root / "nockpt")]) == 1
    assert "no latest or best checkpoint" in capsys.readouterr().err
    _make_run(root / "run", seed=0)
    with pytest.raises(RunDirError, match="no best checkpoint"):
        load_run(root / "nockpt", "best")
    (root / "in" / "c0_0001.nii.gz").write_bytes(b"")
    assert main([*base, str(root / "run")]) == 1
    assert "case c0" in capsys.readouterr().err
    assert not (root / "out").exists() or not list((root / "out").glob("*.nii.gz"))


def test_predict_goes_on_past_a_bad_case(setup, capsys):
    """A bad case is reported at the end, after the others are written; a 0-byte output is not a
    finished case, and a temporary left by a killed run is removed."""
    root = setup
    _make_run(root / "run", seed=0)
    (root / "out").mkdir()
    (root / "out" / "c1.nii.gz").write_bytes(b"")  # e.g. a copy that was cut short
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = root / "out" / f".c1.tmp{dead.pid}.nii.gz"
    stale.write_bytes(b"")
    flat = nib.Nifti1Image(np.ones((4, 4), np.float32), np.eye(4))
    nib.save(flat, root / "in" / "c0_0000.nii.gz")
    args = ["predict", "-m", str(root / "run"), "-i", str(root / "in"), "-o", str(root / "out"),
            "--no-mirroring"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "1 case(s) could not be predicted (1 written" in err
    assert f"case c0: {root / 'in' / 'c0_0000.nii.gz'}: expected a 3-D volume" in err
    assert nib.load(root / "out" / "c1.nii.gz").shape == (20, 18, 9)
    assert not stale.exists() and not (root / "out" / "c0.nii.gz").exists()


def test_damaged_checkpoint_is_one_line(setup, capsys):
    root = setup
    _make_run(root / "run", seed=0)
    params = root / "run" / "checkpoints" / "latest" / "3" / "params"
    data = max((f for f in params.rglob("*") if f.is_file() and "ocdbt.process" in str(f)),
               key=lambda f: f.stat().st_size)
    data.write_bytes(data.read_bytes()[:64])
    args = ["predict", "-m", str(root / "run"), "-i", str(root / "in"), "-o", str(root / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {root / 'run' / 'checkpoints' / 'latest' / '3'}: the latest "
                          f"checkpoint cannot be read")
    assert err.rstrip().endswith("try --checkpoint best") and len(err) < 600
    assert len(err.strip().splitlines()) == 1
    assert main([*args, "--checkpoint", "best"]) == 0  # the intact one


def test_non_finite_checkpoint_is_refused(setup, capsys):
    root = setup
    _make_run(root / "run", seed=0, nan=True)
    with pytest.raises(RunDirError, match=r"latest/3: the latest checkpoint holds 1 non-finite "
                                       r"parameter value.*--allow-non-finite"):
        load_run(root / "run")
    loaded = load_run(root / "run", allow_non_finite=True)
    assert loaded.checkpoint == "latest" and loaded.non_finite == 1
    args = ["predict", "-m", str(root / "run"), "-i", str(root / "in"), "-o", str(root / "out"),
            "--no-mirroring"]
    assert main(args) == 1
    assert "--allow-non-finite" in capsys.readouterr().err
    assert main([*args, "--allow-non-finite"]) == 0
    assert "1 non-finite parameter value(s); predicting anyway" in capsys.readouterr().out


def _with_pixdim(src, dst, zoom):
    img = nib.load(src)
    new = nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header.copy())
    new.header["pixdim"][1:4] = zoom  # the header alone, as an editing tool leaves it
    nib.save(new, dst)


def test_a_degenerate_spacing_fails_its_case_only(setup, capsys):
    """pixdim 1000 (resampled: beyond memory), 1e-6 (no voxels), NaN: each case is refused in
    one line naming it and its file, and the good case is still predicted."""
    root = setup
    _make_run(root / "run", seed=0)
    for name, zoom in (("big", 1000.0), ("tiny", [1.0, 1e-6, 2.0]), ("nan", float("nan"))):
        _with_pixdim(root / "in" / "c0_0000.nii.gz", root / "in" / f"{name}_0000.nii.gz", zoom)
    capsys.readouterr()
    args = ["predict", "-m", str(root / "run"), "-i", str(root / "in"), "-o", str(root / "out"),
            "--no-mirroring"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 case(s) could not be predicted (2 written" in err, err
    file = {name: root / "in" / f"{name}_0000.nii.gz" for name in ("big", "tiny", "nan")}
    assert (f"case big: {file['big']}: voxel spacing [1000.0, 1000.0, 1000.0] mm is far from "
            f"the plan's spacing [2.0, 1.0, 1.0]") in err
    assert "expected at least 1 per axis and at most 2.15e+09 (2**31)" in err
    assert f"case tiny: {file['tiny']}: voxel spacing [2.0, 1e-06, 1.0] mm is far from" in err
    assert (f"case nan: {file['nan']}: voxel spacing [nan, nan, nan] (the header's pixdim): "
            f"each must be a finite number of mm > 0") in err
    assert "Traceback" not in err and "MemoryError" not in err
    assert sorted(p.name for p in (root / "out").glob("*.nii.gz")) == ["c0.nii.gz", "c1.nii.gz"]


@pytest.mark.parametrize("output", ["in", "in/predictions"])
def test_an_output_folder_among_the_inputs_is_refused(setup, capsys, output):
    """`-o` equal to or inside `-i`: a case's image would pass for another's prediction."""
    root = setup
    before = sorted(p.name for p in (root / "in").iterdir())
    capsys.readouterr()
    assert main(["predict", "-m", str(root / "run"), "-i", str(root / "in"), "-o",
                 str(root / output)]) == 2
    err = capsys.readouterr().err
    where = "is" if output == "in" else "is inside"
    assert err == (f"error: -o = {root / output} {where} -i {root / 'in'} ({root / 'in'}): its "
                   f"files would overwrite the inputs there; give -o a folder outside it\n")
    assert sorted(p.name for p in (root / "in").iterdir()) == before
