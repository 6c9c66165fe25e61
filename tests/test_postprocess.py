"""nnU-Net's postprocessing: keeping the largest connected component, the decision on a folder of
predictions against nnunetv2 2.8's `determine_postprocessing` itself (same decisions, identical
postprocessed label maps), `jaxmamba postprocess`, and the refusals of bad postprocessing files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import tiny_plan
from scipy import ndimage

from jaxmamba.cli import main
from jaxmamba.infer.postprocess import (
    FOREGROUND,
    Postprocessing,
    PostprocessingError,
    Step,
    keep_largest_component,
    load,
)
from jaxmamba.infer.postprocess_decide import candidates, determine_postprocessing

SHAPE = (12, 20, 18)  # nnU-Net axis order (z, y, x)
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])
LABELS = {"background": 0, "a": 1, "b": 2}


def _blob(shape, centre, radius):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    return (((grid - np.asarray(centre)[:, None, None, None]) / radius) ** 2).sum(0) <= 1


def _save(path: Path, labels_zyx: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels_zyx.transpose(2, 1, 0).astype(np.uint8), AFFINE), path)


def _read(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj).transpose(2, 1, 0)


# ---------------------------------------------------------------------- the operation
@pytest.mark.nnunet
def test_keep_largest_component_matches_nnunet(rng):
    """nnU-Net's `remove_all_but_largest_component_from_segmentation` (acvl_utils +
    scikit-image's `label`, full connectivity) on random label maps."""
    from nnunetv2.postprocessing import remove_connected_components as rc

    for _ in range(6):
        labels = (rng.random((9, 11, 10)) < 0.12).astype(np.uint8) * rng.integers(1, 4, (9, 11, 10),
                                                                                     dtype=np.uint8)
        for values in ([1], [2, 3], [1, 2, 3]):
            ref = rc.remove_all_but_largest_component_from_segmentation(labels, values)
            got = keep_largest_component(labels, values)
            assert np.array_equal(got, ref) and got.dtype == labels.dtype
            assert (got != labels).any() or ndimage.label(np.isin(labels, values))[1] <= 1


def test_ties_all_stay_and_empty_masks_pass():
    tie = np.zeros((5, 5, 5), np.uint8)
    tie[0, 0, 0] = tie[4, 4, 4] = 1  # two components of one voxel: both stay
    tie[2, 2, 2] = 2
    assert np.array_equal(keep_largest_component(tie, [1]), tie)
    assert np.array_equal(keep_largest_component(np.zeros((3, 3, 3), np.uint8), [1]),
                          np.zeros((3, 3, 3)))


def test_diagonal_neighbours_are_one_component():
    """26-connectivity in 3-D: voxels touching at a corner are one component."""
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[0, 0, 0] = labels[1, 1, 1] = 1
    labels[3, 3, 0] = 1
    out = keep_largest_component(labels, [1])
    assert out[0, 0, 0] == out[1, 1, 1] == 1 and out[3, 3, 0] == 0


# ---------------------------------------------------------------------- decision
def _scenario(root: Path, rng: np.random.Generator, kind: str, n_cases: int = 4) -> Path:
    """Ground truth and predictions where keeping the largest component helps in some places
    and hurts in others (which, depends on `kind`); returns `root` holding gt/, pred/ and
    dataset.json."""
    for i in range(n_cases):
        # a within y <= 10, far within y >= 12: never touching
        a = _blob(SHAPE, rng.uniform([4, 5, 5], [7, 7, 8]), rng.uniform(2.5, 3.0))
        far = _blob(SHAPE, rng.uniform([4, 14, 11], [7, 16, 13]), rng.uniform(2.0, 2.5))
        gt = np.zeros(SHAPE, np.uint8)
        pred = np.zeros(SHAPE, np.uint8)
        if kind == "touching":  # b beside a: one foreground component plus noise of a
            b = np.roll(a, 5, axis=1) & ~a
            gt[a], gt[b] = 1, 2
            pred[:] = gt
            pred[_blob(SHAPE, (10, 17, 15), 1.2)] = 1  # spurious a, far away
            pred[np.roll(a, 1, axis=2) & ~a & ~b] = 1  # a slightly too large
        elif kind == "apart":  # a and b far apart: keeping the largest foreground loses b
            gt[a], gt[far] = 1, 2
            pred[:] = gt
            pred[_blob(SHAPE, (1, 1, 1), 1.0)] = 1  # spurious a
            pred[_blob(SHAPE, (10, 2, 16), 1.0)] = 2  # spurious b
        else:  # "split": b really has two parts, a has noise
            b2 = _blob(SHAPE, (10, 2, 15), 1.5)
            gt[a], gt[far | b2] = 1, 2
            pred[:] = gt
            pred[_blob(SHAPE, (10, 17, 2), 1.0)] = 1
            pred[_blob(SHAPE, (1, 1, 16), 1.0)] = 1
        _save(root / "gt" / f"c{i}.nii.gz", gt)
        _save(root / "pred" / f"c{i}.nii.gz", pred)
    (root / "dataset.json").write_text(json.dumps(
        {"name": "tiny", "labels": LABELS, "channel_names": {"0": "MRI"},
         "file_ending": ".nii.gz"}))
    return root


