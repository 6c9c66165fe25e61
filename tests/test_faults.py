"""Fault injection: damaged copies of a small real dataset (six Hippocampus cases) through
`jaxmamba check`, `jaxmamba preprocess` and `jaxmamba train`.

Every damage must give a non-zero exit status and a message naming the case and the file (or
`dataset.json` and its field), with no traceback. Training stops at data validation, before any
compilation. Each command runs in-process through the CLI entry (`jaxmamba.cli.main`) under an
alarm, and a few run as real processes to see exactly what a user sees.
"""

import contextlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from jaxmamba.cli import main
from jaxmamba.data import DataError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CASES = ("hippocampus_001", "hippocampus_003", "hippocampus_004", "hippocampus_006",
         "hippocampus_007", "hippocampus_008")
BAD = "hippocampus_004"
SECONDS = 60  # per command; the slowest here takes a few


@pytest.fixture(scope="module")
def clean(datasets_dir, tmp_path_factory) -> Path:
    """Six cases of Dataset004_Hippocampus, with a dataset.json that counts them."""
    src = datasets_dir / "Dataset004_Hippocampus"
    root = tmp_path_factory.mktemp("hippocampus") / "Dataset004_Hippocampus"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for c in CASES:
        shutil.copy(src / "imagesTr" / f"{c}_0000.nii.gz", root / "imagesTr")
        shutil.copy(src / "labelsTr" / f"{c}.nii.gz", root / "labelsTr")
    meta = json.loads((src / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(CASES)}))
    return root


def _image(root: Path) -> Path:
    return root / "imagesTr" / f"{BAD}_0000.nii.gz"


def _label(root: Path) -> Path:
    return root / "labelsTr" / f"{BAD}.nii.gz"


def _rewrite(path: Path, change, dtype=None, affine=None) -> None:
    img = nib.load(path)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(change(data.astype(dtype or data.dtype)),
                             img.affine if affine is None else affine), path)


def _meta(root: Path, change) -> None:
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))


