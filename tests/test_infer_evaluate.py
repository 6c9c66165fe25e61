"""`jaxmamba evaluate` on synthetic NIfTI folders: summary files, table, previews, bad input."""

import csv
import json
import math

import nibabel as nib
import numpy as np
import pytest

from jaxmamba.cli import main
from jaxmamba.infer.evaluate import evaluate_folder
from jaxmamba.infer.metrics import evaluate_case
from jaxmamba.infer.preview import largest_structure_center

SPACING = (3.0, 1.0, 1.5)  # nnU-Net order (z, y, x)


def _write(path, zyx, dtype=np.uint8):
    affine = np.diag([*SPACING[::-1], 1.0])
    nib.save(nib.Nifti1Image(np.asarray(zyx, dtype).transpose(2, 1, 0), affine), path)


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(11)
    pred_dir, gt_dir, img_dir = (tmp_path / d for d in ("pred", "gt", "img"))
    for d in (pred_dir, gt_dir, img_dir):
        d.mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "liver": 1, "tumour": 2},
        "file_ending": ".nii.gz"}))
    cases = {}
    for i in range(3):
        gt = np.zeros((8, 20, 16), np.uint8)
        gt[2:6, 4:14, 3:12] = 1
        gt[3:5, 6:9, 5:8] = 2
        pred = np.roll(gt, i, axis=1)
        if i == 2:
            pred[pred == 2] = 1  # the tumour is missed: Dice 0, HD95 undefined
        _write(gt_dir / f"case_{i}.nii.gz", gt)
        _write(pred_dir / f"case_{i}.nii.gz", pred)
        _write(img_dir / f"case_{i}_0000.nii.gz", rng.normal(size=gt.shape), np.float32)
        cases[f"case_{i}"] = (pred, gt)
    return tmp_path, cases


