"""Training, validation and prediction with `mesh.spatial = 2` on 4 fake CPU devices, a resume on
one device per sample, and the bad spatial sizes that are refused before compiling."""

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_plan, tiny_run_config

from jaxmamba.cli import main
from jaxmamba.models import build_model
from jaxmamba.ops.mesh import MeshError
from jaxmamba.rundir import save_run
from jaxmamba.train.loop import run


def _cfg(phantom, run_dir, *overrides):
    return tiny_run_config(phantom, run_dir, "log.tensorboard=false", "log.plot=false",
                           *overrides)


@pytest.mark.slow  # ten small compiles: ~1-2 min on a 2-core CPU
def test_spatial_run_trains_validates_resumes_and_predicts_on_any_mesh(phantom, capsys):
    """tiny.yaml's patch 8x16x16 (S0 / total stride 2 = 4) over data=2 x spatial=2: the first
    epoch's losses equal a data=4 run's; the run validates with windows split over 2 devices,
    resumes with spatial=1 (the checkpoint holds nothing of the mesh) and predicts the same
    probabilities with --spatial 1 and 2."""
    spatial = run(_cfg(phantom, phantom / "runs" / "spatial", "mesh.spatial=2"))
    plain = run(_cfg(phantom, phantom / "runs" / "plain", "train.final_validation=false"),
                max_epochs=1)
    a, b = spatial["history"][0], plain["history"][0]
    np.testing.assert_allclose([a["train_loss"], a["val_loss"]], [b["train_loss"], b["val_loss"]],
                               rtol=1e-4)
    dice = spatial["final_validation"]["validation"]
    assert 0 <= dice["mean"] <= 1 and spatial["step"] == 2

    resumed = run(_cfg(phantom, phantom / "runs" / "spatial", "mesh.spatial=1", "train.epochs=3",
                       "train.final_validation=false"))
    assert resumed["step"] == 3 and np.isfinite(resumed["history"][-1]["train_loss"])

    images = phantom / "raw" / "imagesTr"
    outs = []
    for n in (1, 2):
        out = phantom / f"pred{n}"
        assert main(["predict", "-m", str(phantom / "runs" / "spatial"), "-i", str(images),
                     "-o", str(out), "--spatial", str(n), "--save-probabilities",
                     "--no-mirroring"]) == 0
        outs.append(out)
    capsys.readouterr()
    cases = sorted(p.name for p in outs[0].glob("*.npz"))
    assert len(cases) == 5
    for case in cases:
        one, two = (np.load(o / case)["probabilities"] for o in outs)
        np.testing.assert_allclose(two, one, atol=1e-5)
        label = case.replace(".npz", ".nii.gz")
        np.testing.assert_array_equal(nib.load(outs[1] / label).get_fdata(),
                                      nib.load(outs[0] / label).get_fdata())


def test_train_refuses_spatial_sizes_that_do_not_split(phantom, tmp_path):
    with pytest.raises(MeshError, match=r"mesh.spatial = 3: must divide the 4 device\(s\); use "
                                        r"one of \[1, 2, 4\]"):
        run(_cfg(phantom, tmp_path / "a", "mesh.spatial=3"))
    # S0 6 over the total stride 2 is 3 at the deepest stage: 2 devices cannot split it
    with pytest.raises(MeshError, match=r"mesh.spatial = 2 does not split the patch \[6, 16, 16\]"
                                        r".* one of \[1\], or a patch S0 of 4 or 8 \(e.g. data."
                                        r"plan_overrides.patch_size=\[8, 16, 16\]\)"):
        run(_cfg(phantom, tmp_path / "b", "mesh.spatial=2",
                 "data.plan_overrides.patch_size=[6, 16, 16]"))
    assert not list(tmp_path.rglob("checkpoints"))


def test_predict_refuses_spatial_sizes_that_do_not_split(tmp_path, capsys):
    plan = tiny_plan(patch_size=(4, 16, 16), labels=(("background", 0), ("a", 1)))
    save_run(tmp_path / "run", build_model("resencunet", plan, rngs=0), plan, source="test")
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(np.ones((8, 16, 16), np.float32), np.eye(4)),
             tmp_path / "in" / "c_0000.nii.gz")
    base = ["predict", "-m", str(tmp_path / "run"), "-i", str(tmp_path / "in"), "-o",
            str(tmp_path / "out")]
    assert main([*base, "--spatial", "3"]) == 1
    assert "error: --spatial = 3: must divide the 4 device(s); use one of [1, 2, 4]" in (
        capsys.readouterr().err)
    assert main([*base, "--spatial", "4"]) == 1
    err = capsys.readouterr().err
    assert "error: --spatial = 4 does not split the patch [4, 16, 16]" in err
    assert "Use --spatial = one of [1, 2]\n" in err and "Traceback" not in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))
