"""Preprocessing: round trips, normalisation numbers, bad input, planning rules, splits."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import assert_close_to, seeded_rng, tiny_plan

from jaxmamba.data import (
    DataError,
    check_dataset,
    export_prediction,
    preprocess_case,
    preprocess_dataset,
    revert_to_raw,
)
from jaxmamba.data.augment import AugmentConfig
from jaxmamba.data.normalize import normalize_channel
from jaxmamba.data.planner import target_spacing
from jaxmamba.data.preprocess import load_preprocessed
from jaxmamba.data.splits import kfold_splits
from jaxmamba.datasets.phantom import make_phantom_dataset
from jaxmamba.plans import Plan

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def _plan(spacing, channels=("MRI",), schemes=("ZScoreNormalization",), mask=(False,), fg=()):
    return tiny_plan(dataset_name="t", spacing=spacing, normalization_schemes=schemes,
                     use_mask_for_norm=mask, n_blocks_encoder=(2, 2), n_blocks_decoder=(2,),
                     channel_names=channels,
                     labels=(("background", 0), ("ellipsoid", 1), ("box", 2)),
                     foreground_intensity_properties=fg)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory, request):
    return make_phantom_dataset(tmp_path_factory.mktemp("raw") / "Phantom", n_cases=6,
                                seed=int(seeded_rng(request).integers(2**16)))


def test_round_trip_identity_resampling_keeps_voxels(phantom, tmp_path):
    """Target spacing = raw spacing: preprocess → invert gives the same label voxels."""
    img, lab = phantom / "imagesTr/phantom_000_0000.nii.gz", phantom / "labelsTr/phantom_000.nii.gz"
    plan = _plan((3.0, 1.0, 1.0))
    data, seg, props = preprocess_case([img], plan, lab)
    assert data.shape[1:] == seg.shape and data.dtype == np.float32
    assert props["bbox"] != [[0, s] for s in props["shape_before_crop"]]  # cropping happened
    out = tmp_path / "pred.nii.gz"
    export_prediction(np.maximum(seg, 0), props, plan, out)
    raw, written = nib.load(lab), nib.load(out)
    assert written.shape == raw.shape
    np.testing.assert_allclose(written.affine, raw.affine)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(raw.dataobj))
    assert written.get_data_dtype() == np.uint8
    assert not list(tmp_path.glob(".*"))  # atomic write left no temporary file


def test_round_trip_anisotropic_resampling_restores_geometry(phantom):
    img, lab = phantom / "imagesTr/phantom_001_0000.nii.gz", phantom / "labelsTr/phantom_001.nii.gz"
    plan = _plan((1.5, 1.0, 1.0))  # z: 3 mm → 1.5 mm, resampled separately (order 0)
    data, seg, props = preprocess_case([img], plan, lab)
    assert props["shape_after_resample"][0] == 2 * props["shape_after_crop"][0]
    back = revert_to_raw(np.maximum(seg, 0), props, plan)
    raw = np.asarray(nib.load(lab).dataobj).transpose(2, 1, 0)
    assert back.shape == raw.shape
    for v in (1, 2):
        dice = 2 * ((back == v) & (raw == v)).sum() / ((back == v).sum() + (raw == v).sum())
        assert dice > 0.97, (v, dice)
    probs = np.stack([seg <= 0, seg == 1, seg == 2]).astype(np.float32)
    p = revert_to_raw(probs, props, plan, probabilities=True)
    assert p.shape == (3, *raw.shape)
    np.testing.assert_allclose(p.sum(0), 1.0, atol=1e-5)
    assert (p.argmax(0) == back).mean() > 0.99


def test_nibabel_big_endian_image_keeps_header_and_affine(tmp_path):
    """nibabel's own test image (big-endian int16, flipped x axis) exports with its geometry."""
    src = NIBABEL_DATA / "anatomical.nii"
    plan = _plan((2.0, 2.0, 2.0))
    data, seg, props = preprocess_case([src], plan)
    assert seg is None and np.isfinite(data).all()
    labels = (data[0] > 0.5).astype(np.int16)
    export_prediction(labels, props, plan, tmp_path / "out.nii.gz")
    raw, out = nib.load(src), nib.load(tmp_path / "out.nii.gz")
    assert out.shape == raw.shape
    np.testing.assert_allclose(out.affine, raw.affine)
    assert out.header.get_xyzt_units() == raw.header.get_xyzt_units()
    assert int(out.header["qform_code"]) == int(raw.header["qform_code"])
    expected = revert_to_raw(labels, props, plan)
    np.testing.assert_array_equal(np.asarray(out.dataobj).transpose(2, 1, 0), expected)