def test_evaluate_cli_writes_summary_table_and_previews(folders, capsys, monkeypatch):
    root, cases = folders
    import jaxmamba.infer.evaluate as evaluate_module
    previews = []  # the legend's class names come from dataset.json
    real_save_preview = evaluate_module.save_preview
    monkeypatch.setattr(evaluate_module, "save_preview", lambda path, labels, **kw: (
        previews.append(kw["class_names"]), real_save_preview(path, labels, **kw)))
    rc = main(["evaluate", "-p", str(root / "pred"), "-g", str(root / "gt"),
               "-d", str(root / "dataset.json"), "--spacing", "--nsd-tolerance", "2",
               "--preview", "-i", str(root / "img")])
    assert rc == 0
    summary = json.loads((root / "pred" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == sorted(cases)
    for case in summary["metric_per_case"]:
        pred, gt = cases[case["case"]]
        want = evaluate_case(pred, gt, {"liver": (1,), "tumour": (2,)}, spacing=SPACING,
                             hd95_in_mm=True, nsd_tolerance=2.0)
        for region, metrics in want.items():
            for k, v in metrics.items():
                got = case["metrics"][region][k]
                assert (got is None and math.isnan(v)) or got == pytest.approx(v), (region, k)
    assert summary["metric_per_case"][0]["metrics"]["liver"]["Dice"] == 1.0
    assert summary["metric_per_case"][2]["metrics"]["tumour"]["HD95"] is None  # NaN -> null
    tumour_dice = [cases[c][0] for c in sorted(cases)]
    assert summary["mean"]["tumour"]["Dice"] == pytest.approx(np.mean(
        [evaluate_case(p, cases[c][1], {"t": (2,)})["t"]["Dice"]
         for c, p in zip(sorted(cases), tumour_dice, strict=True)]))
    assert summary["mean"]["mean"]["Dice"] == pytest.approx(
        (summary["mean"]["liver"]["Dice"] + summary["mean"]["tumour"]["Dice"]) / 2)
    assert summary["settings"]["hd95_unit"] == "mm"
    rows = list(csv.reader((root / "pred" / "summary.csv").read_text().splitlines()))
    assert rows[0][:3] == ["case", "liver_Dice", "liver_HD95"] and len(rows) == 5
    assert rows[-1][0] == "mean"
    out = capsys.readouterr().out
    assert "case_2" in out and "mean" in out and "liver" in out
    for c in cases:
        png = root / "pred" / "previews" / f"{c}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert previews == [{0: "background", 1: "liver", 2: "tumour"}] * 3


def test_paper_semantics_regions_and_workers(folders):
    root, cases = folders
    summary = evaluate_folder(root / "pred", root / "gt", root / "dataset.json",
                              regions={"fg": (1, 2), "tumour": (2,)}, empty_hd95=0.0,
                              empty_dice=1.0, workers=2)
    assert list(summary["mean"]) == ["fg", "tumour", "mean"]
    assert summary["metric_per_case"][2]["metrics"]["tumour"]["HD95"] == 0.0
    assert "NSD" not in summary["mean"]["fg"]  # no tolerance given
    assert summary["settings"]["hd95_unit"] == "voxels"


def test_bad_input_names_the_case(folders, capsys):
    root, _ = folders
    args = ["evaluate", "-p", str(root / "pred"), "-g", str(root / "gt"),
            "-d", str(root / "dataset.json")]
    _write(root / "pred" / "case_1.nii.gz", np.zeros((8, 20, 15)))
    assert main(args) == 1
    assert "case case_1" in (out := capsys.readouterr().err) and "shape" in out
    _write(root / "pred" / "case_1.nii.gz", np.full((8, 20, 16), 7))
    assert main(args) == 1
    assert "case case_1" in (out := capsys.readouterr().err) and "[7]" in out
    (root / "pred" / "case_1.nii.gz").unlink()
    assert main(args) == 1
    assert "case_1" in (out := capsys.readouterr().err) and "--partial" in out
    assert main([*args, "--partial"]) == 0
    _write(root / "pred" / "extra.nii.gz", np.zeros((8, 20, 16)))
    assert main(args) == 1
    assert "extra" in capsys.readouterr().err
    assert main([*args[:-2], "-d", str(root / "dataset.json"), "--regions", "WT=1,9"]) == 1
    assert "[9]" in capsys.readouterr().err
    assert main([*args[:-2], "-d", str(root / "missing.json")]) == 1
    assert "missing.json: file not found" in capsys.readouterr().err


def test_largest_structure_center():
    labels = np.zeros((10, 12, 14), int)
    labels[1:3, 1:3, 1:3] = 1
    labels[5:8, 6:9, 2:11] = 2
    assert largest_structure_center(labels) == (6, 7, 6)
    assert largest_structure_center(np.zeros((4, 6, 8), int)) == (2, 3, 4)


def test_prediction_on_another_grid_is_refused(folders, capsys):
    """A prediction shifted by 20 mm (or with another spacing) is not scored as if aligned."""
    root, cases = folders
    args = ["evaluate", "-p", str(root / "pred"), "-g", str(root / "gt"),
            "-d", str(root / "dataset.json")]
    pred, _ = cases["case_1"]
    shifted = np.diag([*SPACING[::-1], 1.0])
    shifted[0, 3] = 20.0
    nib.save(nib.Nifti1Image(pred.transpose(2, 1, 0), shifted), root / "pred" / "case_1.nii.gz")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "case case_1" in err and "20 mm apart" in err and "--ignore-geometry" in err
    assert main([*args, "--geometry-tolerance", "25"]) == 0
    assert main([*args, "--ignore-geometry"]) == 0
    summary = json.loads((root / "pred" / "summary.json").read_text())
    assert summary["settings"]["geometry_tolerance_mm"] is None
    coarse = np.diag([*SPACING[::-1], 1.0])
    coarse[2, 2] = 2 * SPACING[0]
    nib.save(nib.Nifti1Image(pred.transpose(2, 1, 0), coarse), root / "pred" / "case_1.nii.gz")
    assert main(args) == 1
    assert "spacing [6.0, 1.0, 1.5] vs [3.0, 1.0, 1.5]" in capsys.readouterr().err


@pytest.mark.parametrize("value, said", [
    (np.inf, "holds non-finite values (NaN or inf); expected a label map"),
    (2.0**40, "has label value(s) [1099511627776] not in dataset.json labels [0, 1, 2]")])
def test_a_voxel_beyond_any_label_is_named_as_it_is(folders, capsys, value, said):
    """An inf voxel or 2**40 in a float prediction: named as such, never as a wrapped integer."""
    root, cases = folders
    pred = cases["case_1"][0].astype(np.float32)
    pred[0, 0, 0] = value
    _write(root / "pred" / "case_1.nii.gz", pred, np.float32)
    capsys.readouterr()
    assert main(["evaluate", "-p", str(root / "pred"), "-g", str(root / "gt"),
                 "-d", str(root / "dataset.json")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: case case_1: {root / 'pred' / 'case_1.nii.gz'} {said}\n"
    assert "-2147483648" not in err


@pytest.mark.parametrize("tolerance", ["-1", "0", "inf"])
def test_a_surface_tolerance_must_be_a_distance(folders, capsys, tolerance):
    root, _ = folders
    capsys.readouterr()
    assert main(["evaluate", "-p", str(root / "pred"), "-g", str(root / "gt"),
                 "-d", str(root / "dataset.json"), "--nsd-tolerance", tolerance]) == 2
    assert capsys.readouterr().err == (f"error: --nsd-tolerance {float(tolerance)}: must be a "
                                       f"distance in mm > 0 (how far a boundary voxel may be and "
                                       f"still count as on the surface)\n")
    assert not (root / "pred" / "summary.json").exists()
