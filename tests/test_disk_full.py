"""A full disk: one line naming the folder, the bytes needed and free, and what was kept; then
the same command, with room again, goes on from there.

The real tests mount a small tmpfs in a private mount namespace (`unshare -rm`, no root needed
where user namespaces are enabled) and run `train.py` and `jaxmamba preprocess` into it as real
processes, under timeouts; the unit tests take a real ENOSPC from `/dev/full`.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_CONFIG
from launching import ROOT, clean_env

from jaxmamba.diskspace import DiskFullError, free_bytes, human, is_disk_full
from jaxmamba.rundir import RunDirError
from jaxmamba.train.saving import failing_save

KEPT = "the checkpoint of epoch 2 (RUN/checkpoints/latest/2) is kept"


def _no_room():
    with open("/dev/full", "wb") as f:
        f.write(b"x" * 8192)
        f.flush()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_save_without_room_is_one_line_with_the_bytes(tmp_path):
    with pytest.raises(DiskFullError) as caught:
        with failing_save(tmp_path, "the checkpoint of epoch 3", 5_000_000, KEPT):
            _no_room()
    message = str(caught.value)
    assert "\n" not in message and is_disk_full(caught.value)
    assert message.startswith(f"{tmp_path}: no space left on the device for the checkpoint of "
                              f"epoch 3: it needs about 5.0 MB, {human(free_bytes(tmp_path))} "
                              f"free; {KEPT}; free some space")
    with pytest.raises(RunDirError, match=r"saving the checkpoint of epoch 3 failed \("
                                          r"PermissionError: .*denied.*\); the checkpoint of "
                                          r"epoch 2 .* is kept; run the same command again"):
        with failing_save(tmp_path, "the checkpoint of epoch 3", 1, KEPT):
            raise PermissionError(13, "Permission denied", str(tmp_path / "x"))
    with pytest.raises(KeyError):  # not a save's failure: as it is
        with failing_save(tmp_path, "the checkpoint of epoch 3", 1, KEPT):
            raise KeyError("x")


def test_a_short_write_counts_as_full_only_without_room(tmp_path):
    """numpy says `N requested and M written` without an errno: full only if the room is gone."""
    short = OSError("8192 requested and 4096 written")
    assert is_disk_full(short, tmp_path, 2 * free_bytes(tmp_path) + 1)
    assert not is_disk_full(short, tmp_path, 1)
    assert not is_disk_full(ValueError("x"))


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_tmpfs = pytest.mark.skipif(not _unshare_works(),
                                 reason="needs `unshare -rm` (user and mount namespaces) to mount "
                                        "a small tmpfs without root")

SCRIPT = """
set -u
mount -t tmpfs -o size={small} tmpfs {mount}
{first} > {log1} 2>&1; echo "$?" > {log1}.rc
mount -o remount,size={large} {mount}
{second} > {log2} 2>&1; echo "$?" > {log2}.rc
"""


def _in_tmpfs(tmp_path, small, large, first, second, cache_dir=None):
    """Run `first` with `small` bytes of tmpfs at tmp_path/full, then `second` with `large`:
    `[(exit status, output), ...]`."""
    mount = tmp_path / "full"
    mount.mkdir()
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    script = SCRIPT.format(small=small, large=large, mount=mount,
                           first=" ".join(first), second=" ".join(second),
                           log1=logs[0], log2=logs[1])
    done = subprocess.run(["unshare", "-rm", "bash", "-c", script], env=clean_env(1, cache_dir),
                          cwd=ROOT, timeout=600, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return [(int(Path(f"{log}.rc").read_text()), log.read_text()) for log in logs]


@pytest.mark.slow
@needs_tmpfs
def test_training_on_a_full_disk_keeps_the_last_checkpoint_and_resumes(phantom, tmp_path):
    run_dir = tmp_path / "full" / "run"
    train = [sys.executable, str(ROOT / "train.py"), str(TINY_CONFIG),
             f"data.raw_dir={phantom / 'raw'}", f"data.preprocessed_dir={phantom / 'cache'}",
             f"train.run_dir={run_dir}", "log.progress=false", "log.tensorboard=false",
             "log.plot=false", "train.final_validation=false", "train.epochs=3"]
    (rc, said), (rc2, said2) = _in_tmpfs(tmp_path, "1000k", "8m", train, train,
                                         cache_dir=phantom / "xla")
    assert rc == 1, said
    errors = [line for line in said.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "Traceback" not in said, said
    assert errors[0].startswith(f"error: {run_dir / 'checkpoints'}: no space left on the device "
                                f"for the checkpoint of epoch "), said
    assert "it needs about" in errors[0] and " free; " in errors[0]
    assert "is kept; free some space (or choose another folder) and run the same command " \
           "again" in errors[0]
    assert rc2 == 0, said2
    assert "resumed" in said2 and "Traceback" not in said2, said2


@pytest.mark.slow
@needs_tmpfs
def test_preprocessing_on_a_full_disk_stops_in_one_line_and_resumes(phantom, tmp_path):
    cache = tmp_path / "full" / "cache"
    command = [sys.executable, "-m", "jaxmamba.cli", "preprocess", str(phantom / "raw"), "-o",
               str(cache), "-j", "0"]
    (rc, said), (rc2, said2) = _in_tmpfs(tmp_path, "96k", "4m", command, command)
    assert rc == 1 and said.count("\n") == 1 and "Traceback" not in said, said
    assert said.startswith(f"error: {cache / '3d_fullres'}: no space left on the device for "
                           f"case phantom_"), said
    assert "preprocessed arrays: it needs about" in said
    assert "the cases finished before are kept; free some space" in said
    assert "fix the files" not in said  # not the data's fault
    assert rc2 == 0 and "preprocessed into" in said2, said2