def test_zscore_and_ct_normalisation_match_hand_computation(rng):
    x = rng.normal(40, 300, (5, 6, 7)).astype(np.float32)
    mask = rng.random((5, 6, 7)) > 0.4
    z = normalize_channel(x, "ZScoreNormalization")
    assert_close_to(z, (x - x.mean()) / x.std(), rtol=1e-5, atol=1e-5)
    zm = normalize_channel(x, "ZScoreNormalization", mask=mask, use_mask=True)
    m, s = x[mask].mean(), x[mask].std()
    assert_close_to(zm[mask], (x[mask] - m) / s, rtol=1e-5, atol=1e-5)
    assert (zm[~mask] == 0).all()
    props = {"percentile_00_5": -100.0, "percentile_99_5": 250.0, "mean": 85.14, "std": 116.55}
    ct = normalize_channel(x, "CTNormalization", ct_properties=props)
    hand = (np.minimum(np.maximum(x, -100.0), 250.0) - 85.14) / 116.55
    assert_close_to(ct, hand, rtol=1e-5, atol=1e-6)


def test_ct_dataset_uses_global_foreground_statistics(tmp_path):
    root = make_phantom_dataset(tmp_path / "ct", n_cases=5, spacing=(1.0, 1.0, 1.0),
                                channel_names=("CT",), seed=3)
    plan, errors = preprocess_dataset(root, tmp_path / "cache", progress=False)
    assert errors == [] and plan.normalization_schemes == ("CTNormalization",)
    fg = plan.foreground_intensity_properties[0]
    raw = np.asarray(nib.load(root / "imagesTr/phantom_000_0000.nii.gz").dataobj).transpose(2, 1, 0)
    data, seg, _ = load_preprocessed(tmp_path / "cache", "phantom_000")
    inside = seg >= 0
    from jaxmamba.data.cropping import crop_to_nonzero
    cropped = crop_to_nonzero(raw[None].astype(np.float32), None)[0][0]
    hand = (np.clip(cropped, fg["percentile_00_5"], fg["percentile_99_5"]) - fg["mean"]) / fg["std"]
    assert_close_to(data[0][inside], hand[inside], rtol=1e-4, atol=1e-4)


def _write(path, array, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), path)


