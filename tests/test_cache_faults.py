"""The preprocessing cache knows its inputs (`jaxmamba.data.cache_check`): a raw case changed
after preprocessing is preprocessed again, a damaged cached array is named (case and file) and
rebuilt, and a complete cache is used without a write (a read-only mount). Degenerate voxel
spacings are refused by `check` and `preprocess`, naming the case and the file. Real files,
through the command line as a user runs it."""

import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from conftest import build_phantom, tiny_run_config
from launching import ROOT, clean_env

from jaxmamba.cli import main
from jaxmamba.data import DataError
from jaxmamba.data.preprocess import case_paths, load_preprocessed
from jaxmamba.train.data import prepare_data

CASE = "phantom_002"


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """A phantom dataset and its cache, made once; tests work on copies."""
    root = build_phantom(tmp_path_factory, "cached", n_cases=5)
    assert main(["preprocess", str(root / "raw"), "-o", str(root / "cache"), "-j", "0"]) == 0
    return root


@pytest.fixture
def copy(preprocessed, tmp_path):
    for name in ("raw", "cache"):
        shutil.copytree(preprocessed / name, tmp_path / name)
    return tmp_path


def _preprocess(root, capsys):
    capsys.readouterr()
    rc = main(["preprocess", str(root / "raw"), "-o", str(root / "cache"), "-j", "0"])
    out = capsys.readouterr()
    return rc, out.out + out.err


def _image(root, case=CASE):
    return root / "raw" / "imagesTr" / f"{case}_0000.nii.gz"


def _rewrite_image(path, change=lambda a: a, zoom=None):
    img = nib.load(path)
    new = nib.Nifti1Image(change(np.asarray(img.dataobj)), img.affine, img.header.copy())
    if zoom is not None:  # the header's pixdim alone, as an editing tool leaves it
        new.header["pixdim"][1] = zoom
    nib.save(new, path)


def test_a_raw_case_changed_after_preprocessing_is_redone(copy, capsys):
    before = np.load(case_paths(copy / "cache", CASE)["data"])
    _rewrite_image(_image(copy), lambda a: np.flip(a, 0).copy())
    rc, out = _preprocess(copy, capsys)
    assert rc == 0
    assert f"redoing case {CASE}: {_image(copy)} changed since it was preprocessed" in out
    assert out.count("redoing") == 1  # the other cases are skipped
    after = np.load(case_paths(copy / "cache", CASE)["data"])
    fresh = copy / "fresh"  # the changed dataset preprocessed from nothing
    assert main(["preprocess", str(copy / "raw"), "-o", str(fresh), "-j", "0"]) == 0
    np.testing.assert_array_equal(after, np.load(case_paths(fresh, CASE)["data"]))
    assert after.shape == before.shape and not np.array_equal(after, before)
    rc, out = _preprocess(copy, capsys)
    assert rc == 0 and "redoing" not in out


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _garble_header(path):
    data = bytearray(path.read_bytes())
    data[10:40] = b"\x07" * 30
    path.write_bytes(bytes(data))


def _other_shape(path):
    np.save(path, np.zeros((1, 3, 3, 3), np.float32))


@pytest.mark.parametrize("damage, said", [
    (_truncate, "(truncated)"), (_garble_header, "is not a readable .npy array"),
    (_other_shape, "has shape [1, 3, 3, 3], its properties say")])
def test_a_damaged_cached_array_is_named_and_rebuilt(copy, capsys, damage, said):
    path = case_paths(copy / "cache", CASE)["data"]
    good = path.read_bytes()
    damage(path)
    rc, out = _preprocess(copy, capsys)
    assert rc == 0
    assert f"redoing case {CASE}: {path}" in out and said in out, out
    assert path.read_bytes() == good  # rebuilt as it was (preprocessing is deterministic)