def _truncate(root):
    data = _image(root).read_bytes()
    _image(root).write_bytes(data[: len(data) // 2])


def _shift(root):
    affine = nib.load(_label(root)).affine.copy()
    affine[0, 3] += 20.0  # 20 mm
    _rewrite(_label(root), lambda a: a, affine=affine)


def _one_nan(a):
    a.flat[a.size // 2] = np.nan
    return a


def _no_cases(root):
    for f in [*(root / "imagesTr").iterdir(), *(root / "labelsTr").iterdir()]:
        f.unlink()
    _meta(root, lambda m: m.pop("numTraining"))


#: name -> (damage, what every message must name)
FILE_FAULTS = {
    "truncated image": (_truncate, [BAD, "imagesTr/hippocampus_004_0000.nii.gz", "truncated"]),
    "empty label file": (lambda r: _label(r).write_bytes(b""),
                         [BAD, "labelsTr/hippocampus_004.nii.gz", "Empty file"]),
    "label of another shape": (lambda r: _rewrite(_label(r), lambda a: a[:-3]),
                               [BAD, "labelsTr/hippocampus_004.nii.gz", "shape"]),
    "missing label": (lambda r: _label(r).unlink(),
                      [BAD, "labelsTr/hippocampus_004.nii.gz", "no label file"]),
    "NaN in the image": (lambda r: _rewrite(_image(r), _one_nan, np.float32),
                         [BAD, "imagesTr/hippocampus_004_0000.nii.gz", "non-finite"]),
    "fractional labels": (lambda r: _rewrite(_label(r), lambda a: np.where(a == 1, 1.5, a),
                                             np.float32),
                          [BAD, "labelsTr/hippocampus_004.nii.gz", "not whole numbers", "1.5"]),
    "label out of range": (lambda r: _rewrite(_label(r), lambda a: np.where(a == 2, 5, a)),
                           [BAD, "labelsTr/hippocampus_004.nii.gz", "[5]"]),
    "label shifted 20 mm": (_shift, [BAD, "labelsTr/hippocampus_004.nii.gz", "affine"]),
    "4-D image": (lambda r: _rewrite(_image(r), lambda a: np.stack([a, a], -1)),
                  [BAD, "imagesTr/hippocampus_004_0000.nii.gz", "3-D"]),
    "no cases": (_no_cases, ["imagesTr", "no training cases"]),
    "dataset.json without labels": (lambda r: _meta(r, lambda m: m.pop("labels")),
                                    ["dataset.json", "labels"]),
    "dataset.json label not an integer": (
        lambda r: _meta(r, lambda m: m["labels"].update(Posterior="two")),
        ["dataset.json", "'Posterior'", "'two'"]),
    "dataset.json channel_names a list": (
        lambda r: _meta(r, lambda m: m.update(channel_names=["MRI"])),
        ["dataset.json", "channel_names"]),
    "dataset.json file_ending not a string": (
        lambda r: _meta(r, lambda m: m.update(file_ending=7)), ["dataset.json", "file_ending"]),
    "dataset.json not JSON": (lambda r: (r / "dataset.json").write_text("{"),
                              ["dataset.json", "not valid JSON"]),
}


@contextlib.contextmanager
def _deadline(seconds: int = SECONDS):
    def fail(*_):
        raise TimeoutError(f"a command took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run(capsys, argv: list[str]) -> tuple[int, str]:
    """Exit status and everything printed, of `jaxmamba ARGV` in this process."""
    capsys.readouterr()
    with _deadline():
        rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out + captured.err


def _commands(raw: Path, work: Path) -> dict[str, list[str]]:
    return {
        "check": ["check", str(raw)],
        "preprocess": ["preprocess", str(raw), "-o", str(work / "cache"), "-j", "0"],
        "train": ["train", str(TINY), f"data.raw_dir={raw}", "data.build=null",
                  f"data.preprocessed_dir={work / 'train_cache'}",
                  f"train.run_dir={work / 'run'}", "log.progress=false"],
    }


@pytest.mark.parametrize("fault", list(FILE_FAULTS))
def test_damaged_dataset_is_named_by_every_command(fault, clean, tmp_path, capsys):
    raw = tmp_path / clean.name
    shutil.copytree(clean, raw)
    damage, named = FILE_FAULTS[fault]
    damage(raw)
    for command, argv in _commands(raw, tmp_path).items():
        rc, out = _run(capsys, argv)
        assert rc != 0, f"{command} accepted a dataset with: {fault}\n{out}"
        assert "Traceback" not in out
        errors = [line for line in out.splitlines() if "error" in line or line.startswith("  ")]
        for part in named:
            assert any(part in line for line in errors), \
                f"{command} ({fault}): no message names {part!r}:\n{out}"
        assert "compiled the train step" not in out  # stopped at data validation


def test_clean_copy_passes(clean, capsys):
    """The damages above are the only reason for the failures: the clean copy is OK."""
    rc, out = _run(capsys, ["check", str(clean)])
    assert rc == 0 and "OK" in out


def test_broken_case_is_named_when_the_cache_already_has_splits(clean, tmp_path, capsys):
    """A cache with nnU-Net's splits_final.json (copied in, or from an earlier run) must not hide
    the broken case behind "fold 0 must hold known case ids"."""
    raw = tmp_path / clean.name
    shutil.copytree(clean, raw)
    cache = tmp_path / "cache"
    cache.mkdir()
    folds = [{"train": [c for c in CASES if c != v], "val": [v]} for v in CASES[:5]]
    (cache / "splits_final.json").write_text(json.dumps(folds))
    _rewrite(_label(raw), lambda a: np.where(a == 2, 5, a))
    rc, out = _run(capsys, ["preprocess", str(raw), "-o", str(cache), "-j", "0"])
    assert rc == 1 and "splits_final.json" not in out
    assert f"case {BAD}: {_label(raw)} has label value(s) [5]" in out
    rc, out = _run(capsys, [*_commands(raw, tmp_path)["train"][:-3],
                            f"data.preprocessed_dir={cache}", f"train.run_dir={tmp_path / 'r'}"])
    assert rc == 1 and "splits_final.json" not in out and f"case {BAD}" in out


def test_debug_shows_the_traceback(clean, tmp_path, monkeypatch):
    raw = tmp_path / clean.name
    shutil.copytree(clean, raw)
    _truncate(raw)
    argv = ["preprocess", str(raw), "-o", str(tmp_path / "cache"), "-j", "0"]
    with _deadline(), pytest.raises(DataError, match=BAD):
        main(["--debug", *argv])
    monkeypatch.setenv("JAXMAMBA_DEBUG", "1")
    with _deadline(), pytest.raises(DataError, match=BAD):
        main(argv)


@pytest.mark.slow
def test_a_real_process_prints_one_line_and_no_traceback(clean, tmp_path):
    """`train.py` and `jaxmamba preprocess` as the user runs them (worker processes included)."""
    raw = tmp_path / clean.name
    shutil.copytree(clean, raw)
    _rewrite(_label(raw), lambda a: np.where(a == 1, 1.5, a), np.float32)
    for argv in ([sys.executable, "-m", "jaxmamba.cli", "preprocess", str(raw), "-o",
                  str(tmp_path / "cache"), "-j", "2"],
                 [sys.executable, str(ROOT / "train.py"),
                  *_commands(raw, tmp_path)["train"][1:]]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "Traceback" not in done.stderr + done.stdout
        assert f"case {BAD}: {_label(raw)} holds label value(s) that are not whole numbers" in \
            done.stderr


def test_help_answers_without_importing_jax():
    """`jaxmamba --help` and `jaxmamba COMMAND --help` for every command, in one fresh process:
    JAX is never imported."""
    from jaxmamba.cli import COMMANDS
    code = ("import sys, contextlib, io\n"
            "from jaxmamba.cli import COMMANDS, main\n"
            "for argv in [['--help'], *([name, '--help'] for name in COMMANDS)]:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n"
            "            main(argv)\n"
            "        except SystemExit:\n"
            "            pass\n"
            "    assert '--debug' in out.getvalue(), argv\n"
            "print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", f"--help of {sorted(COMMANDS)} imported {done.stdout}"


#: A value that passed validation once and failed late -> what its one line must say
CONFIG_BOUNDS = {
    "optim.onecycle_div_factor=0": "optim.onecycle_div_factor = 0.0: must be > 0",
    "optim.onecycle_final_div_factor=0": "optim.onecycle_final_div_factor = 0.0: must be > 0",
    f"seed={2**65}": f"seed = {2**65}: must be an integer in [0, 2**63 - 2]",
    "seed=-1": "seed = -1: must be an integer in [0, 2**63 - 2]",
    f"data.plan_overrides.batch_size={10**20}": f"data.plan_overrides.batch_size = {10**20}: "
                                                f"must be an integer in 1..65,536",
    "data.plan_overrides.patch_size=[1000000,16,16]": "data.plan_overrides.patch_size = "
                                                      "[1000000, 16, 16]: must be a list of 3 "
                                                      "integers >= 1, at most 134,217,728 voxels",
    "optim.cosine_eta_min=-1": "optim.cosine_eta_min = -1.0: must be >= 0",
    "optim.onecycle_beta1=[5,-3]": "optim.onecycle_beta1[0] = 5.0: must be in [0, 1)",
    "optim.momentum=1e308": "optim.momentum = 1e+308: must be in [0, 1)",
    "optim.weight_decay=1e308": "optim.weight_decay = 1e+308: must be in [0, 1)",
    "train.memory_limit_gib=0": "train.memory_limit_gib = 0.0: must be > 0 GiB, or null",
    "train.memory_limit_gib=-1": "train.memory_limit_gib = -1.0: must be > 0 GiB, or null",
    "data.plans=": "data.plans = '': must be the path of an nnUNetPlans.json, or null",
}


@pytest.mark.parametrize("override", list(CONFIG_BOUNDS))
def test_config_values_beyond_their_bounds_are_one_line(override, clean, tmp_path, capsys):
    """Each of these once passed validation, then gave a traceback or a misleading stop."""
    rc, out = _run(capsys, [*_commands(clean, tmp_path)["train"], override])
    assert rc == 2 and out.startswith("error: command line: ") and out.count("\n") == 1, out
    assert CONFIG_BOUNDS[override] in out and not (tmp_path / "run").exists()


def test_a_fold_that_does_not_exist_names_the_folds_there_are(clean, tmp_path, capsys):
    rc, out = _run(capsys, [*_commands(clean, tmp_path)["train"], "data.fold=7"])
    assert rc == 1 and out.count("\n") == 1, out
    assert out.startswith(f"error: {tmp_path / 'train_cache' / 'splits_final.json'}: fold 7 does "
                          f"not exist (folds 0..4 or 'all')")


def test_a_backend_that_cannot_start_is_one_line(clean, tmp_path):
    """JAX_PLATFORMS=cuda on a machine without CUDA: one line, before any work (jax 0.10 raised
    a bare AssertionError)."""
    import jax
    from launching import clean_env
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("this machine has a GPU: JAX_PLATFORMS=cuda starts")
    done = subprocess.run([sys.executable, str(ROOT / "train.py"),
                           *_commands(clean, tmp_path)["train"][1:]], capture_output=True,
                          text=True, timeout=120, cwd=ROOT,
                          env={**clean_env(1), "JAX_PLATFORMS": "cuda"})
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: JAX_PLATFORMS=cuda: JAX cannot start that backend on "
                                  "this machine (")
    assert "set JAX_PLATFORMS to a backend this machine has" in done.stderr
    assert not (tmp_path / "run").exists()


def test_an_exit_after_an_error_does_not_wait_for_background_threads(tmp_path):
    """A background thread that never ends (as orbax's save threads can) does not hang the
    process after its error: it leaves `grace_s` seconds after the exit began."""
    code = ("import threading, time\n"
            "from jaxmamba.cli import bounded_exit\n"
            "threading.Thread(target=time.sleep, args=(600,)).start()\n"
            "print('error: something', flush=True)\n"
            "bounded_exit(3, grace_s=1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 3 and done.stdout == "error: something\n", done
    assert "background threads still running 1 s after the error" in done.stderr
