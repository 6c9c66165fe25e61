"""Tests that need the data outside the repository (`shared/`): without it they skip, saying what
it is and how to get it, except in CI (CI=true), where they fail."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: One test that needs the reference fixtures, one that needs the Hippocampus dataset.
TESTS = ["tests/test_data_preprocess.py::test_reference_plans_load_unchanged",
         "tests/test_data_hippocampus.py"]


def _pytest(shared: Path, ci: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(JAXMAMBA_SHARED=str(shared), **({"CI": "true"} if ci else {}))
    return subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                             *TESTS], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_missing_shared_folder_skips_outside_ci_and_fails_in_ci(tmp_path):
    runs = {ci: _pytest(tmp_path, ci) for ci in (False, True)}  # both at once: half the wait
    out = {ci: p.communicate(timeout=240)[0] for ci, p in runs.items()}
    local, ci = out[False], out[True]
    assert runs[False].returncode == 0, local
    assert "2 skipped" in local and "error" not in local.lower(), local
    for text in ("PyTorch reference", "MSD Hippocampus", "nnUNetv2_convert_MSD_dataset",
                 "JAXMAMBA_SHARED", str(tmp_path / "reference"), str(tmp_path / "datasets")):
        assert text in local, (text, local)
    assert runs[True].returncode == 1, ci
    assert "2 error" in ci and "CI=true: CI must provide it" in ci, ci