def test_reading_a_damaged_array_names_the_case_and_the_file(copy):
    """What training's data loader says if an array breaks after the cache was checked."""
    path = case_paths(copy / "cache", CASE)["seg"]
    _truncate(path)
    with pytest.raises(DataError, match=rf"case {CASE}: the cached array {path} cannot be read "
                                        rf"\(ValueError: .*\); run `jaxmamba preprocess`"):
        load_preprocessed(copy / "cache", CASE)


def _snapshot(folder):
    return {p: (p.stat().st_mtime_ns, p.stat().st_size, p.stat().st_ino)
            for p in sorted(folder.rglob("*"))}


def test_a_complete_cache_is_used_without_writing_to_it(copy, capsys):
    """Training's data preparation and `preprocess` on a complete cache write nothing there."""
    before = _snapshot(copy / "cache")
    rc, out = _preprocess(copy, capsys)
    assert rc == 0 and "redoing" not in out
    plan, cache, train_ids, val_ids = prepare_data(tiny_run_config(copy, copy / "run"),
                                                   progress=False)
    assert cache == copy / "cache" and len(train_ids) == 4 and len(val_ids) == 1
    assert _snapshot(copy / "cache") == before


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_preprocess_on_a_read_only_mount(copy):
    """The dataset and its complete cache on a read-only mount: `preprocess` finds everything
    done; a changed case cannot be redone there, and the line says which and why."""
    command = [sys.executable, "-m", "jaxmamba.cli", "preprocess", str(copy / "raw"), "-o",
               str(copy / "cache"), "-j", "0"]
    script = (f"mount --bind {copy} {copy} && mount -o remount,bind,ro {copy} && "
              + " ".join(command))
    done = subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True,
                          text=True, env=clean_env(1), cwd=ROOT, timeout=300)
    if "mount" in done.stderr and done.returncode != 0 and "preprocess" not in done.stdout:
        pytest.skip(f"no read-only bind mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "preprocessed into" in done.stdout and "redoing" not in done.stdout
    _rewrite_image(_image(copy), lambda a: np.flip(a, 1).copy())
    done = subprocess.run(["unshare", "-rm", "bash", "-c", script], capture_output=True,
                          text=True, env=clean_env(1), cwd=ROOT, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stdout + done.stderr
    assert f"redoing case {CASE}: {_image(copy)} changed" in done.stdout
    assert done.stderr.startswith(f"error: {copy / 'cache' / '3d_fullres'}: cannot write case "
                                  f"{CASE}'s preprocessed arrays (Read-only file system); make "
                                  f"the cache folder writable"), done.stderr


@pytest.mark.parametrize("zoom, said", [
    (float("nan"), "voxel spacing [3.0, 1.0, nan] (the header's pixdim): each must be a finite "
                   "number of mm > 0"),
    (float("inf"), "voxel spacing [3.0, 1.0, inf] (the header's pixdim): each must be a finite"),
    (1e-6, "voxel spacing [3.0, 1.0, 1e-06] mm is far from the dataset's median spacing "
           "[3.0, 1.0, 1.0]"),
    (1e6, "voxel spacing [3.0, 1.0, 1000000.0] mm is far from the dataset's median spacing")])
def test_a_degenerate_spacing_is_refused_by_check_and_preprocess(copy, capsys, zoom, said):
    """pixdim[1] is the NIfTI x axis, the last of nnU-Net's (z, y, x)."""
    _rewrite_image(_image(copy), zoom=zoom)
    shutil.rmtree(copy / "cache")
    capsys.readouterr()
    assert main(["check", str(copy / "raw")]) == 1
    out = capsys.readouterr()
    text = out.out + out.err
    assert f"case {CASE}: {_image(copy)}: " in text and said in text, text
    rc, out = _preprocess(copy, capsys)
    if zoom > 0:  # a number: the plan's spacing is the median, and the case is refused there
        said = said.replace("the dataset's median spacing", "the plan's spacing")
    assert rc == 1 and f"case {CASE}: {_image(copy)}: " in out and said in out, out
    assert "Traceback" not in out
