"""Prediction pipeline on raw NIfTI: geometry round trip, inversion, ensembles, bad input."""

import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_plan
from scipy.spatial.transform import Rotation

from jaxmamba.data.io import DataError
from jaxmamba.infer.metrics import dice
from jaxmamba.infer.predict import find_cases, predict_cases
from jaxmamba.infer.sliding_window import WindowOptions

RAW_SPACING_XYZ = (0.8, 1.1, 2.5)


def _plan(spacing_zyx, channels=("MRI",)):
    return tiny_plan(dataset_name="t", spacing=spacing_zyx,
                     normalization_schemes=("NoNormalization",) * len(channels),
                     use_mask_for_norm=(False,) * len(channels), channel_names=tuple(channels))


def _identity(k=3):
    """Logits = one-hot of the rounded intensity of channel 0 (the test images hold labels)."""
    return jax.jit(lambda w: 4.0 * jax.nn.one_hot(jnp.clip(jnp.rint(w[..., 0]), 0, k - 1)
                                                  .astype(jnp.int32), k))


def _oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [20, -35, 10], degrees=True).as_matrix() @ \
        np.diag(RAW_SPACING_XYZ)
    affine[:3, 3] = (-40.0, 12.5, 7.0)
    return affine


@pytest.fixture
def raw_case(tmp_path):
    """A label volume (x, y, z) = (30, 26, 11) written as image and ground truth."""
    labels = np.zeros((30, 26, 11), np.int16)
    labels[5:25, 4:22, 2:9] = 1
    labels[10:18, 8:15, 4:7] = 2
    img = nib.Nifti1Image(labels.astype(np.float32), _oblique_affine())
    img.header.set_xyzt_units("mm", "sec")
    (tmp_path / "in").mkdir()
    nib.save(img, tmp_path / "in" / "case_7_0000.nii.gz")
    return tmp_path, labels


@pytest.mark.parametrize("resample", [False, True])
def test_geometry_round_trip_with_oblique_affine(raw_case, resample):
    root, labels = raw_case
    spacing = RAW_SPACING_XYZ[::-1] if not resample else (1.8, 1.4, 1.0)
    plan = _plan(spacing)
    cases = find_cases([root / "in"], 1)
    written, skipped = predict_cases([_identity()], plan, cases, root / "out",
                                     save_probabilities=True, progress=False)
    assert [p.name for p in written] == ["case_7.nii.gz"] and skipped == []
    src, out = nib.load(root / "in" / "case_7_0000.nii.gz"), nib.load(written[0])
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    np.testing.assert_allclose(out.header.get_zooms(), src.header.get_zooms(), rtol=1e-6)
    assert out.header.get_xyzt_units() == ("mm", "sec")
    assert out.get_data_dtype() == np.uint8
    pred = np.asarray(out.dataobj)
    if not resample:
        np.testing.assert_array_equal(pred, labels)
    else:
        for k in (1, 2):
            assert dice(pred == k, labels == k) > 0.85
    probs = np.load(root / "out" / "case_7.npz")["probabilities"]
    assert probs.shape == (3, *src.shape[::-1])
    np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probs.argmax(0), pred.transpose(2, 1, 0))
    outside = labels.transpose(2, 1, 0) == 0
    assert (probs[0][outside][:10] > 0.5).all()


def test_skip_overwrite_and_ensemble(raw_case):
    root, labels = raw_case
    plan = _plan(RAW_SPACING_XYZ[::-1])
    cases = find_cases([root / "in" / "case_7_0000.nii.gz"], 1)
    predict_cases([_identity()], plan, cases, root / "out", progress=False)
    assert predict_cases([_identity()], plan, cases, root / "out", progress=False) == (
        [], ["case_7"])
    # an ensemble whose second member always says "b": the averaged logits keep the labels
    # where the first network is confident
    def always_b(w):
        return jnp.zeros((*w.shape[:-1], 3)).at[..., 2].set(1.0)
    written, _ = predict_cases([_identity(), always_b], plan, cases, root / "out",
                               window=WindowOptions(mirror_axes=None), overwrite=True,
                               progress=False)
    pred = np.asarray(nib.load(written[0]).dataobj)
    np.testing.assert_array_equal(pred[labels == 1], 1)  # (4 + 0) / 2 > (0 + 1) / 2
    assert not list((root / "out").glob(".*"))  # no temporary files left behind


def test_bad_input_names_the_case(tmp_path):
    (tmp_path / "in").mkdir()
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    nib.save(img, tmp_path / "in" / "a_0000.nii.gz")
    nib.save(img, tmp_path / "in" / "a_0002.nii.gz")
    with pytest.raises(DataError, match="case a: the plan expects 2 channel"):
        find_cases([tmp_path / "in"], 2)
    nib.save(img, tmp_path / "scan.nii.gz")
    assert find_cases([tmp_path / "scan.nii.gz"], 1)[0].case_id == "scan"  # a single file
    (tmp_path / "in" / "a_0002.nii.gz").rename(tmp_path / "in" / "scan.nii.gz")
    with pytest.raises(DataError, match="scan.nii.gz: name does not follow CASE_XXXX"):
        find_cases([tmp_path / "in"], 1)
    with pytest.raises(DataError, match="no such file"):
        find_cases([tmp_path / "nope.nii.gz"], 1)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "b_0000.nii.gz").write_bytes(b"not a nifti file")
    cases = find_cases([tmp_path / "bad"], 1)
    with pytest.raises(DataError, match="case b:"):
        predict_cases([_identity()], _plan((1.0, 1.0, 1.0)), cases, tmp_path / "out",
                      progress=False)
    assert not (tmp_path / "out" / "b.nii.gz").exists()