def nnunet_decision(predictions: Path, ground_truth: Path, labels: dict[str, int], work: Path,
                    monkeypatch):
    """nnunetv2's `determine_postprocessing` on a copy of `predictions` in `work` (it writes
    beside them), its pools run in this process: `(steps as (name, labels), {file name:
    postprocessed labels})`."""
    from nnunetv2.evaluation import evaluate_predictions
    from nnunetv2.postprocessing import remove_connected_components as rc

    class SerialPool:  # nnU-Net's own functions, called in this process
        def __init__(self, *a, **k): ...
        def __enter__(self): return self
        def __exit__(self, *a): return False
        def starmap(self, fn, args): return [fn(*a) for a in args]

    context = type("Ctx", (), {"Pool": SerialPool})()
    fake_mp = type("MP", (), {"get_context": staticmethod(lambda *_: context)})
    monkeypatch.setattr(rc, "multiprocessing", fake_mp)
    monkeypatch.setattr(evaluate_predictions, "multiprocessing", fake_mp)
    folder = work / "nnunet"
    shutil.copytree(predictions, folder, ignore=shutil.ignore_patterns("summary.*"))
    plans, dataset = tiny_plan(labels=tuple(labels.items())).to_nnunet()
    fns, kwargs = rc.determine_postprocessing(str(folder), str(ground_truth), plans, dataset, 1)
    names = {v: k for k, v in labels.items()}
    steps = []
    for fn, kw in zip(fns, kwargs, strict=True):
        assert fn is rc.remove_all_but_largest_component_from_segmentation
        value = kw["labels_or_regions"]
        steps.append((FOREGROUND, tuple(value)) if isinstance(value, list)
                     else (names[value], (value,)))
    return steps, {p.name: _read(p) for p in sorted((folder / "postprocessed").glob("*.nii.gz"))}


@pytest.mark.nnunet
@pytest.mark.parametrize("kind", ["touching", "apart", "split"])
def test_decision_equals_nnunet(tmp_path, rng, monkeypatch, kind):
    root = _scenario(tmp_path, rng, kind)
    ref_steps, ref_out = nnunet_decision(root / "pred", root / "gt", LABELS, tmp_path,
                                         monkeypatch)
    decision = determine_postprocessing(root / "pred", root / "gt", root / "dataset.json",
                                        tmp_path / "work")
    got = [(s.name, s.labels) for s in decision.postprocessing.steps]
    assert got == ref_steps
    tried = [(d["name"], d["applied"]) for d in decision.postprocessing.decisions]
    assert [n for n, _ in tried] == [FOREGROUND, "a", "b"]
    # identical postprocessed label maps, and they are what the steps make of the predictions
    assert sorted(ref_out) == [f"c{i}.nii.gz" for i in range(4)]
    for name, ref in ref_out.items():
        ours = _read(decision.folder / name)
        assert np.array_equal(ours, ref), name
        pred = _read(root / "pred" / name)
        assert np.array_equal(decision.postprocessing.apply(pred), ours)
    # each scenario takes a different path through the decision (the test can tell them apart)
    expected = {"touching": [(FOREGROUND, True), ("a", False), ("b", False)],
                "apart": [(FOREGROUND, False), ("a", True), ("b", True)],
                "split": [(FOREGROUND, False), ("a", True), ("b", False)]}
    assert tried == expected[kind]


def test_decision_summaries_and_nan_foreground_mean(tmp_path, rng):
    """The baseline is each candidate's `evaluate_folder` summary; a class absent from every
    prediction and ground truth makes nnU-Net's foreground mean NaN: step 1 is not taken."""
    root = _scenario(tmp_path, rng, "touching", n_cases=2)
    for f in (root / "gt").glob("*.nii.gz"):  # no b anywhere
        labels = _read(f)
        labels[labels == 2] = 0
        _save(f, labels)
    for f in (root / "pred").glob("*.nii.gz"):
        labels = _read(f)
        labels[labels == 2] = 0
        _save(f, labels)
    decision = determine_postprocessing(root / "pred", root / "gt", root / "dataset.json",
                                        tmp_path / "work")
    first = decision.postprocessing.decisions[0]
    assert first["dice_before"]["b"] is None and first["dice_before"]["foreground_mean"] is None
    assert not first["applied"]
    # removing the spurious a is still found per class
    assert [s.name for s in decision.postprocessing.steps] == ["a"]
    assert decision.summary["mean"]["a"]["Dice"] > first["dice_before"]["a"]


