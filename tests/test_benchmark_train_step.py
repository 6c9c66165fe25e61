"""benchmarks/train_step.py as a GPU session runs it, on the CPU with a tiny plan: one child
process per row, the rows stamped into one JSON-lines file of `--out`, a failed row written with
its error (and the script's exit code 1)."""

import json
import math
import subprocess
import sys

import pytest
from conftest import tiny_plan
from launching import ROOT, clean_env

SCRIPT = ROOT / "benchmarks" / "train_step.py"
TIMEOUT_S = 600
pytestmark = pytest.mark.newest_jax


def _run(tmp_path, *args):
    (tmp_path / "plan").mkdir(exist_ok=True)
    tiny_plan().save(tmp_path / "plan" / "nnUNetPlans.json")
    command = [sys.executable, str(SCRIPT), "--plans", str(tmp_path / "plan" / "nnUNetPlans.json"),
               "--scan", "xla", "--warmup", "1", "--steps", "1", "--no-preflight",
               "--out", str(tmp_path / "rows"), "--commit", "test@0", *args]
    done = subprocess.run(command, env=clean_env(1), cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    files = sorted((tmp_path / "rows").glob("*"))
    return done, files


def test_one_row_per_combination_stamped_in_one_file(tmp_path):
    done, files = _run(tmp_path, "--variant", "resencunet", "--remat", "states", "none")
    assert done.returncode == 0, done.stderr[-3000:]
    assert [f.name for f in files] == [f"{files[0].name[:10]}_cpu_train-step.jsonl"]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [(r["variant"], r["remat"]) for r in rows] == [("resencunet", "states"),
                                                          ("resencunet", "none")]
    for row in rows:
        assert row["card"] == "cpu" and row["commit"] == "test@0" and row["jax"]
        assert row["step_ms"] > 0 and row["step_compile_s"] > 0 and row["step_module"]
        assert all(math.isfinite(x) for x in row["losses"]) and len(row["losses"]) == 2
    assert "| resencunet | [8, 16, 16] | 2 | 1 |" in done.stdout  # the table, last


def test_a_failed_row_is_written_with_its_error(tmp_path):
    # a patch the plan's two stride-2 stages cannot halve: the child fails building the step
    done, files = _run(tmp_path, "--variant", "resencunet", "--patch", "9", "16", "16")
    assert done.returncode == 1, done.stdout[-3000:]
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["error"].startswith("exit code 1: "), rows
    assert rows[0]["card"] == "cpu" and rows[0]["variant"] == "resencunet"