def test_bad_input_is_reported_per_case_and_file(tmp_path):
    root = make_phantom_dataset(tmp_path / "bad", n_cases=9, seed=1, channel_names=("T1", "T2"))
    it, lt = root / "imagesTr", root / "labelsTr"
    (it / "phantom_000_0001.nii.gz").unlink()  # missing channel file
    _write(lt / "orphan.nii.gz", np.zeros((4, 4, 4), np.uint8))  # label without image
    _write(it / "phantom_001_0000.nii.gz", np.zeros((5, 5, 5), np.float32) + 1)  # shape mismatch
    lab = nib.load(lt / "phantom_002.nii.gz")
    _write(lt / "phantom_002.nii.gz", np.asarray(lab.dataobj), lab.affine * 2)  # affine mismatch
    a = np.asarray(nib.load(lt / "phantom_003.nii.gz").dataobj).copy()
    a[0, 0, 0] = 7
    _write(lt / "phantom_003.nii.gz", a, nib.load(lt / "phantom_003.nii.gz").affine)  # bad label
    im = nib.load(it / "phantom_004_0000.nii.gz")
    b = np.asarray(im.dataobj).copy()
    b[1, 1, 1] = np.nan
    _write(it / "phantom_004_0000.nii.gz", b, im.affine)  # non-finite
    _write(lt / "phantom_005.nii.gz", np.zeros(a.shape[:2], np.uint8))  # 2-D label
    im = nib.load(lt / "phantom_006.nii.gz")
    _write(lt / "phantom_006.nii.gz", np.zeros(im.shape, np.uint8), im.affine)  # empty: warning
    gz = (it / "phantom_007_0000.nii.gz").read_bytes()
    (it / "phantom_007_0000.nii.gz").write_bytes(gz[: len(gz) // 2])  # truncated
    im = nib.load(it / "phantom_008_0001.nii.gz")
    _write(it / "phantom_008_0001.nii.gz", np.stack([im.get_fdata()] * 2, -1), im.affine)  # 4-D
    errors, warnings = check_dataset(root)
    text = "\n".join(errors)
    for needle in ("missing channel file(s) " + str(it / "phantom_000_0001.nii.gz"),
                   "orphan.nii.gz has no image",
                   "phantom_001: ", "phantom_002: ", "label value(s) [7]", "non-finite",
                   "phantom_005.nii.gz: expected a 3-D volume", "phantom_007_0000.nii.gz",
                   "phantom_008_0001.nii.gz: expected a 3-D volume", "numTraining is 9"):
        assert needle in text, (needle, text)
    assert len(warnings) == 1 and "phantom_006" in warnings[0]

    # preprocessing: the bad cases fail with their names, the good ones are complete
    plan = _plan((3.0, 1.0, 1.0), channels=("T1", "T2"), schemes=("ZScoreNormalization",) * 2,
                 mask=(False, False))
    cache = tmp_path / "cache"
    with pytest.raises(DataError):
        preprocess_dataset(root, cache, progress=False)  # planning refuses an unclean dataset
    _, errs = preprocess_dataset(root, cache, plan, progress=False)
    failed = {e.split(":")[0] for e in errs if e.startswith("case ")}
    assert {f"case phantom_00{i}" for i in (1, 2, 3, 4, 7, 8)} <= failed
    done = sorted(p.stem for p in (cache / "3d_fullres").glob("*.json"))
    assert "phantom_006" in done and "phantom_001" not in done and "phantom_007" not in done


def test_reference_plans_load_unchanged(reference_dir):
    """TamingMambas nnUNetPlans.json → the plans the networks use (3d_fullres)."""
    plans = {p.name.split(".")[0]: Plan.load(p)
             for p in sorted((reference_dir / "plans").glob("*.nnUNetPlans.json"))}
    syn = plans["Dataset090_SynapseAbdomen"]
    assert syn.patch_size == (48, 192, 192) and syn.batch_size == 2 and syn.batch_dice
    assert syn.strides == ((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2), (2, 2, 2), (1, 2, 2))
    assert syn.normalization_schemes == ("CTNormalization",)
    assert syn.num_classes == 14
    initial = {k: AugmentConfig.for_plan(p).initial_patch_size() for k, p in plans.items()}
    assert initial == {"Dataset001_BrainTumour": (205, 205, 205),
                       "Dataset027_ACDC": (14, 301, 301),
                       "Dataset090_SynapseAbdomen": (48, 225, 225)}


def test_target_spacing_anisotropy_rule():
    spacings = [[5.0, 0.8, 0.8], [6.0, 0.7, 0.7], [3.0, 0.75, 0.75], [6.0, 0.8, 0.8]]
    shapes = [[20, 256, 256]] * 4
    t = target_spacing(spacings, shapes)
    assert t[0] == pytest.approx(np.percentile([5, 6, 3, 6], 10)) and t[1] == pytest.approx(0.775)
    assert target_spacing(spacings, [[200, 256, 256]] * 4)[0] == pytest.approx(5.5)


def test_splits_equal_sklearn_kfold(rng):
    from sklearn import model_selection as sk  # the test extra's nilearn requires it
    keys = [f"case_{i:03d}" for i in rng.permutation(23)]
    ours = kfold_splits(keys)
    ordered = sorted(keys)
    for (tr, va), s in zip(sk.KFold(5, shuffle=True, random_state=12345).split(ordered), ours,
                           strict=True):
        assert s == {"train": [ordered[i] for i in tr], "val": [ordered[i] for i in va]}


def test_plan_cli_writes_nnunet_plans(phantom, tmp_path):
    from jaxmamba.cli import main
    assert main(["plan", str(phantom), "-o", str(tmp_path)]) == 0
    plans = json.loads((tmp_path / "nnUNetPlans.json").read_text())
    cfg = plans["configurations"]["3d_fullres"]
    assert cfg["spacing"] == [3.0, 1.0, 1.0]
    assert Plan.load(tmp_path / "nnUNetPlans.json").patch_size == tuple(cfg["patch_size"])


def test_parallel_preprocessing_equals_serial(phantom, tmp_path):
    plan = _plan((3.0, 1.0, 1.0))
    preprocess_dataset(phantom, tmp_path / "serial", plan, progress=False)
    _, errors = preprocess_dataset(phantom, tmp_path / "parallel", plan, num_workers=2,
                                   progress=False)
    assert errors == []
    for case in ("phantom_000", "phantom_005"):
        for a, b in zip(load_preprocessed(tmp_path / "serial", case),
                        load_preprocessed(tmp_path / "parallel", case), strict=True):
            np.testing.assert_array_equal(a, b)


def test_transposed_nnunet_plans_are_refused(phantom, reference_dir, tmp_path):
    plans = json.loads((reference_dir / "plans/Dataset090_SynapseAbdomen.nnUNetPlans.json")
                       .read_text())
    plans["transpose_forward"] = [2, 0, 1]
    (tmp_path / "nnUNetPlans.json").write_text(json.dumps(plans))
    (tmp_path / "dataset.json").write_text((phantom / "dataset.json").read_text())
    with pytest.raises(DataError, match="transpose_forward"):
        preprocess_dataset(phantom, tmp_path / "cache", tmp_path / "nnUNetPlans.json",
                           progress=False)