def test_candidates_follow_nnunet_order():
    assert [s.labels for s in candidates({"background": 0, "z": 2, "y": 1})] == [(1,), (2,)]
    regions = candidates({"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3})
    assert [(s.name, s.labels) for s in regions] == [("whole", (1, 2, 3)), ("core", (2, 3)),
                                                    ("enh", (3,))]


# ---------------------------------------------------------------------- files and the command
def _pp(name="tiny", labels=LABELS) -> Postprocessing:
    """Keep the largest component of class a."""
    return Postprocessing(name, tuple(labels.items()), (Step("a", (1,)),))


def test_postprocess_command_applies_the_file(tmp_path, rng, capsys):
    root = _scenario(tmp_path, rng, "split", n_cases=3)
    shutil.copy(root / "dataset.json", root / "pred" / "dataset.json")
    _pp().save(tmp_path / "pp.json")
    assert main(["postprocess", "-i", str(root / "pred"), "-o", str(tmp_path / "out"),
                 "--postprocessing", str(tmp_path / "pp.json")]) == 0
    out = capsys.readouterr().out
    assert "keep the largest component of a" in out and "wrote 3 postprocessed" in out
    for i in range(3):
        pred = nib.load(root / "pred" / f"c{i}.nii.gz")
        got = nib.load(tmp_path / "out" / f"c{i}.nii.gz")
        np.testing.assert_allclose(got.affine, pred.affine)
        labels = _read(root / "pred" / f"c{i}.nii.gz")
        expected = keep_largest_component(labels, [1])
        assert (expected != labels).any()  # the spurious a were removed
        assert np.array_equal(_read(tmp_path / "out" / f"c{i}.nii.gz"), expected)
        assert got.get_data_dtype() == pred.get_data_dtype()
    assert (tmp_path / "out" / "dataset.json").is_file()
    # the output may not be the input
    assert main(["postprocess", "-i", str(root / "pred"), "-o", str(root / "pred"),
                 "--postprocessing", str(tmp_path / "pp.json")]) == 1
    assert "is the input folder" in capsys.readouterr().err


@pytest.mark.parametrize("bad,message", [
    ("missing", "file not found"),
    ("not json", "not valid JSON"),
    ("other format", "not a jaxmamba postprocessing file"),
    ("unknown label", "label value(s) [7]"),
    ("other dataset", "decided for dataset 'elsewhere'"),
    ("other labels", "are not the dataset's"),
])
def test_bad_postprocessing_files_are_refused_in_one_line(tmp_path, rng, capsys, bad, message):
    root = _scenario(tmp_path, rng, "split", n_cases=1)
    shutil.copy(root / "dataset.json", root / "pred" / "dataset.json")
    path = tmp_path / "pp.json"
    if bad == "not json":
        path.write_text("{")
    elif bad == "other format":
        path.write_text(json.dumps({"postprocessing_fns": []}))
    elif bad == "unknown label":
        data = _pp().to_json()
        data["steps"] = [{"name": "x", "labels": [7]}]
        path.write_text(json.dumps(data))
    elif bad == "other dataset":
        _pp(name="elsewhere").save(path)
    elif bad == "other labels":
        _pp(labels={"background": 0, "a": 1, "c": 2}).save(path)
    assert main(["postprocess", "-i", str(root / "pred"), "-o", str(tmp_path / "out"),
                 "--postprocessing", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err and message in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(PostprocessingError):
        load(path, dataset_name="tiny", labels=LABELS)


def test_label_map_with_unknown_labels_is_named(tmp_path, capsys):
    labels = np.zeros(SHAPE, np.uint8)
    labels[2:4, 2:4, 2:4] = 5
    _save(tmp_path / "in" / "c0.nii.gz", labels)
    _pp().save(tmp_path / "pp.json")
    assert main(["postprocess", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                 "--postprocessing", str(tmp_path / "pp.json")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "in" / "c0.nii.gz") in err and "label value(s) [5]" in err
    assert not list((tmp_path / "out").glob("*.nii.gz"))
