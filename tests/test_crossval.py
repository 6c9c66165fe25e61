"""From fold runs to a cross-validation, a postprocessed prediction and a report, on real tiny
training runs (configs/tiny.yaml, one epoch of three steps) of a 4-case phantom with a test-only
2-fold split, and `data.fold=all`: `jaxmamba crossval` (scored as `jaxmamba evaluate` scores,
postprocessing as nnunetv2 decides it), `jaxmamba postprocess`, `jaxmamba predict
--postprocessing`, `jaxmamba report`, and every refusal."""

from __future__ import annotations

import csv
import json
import math
import shutil
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import TINY_CONFIG, build_phantom, tiny_run_config
from test_postprocess import nnunet_decision

from jaxmamba.cli import main
from jaxmamba.config import ConfigError, load_config
from jaxmamba.infer.postprocess import FOREGROUND, Postprocessing, Step, keep_largest_component
from jaxmamba.train.data import prepare_data
from jaxmamba.train.loop import run
from jaxmamba.train.record import StepTimes, add_session

CASES = [f"phantom_{i:03d}" for i in range(4)]
LABELS = {"background": 0, "ellipsoid": 1, "box": 2}


@pytest.fixture(scope="module")
def folds(tmp_path_factory, compilation_cache):
    """Runs of folds 0 and 1 of a 2-fold split of 4 phantoms (2 validation cases each), and of
    `data.fold=all`; what each said."""
    root = build_phantom(tmp_path_factory, "crossval", n_cases=4)
    (root / "cache").mkdir()
    (root / "cache" / "splits_final.json").write_text(json.dumps(
        [{"train": CASES[2:], "val": CASES[:2]}, {"train": CASES[:2], "val": CASES[2:]}]))
    runs, said = {}, {}
    for name, fold in (("fold0", 0), ("fold1", 1), ("all", "all")):
        lines = []
        run(_cfg(root, name, fold), say=lines.append)
        runs[name], said[name] = root / "runs" / name, lines
    return types.SimpleNamespace(root=root, runs=runs, said=said)


def _cfg(root: Path, name: str, fold):
    return tiny_run_config(root, root / "runs" / name, f"data.fold={fold}", "train.epochs=1",
                           "train.iters_per_epoch=3", "log.tensorboard=false", "log.plot=false")


def _nan(v):
    return math.nan if v is None else v


def _same_metrics(a: dict, b: dict) -> None:
    """Two `{region: {metric: value}}` equal, NaN (or strict JSON's null) equal to itself."""
    assert a.keys() == b.keys()
    for r in a:
        assert a[r].keys() == b[r].keys()
        for m in a[r]:
            x, y = _nan(a[r][m]), _nan(b[r][m])
            assert (math.isnan(x) and math.isnan(y)) or x == y, (r, m, x, y)


# ---------------------------------------------------------------------- training
def test_data_fold_is_a_number_or_all():
    assert load_config(TINY_CONFIG, ["data.fold=all"]).data.fold == "all"
    assert load_config(TINY_CONFIG, ["data.fold=3"]).data.fold == 3
    for bad, message in (("al", "expected int or one of 'all'"), ("-1", "must be >= 0")):
        with pytest.raises(ConfigError, match=message):
            load_config(TINY_CONFIG, [f"data.fold={bad}"])


def test_training_record_keeps_the_sessions_whose_epochs_stay(tmp_path):
    """A resume adds a session; one that started where a later one starts again (it saved no
    epoch that is kept), or any before a fresh start, is dropped."""
    cfg = types.SimpleNamespace(model=types.SimpleNamespace(variant="segmamba", precision="bf16",
                                                            mamba_precision="bf16"))
    plan = types.SimpleNamespace(patch_size=(8, 16, 16), batch_size=2)
    params = {"a": np.zeros((3, 4)), "b": [np.zeros(5)]}

    def add(start):
        return add_session(tmp_path, cfg, plan, params, start_epoch=start, compile_seconds=1.0,
                           memory=None)

    add(0)
    add(3)
    record = add(3)
    assert [s["start_epoch"] for s in record["sessions"]] == [0, 3]
    assert record["parameters"] == 17 and record["sessions"][1]["train_step_bytes"] is None
    assert (record["precision"], record["mamba_precision"]) == ("bf16", "bf16")
    assert json.loads((tmp_path / "training.json").read_text()) == record
    assert [s["start_epoch"] for s in add(0)["sessions"]] == [0]


def test_step_times_leave_out_the_read_after_the_loop():
    times = StepTimes()
    times.times = [10.0, 11.0, 13.0, 14.5, 14.6]  # the last read comes after the loop
    assert times.median() == 1.5
    times.times = [10.0, 11.0]
    assert times.median() is None


def test_fold_all_trains_every_case_without_validation(folds):
    run_dir = folds.runs["all"]
    _, _, train_ids, val_ids = prepare_data(_cfg(folds.root, "all", "all"), progress=False)
    assert sorted(train_ids) == CASES and val_ids == []
    skipped = [line for line in folds.said["all"] if "final validation" in line]
    assert len(skipped) == 1 and "skipped, data.fold=all" in skipped[0]
    assert "\n" not in skipped[0]
    assert not (run_dir / "final_validation").exists()
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and "val_loss" not in records[0]
    # started again with nothing left to train, it does not look for a final validation
    lines = []
    run(_cfg(folds.root, "all", "all"), say=lines.append)
    assert not any("missing" in line for line in lines)


def test_training_records_memory_card_and_step_time(folds):
    for name in ("fold0", "all"):
        record = json.loads((folds.runs[name] / "training.json").read_text())
        assert record["parameters"] > 1000 and record["variant"] == "resencunet"
        (session,) = record["sessions"][:1]
        assert session["device_kind"] == "cpu" and session["devices"] == 4
        assert session["start_epoch"] == 0 and session["compile_seconds"] > 0
        mem = session["train_step_memory"]
        assert session["train_step_bytes"] == (mem["argument"] + mem["output"] + mem["temp"]
                                               - mem["alias"]) > 0
        (epoch,) = [json.loads(x) for x in
                    (folds.runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert 0 < epoch["step_seconds"] < epoch["epoch_seconds"]


# ---------------------------------------------------------------------- crossval
@pytest.fixture(scope="module")
def crossval_out(folds, tmp_path_factory):
    out = tmp_path_factory.mktemp("cv") / "cv"
    assert main(["crossval", str(folds.runs["fold0"]), str(folds.runs["fold1"]), "-o", str(out),
                 "--postprocessing"]) == 0
    return out


def test_crossval_scores_exactly_as_evaluate(folds, crossval_out, tmp_path, capsys):
    out = crossval_out
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(c["case"] for c in summary["metric_per_case"]) == CASES
    assert sorted(p.name for p in (out / "validation").glob("*.nii.gz")) == [
        f"{c}.nii.gz" for c in CASES]
    # `jaxmamba evaluate` on the merged predictions: the same summary
    assert main(["evaluate", "-p", str(out / "validation"), "-g",
                 str(folds.root / "raw" / "labelsTr"), "-d", str(out / "dataset.json"),
                 "-o", str(tmp_path)]) == 0
    capsys.readouterr()
    ref = json.loads((tmp_path / "summary.json").read_text())
    _same_metrics(summary["mean"], ref["mean"])
    for a, b in zip(summary["metric_per_case"], ref["metric_per_case"], strict=True):
        assert a["case"] == b["case"] and a["prediction_file"] == b["prediction_file"]
        _same_metrics(a["metrics"], b["metrics"])
    assert 0 < summary["mean"]["mean"]["Dice"] < 1
    # per-fold means: each run's own final-validation mean
    for fold, name in (("0", "fold0"), ("1", "fold1")):
        own = json.loads((folds.runs[name] / "final_validation" / "validation" /
                          "summary.json").read_text())
        assert summary["folds"][fold]["cases"] == [c["case"] for c in own["metric_per_case"]]
        _same_metrics(summary["folds"][fold]["mean"], own["mean"])
    rows = list(csv.reader((out / "summary.csv").read_text().splitlines()))
    assert [r[0] for r in rows[1:]] == [*CASES, "mean", "fold 0", "fold 1"]
    record = json.loads((out / "crossval.json").read_text())
    assert record["folds"] == [0, 1] and record["missing_folds"] == [] and record["n_folds"] == 2


def test_crossval_with_a_missing_fold_says_so(folds, tmp_path, capsys):
    assert main(["crossval", str(folds.runs["fold1"]), "-o", str(tmp_path / "cv")]) == 0
    out = capsys.readouterr().out
    assert "missing fold(s) 0 of 2" in out
    summary = json.loads((tmp_path / "cv" / "summary.json").read_text())
    assert [c["case"] for c in summary["metric_per_case"]] == CASES[2:]
    assert not (tmp_path / "cv" / "postprocessing.json").exists()
    # run again over the same folder: replaced, not refused
    assert main(["crossval", str(folds.runs["fold1"]), str(folds.runs["fold0"]),
                 "-o", str(tmp_path / "cv")]) == 0
    assert len(json.loads((tmp_path / "cv" / "summary.json").read_text())[
        "metric_per_case"]) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["cv"]  # no temporaries left


@pytest.mark.nnunet
def test_crossval_postprocessing_equals_nnunet(folds, crossval_out, tmp_path, monkeypatch):
    out = crossval_out
    ref_steps, ref_out = nnunet_decision(out / "validation", folds.root / "raw" / "labelsTr",
                                         LABELS, tmp_path, monkeypatch)
    pp = json.loads((out / "postprocessing.json").read_text())
    assert [(s["name"], tuple(s["labels"])) for s in pp["steps"]] == ref_steps
    assert [d["name"] for d in pp["decisions"]] == [FOREGROUND, "ellipsoid", "box"]
    assert sorted(ref_out) == sorted(p.name for p in (out / "postprocessed").glob("*.nii.gz"))
    for name, ref in ref_out.items():
        got = np.asanyarray(nib.load(out / "postprocessed" / name).dataobj).transpose(2, 1, 0)
        assert np.array_equal(got, ref), name
    summary = json.loads((out / "postprocessed" / "summary.json").read_text())
    assert summary["settings"]["prediction_folder"] == str(out / "postprocessed")
    assert set(summary["folds"]) == {"0", "1"}


def test_postprocess_command_reproduces_crossvals_postprocessed(crossval_out, tmp_path):
    out = crossval_out
    assert main(["postprocess", "-i", str(out / "validation"), "-o", str(tmp_path / "pp"),
                 "--postprocessing", str(out / "postprocessing.json"),
                 "-d", str(out / "dataset.json")]) == 0
    for f in sorted((out / "postprocessed").glob("*.nii.gz")):
        assert np.array_equal(np.asanyarray(nib.load(tmp_path / "pp" / f.name).dataobj),
                              np.asanyarray(nib.load(f).dataobj))


def _two_bodies(folds, folder: Path) -> None:
    """An input case holding two phantom bodies of different sizes side by side (the tiny
    network's classes then have several components)."""
    img = nib.load(folds.root / "raw" / "imagesTr" / f"{CASES[0]}_0000.nii.gz")
    data = np.asanyarray(img.dataobj).astype(np.float32)
    small = data[: data.shape[0] // 2 + 2]
    both = np.concatenate([data, np.zeros((4, *data.shape[1:]), np.float32), small], axis=0)
    folder.mkdir()
    nib.save(nib.Nifti1Image(both, img.affine), folder / "twin_0000.nii.gz")


def test_predict_applies_postprocessing(folds, tmp_path, capsys):
    _two_bodies(folds, tmp_path / "in")
    dataset = json.loads((folds.runs["fold0"] / "dataset.json").read_text())
    pp = Postprocessing(dataset["name"], tuple(dataset["labels"].items()),
                        (Step("ellipsoid", (1,)), Step("box", (2,))))
    pp.save(tmp_path / "pp.json")
    base = ["predict", "-m", str(folds.runs["fold0"]), "-i", str(tmp_path / "in"),
            "--no-mirroring"]
    assert main([*base, "-o", str(tmp_path / "raw")]) == 0
    assert main([*base, "-o", str(tmp_path / "pp"), "--postprocessing",
                 str(tmp_path / "pp.json")]) == 0
    assert "keep the largest component of ellipsoid, then box" in capsys.readouterr().out
    raw = np.asanyarray(nib.load(tmp_path / "raw" / "twin.nii.gz").dataobj)
    got = np.asanyarray(nib.load(tmp_path / "pp" / "twin.nii.gz").dataobj)
    expected = keep_largest_component(keep_largest_component(raw, [1]), [2])
    assert (expected != raw).any(), "the classes have one component each: nothing to test"
    assert np.array_equal(got, expected)
    # a postprocessing of another dataset is refused before any prediction
    Postprocessing("Dataset001_Other", pp.labels, pp.steps).save(tmp_path / "other.json")
    assert main([*base, "-o", str(tmp_path / "other"), "--postprocessing",
                 str(tmp_path / "other.json")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "other.json") in err and "Dataset001_Other" in err
    assert not (tmp_path / "other").exists() or not list((tmp_path / "other").glob("*.nii.gz"))


# ---------------------------------------------------------------------- refusals
def _copy_run(src: Path, dst: Path, config=None, plans=None) -> Path:
    shutil.copytree(src, dst)
    if config:
        cfg = yaml.safe_load((dst / "config.yaml").read_text())
        for key, value in config.items():
            section, field = key.split(".")
            cfg[section][field] = value
        (dst / "config.yaml").write_text(yaml.safe_dump(cfg))
    if plans:
        data = json.loads((dst / "nnUNetPlans.json").read_text())
        plans(data)
        (dst / "nnUNetPlans.json").write_text(json.dumps(data))
    return dst


def _patch(data):
    data["configurations"]["3d_fullres"]["patch_size"] = [8, 8, 16]


def _dataset(data):
    data["dataset_name"] = "Dataset002_Other"


@pytest.mark.parametrize("case", [
    "not a run", "converted", "no final validation", "fold all", "repeated fold", "overlap",
    "other dataset", "other plan", "other network", "unreadable prediction", "output taken"])
def test_crossval_refusals(folds, tmp_path, capsys, case):
    f0, f1 = folds.runs["fold0"], folds.runs["fold1"]
    runs, bad, message = [f0, f1], None, None
    if case == "not a run":
        bad = tmp_path / "empty"
        bad.mkdir()
        runs, message = [f0, bad], "no nnUNetPlans.json"
    elif case == "converted":
        bad = _copy_run(f1, tmp_path / "conv")
        (bad / "config.yaml").unlink()
        runs, message = [f0, bad], "not a training run"
    elif case == "no final validation":
        bad = _copy_run(f1, tmp_path / "f1")
        (bad / "final_validation" / "results.json").unlink()
        runs, message = [f0, bad], "no final validation"
    elif case == "fold all":
        bad = folds.runs["all"]
        runs, message = [f0, bad], "data.fold=all"
    elif case == "repeated fold":
        bad = _copy_run(f0, tmp_path / "f0b")
        runs, message = [f0, f1, bad], "is fold 0, as"
    elif case == "overlap":
        bad = _copy_run(f0, tmp_path / "f1b", config={"data.fold": 1})
        runs, message = [f0, bad], "validates case(s) phantom_000, phantom_001"
    elif case == "other dataset":
        bad = _copy_run(f1, tmp_path / "f1", plans=_dataset)
        runs, message = [f0, bad], "is of dataset Dataset002_Other"
    elif case == "other plan":
        bad = _copy_run(f1, tmp_path / "f1", plans=_patch)
        runs, message = [f0, bad], "its plan differs"
    elif case == "other network":
        bad = _copy_run(f1, tmp_path / "f1", config={"model.variant": "plainconvunet"})
        runs, message = [f0, bad], "network: plainconvunet"
    elif case == "unreadable prediction":
        bad = _copy_run(f1, tmp_path / "f1")
        target = bad / "final_validation" / "validation" / f"{CASES[3]}.nii.gz"
        target.write_bytes(target.read_bytes()[:100])
        runs, bad, message = [f0, bad], target, "redo"
    elif case == "output taken":
        bad = tmp_path / "cv"
        bad.mkdir()
        (bad / "notes.txt").write_text("mine")
        message = "not a cross-validation folder"
    out = tmp_path / "cv"
    assert main(["crossval", *map(str, runs), "-o", str(out), "--postprocessing"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and message in err, err
    if case == "output taken":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries


# ---------------------------------------------------------------------- report
def test_report_rows_from_records(folds, crossval_out, tmp_path, capsys):
    out = crossval_out
    assert main(["report", str(out), str(folds.runs["all"]), str(folds.runs["fold0"]),
                 "-o", str(tmp_path / "report.csv"), "--plot", str(tmp_path / "report.png")]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| resencunet")]
    assert len(table) == 2  # fold0 is in the crossval: not a row of its own
    rows = list(csv.DictReader((tmp_path / "report.csv").read_text().splitlines()))
    cv, everything = rows
    summary = json.loads((out / "summary.json").read_text())
    pp = json.loads((out / "postprocessed" / "summary.json").read_text())
    assert float(cv["mean_dice"]) == summary["mean"]["mean"]["Dice"]
    assert float(cv["dice_ellipsoid"]) == summary["mean"]["ellipsoid"]["Dice"]
    assert float(cv["mean_dice_postprocessed"]) == pp["mean"]["mean"]["Dice"]
    assert (cv["folds"], cv["source"], cv["epochs"]) == ("0 1", "crossval", "1 1")
    records = [json.loads((folds.runs[n] / "training.json").read_text()) for n in
               ("fold0", "fold1")]
    assert int(cv["parameters"]) == records[0]["parameters"]
    assert float(cv["train_step_memory_gib"]) == max(
        r["sessions"][0]["train_step_bytes"] for r in records) / 2**30
    steps = sorted(json.loads((folds.runs[n] / "metrics.jsonl").read_text())["step_seconds"]
                   for n in ("fold0", "fold1"))
    assert float(cv["median_step_ms"]) == pytest.approx(1000 * (steps[0] + steps[1]) / 2)
    hours = [json.loads((folds.runs[n] / "metrics.jsonl").read_text())["epoch_seconds"] / 3600
             for n in ("fold0", "fold1")]
    assert float(cv["train_hours_total"]) == pytest.approx(sum(hours))
    assert cv["card"] == "cpu x4" and f"{summary['mean']['mean']['Dice']:.4f}" in table[0]
    assert (everything["folds"], everything["mean_dice"]) == ("all", "")  # nothing validated
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    # the two runs given directly: one row whose Dice is over their cases together, as the
    # cross-validation's
    assert main(["report", str(folds.runs["fold0"]), str(folds.runs["fold1"]),
                 "-o", str(tmp_path / "runs.csv")]) == 0
    capsys.readouterr()
    (direct,) = csv.DictReader((tmp_path / "runs.csv").read_text().splitlines())
    assert float(direct["mean_dice"]) == pytest.approx(summary["mean"]["mean"]["Dice"], rel=1e-12)
    assert direct["source"] == "runs" and direct["folds"] == "0 1"


def test_report_refuses_what_is_not_a_run(tmp_path, capsys):
    (tmp_path / "x").mkdir()
    assert main(["report", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "x") in err and "crossval" in err
