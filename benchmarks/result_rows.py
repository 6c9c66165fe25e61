"""A benchmark run's rows as JSON lines in `benchmarks/results/`, committed with the tables of
docs/benchmarks.md so that a number can be checked without rerunning it.

One file per run, `DATE_CARD_KIND.jsonl` (`2026-12-07_nvidia-h200_scan.jsonl`; `-2`, `-3`, ... for
a later run of the same day and card). Every row carries the card, the JAX version, the date and
the commit of the tree measured (`branch@sha`, `+uncommitted` when tracked files differ from it).
Rows are appended as they come to `NAME.partial`, renamed to `NAME` when the run ends, so a run
that dies (a GPU fault) leaves its finished rows under a name that says so.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parent / "results"


def _git(tree: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()


def commit_of(tree: Path) -> str:
    """`branch@short-sha` of the git checkout holding `tree`, `+uncommitted` when its tracked
    files differ from that commit; `unknown (PATH, not a git checkout)` otherwise."""
    try:
        sha = _git(tree, "rev-parse", "--short", "HEAD")
        branch = _git(tree, "rev-parse", "--abbrev-ref", "HEAD")
        dirty = _git(tree, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return f"unknown ({tree}, not a git checkout)"
    return f"{branch}@{sha}" + ("+uncommitted" if dirty else "")


def card() -> str:
    """The first device's kind ("NVIDIA H200"; "cpu" without an accelerator)."""
    dev = jax.devices()[0]
    return getattr(dev, "device_kind", str(dev))


def stamp(commit: str, card_name: str | None = None) -> dict:
    """The fields every row of this run carries (`card_name` saves starting JAX's backend)."""
    return dict(card=card_name or card(), jax=jax.__version__, date=time.strftime("%Y-%m-%d"),
                commit=commit)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


class RunFile:
    """`write(row)` appends `row`, stamped, to this run's file; `close()` gives it its name."""

    def __init__(self, folder: Path, kind: str, commit: str, card_name: str | None = None):
        self.stamp = stamp(commit, card_name)
        folder.mkdir(parents=True, exist_ok=True)
        base = f"{self.stamp['date']}_{slug(self.stamp['card'])}_{kind}"

        def name(n):
            return f"{base}-{n}.jsonl" if n > 1 else f"{base}.jsonl"

        n = 1
        while (folder / name(n)).exists() or (folder / f"{name(n)}.partial").exists():
            n += 1
        self.path = folder / name(n)
        self.partial = folder / f"{name(n)}.partial"
        self.partial.write_text("")

    def write(self, row: dict) -> dict:
        """`row` with this run's stamp (fields the row already has win: a baseline's commit)."""
        row = {**row, **{k: v for k, v in self.stamp.items() if k not in row}}
        with self.partial.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def close(self) -> Path:
        self.partial.replace(self.path)
        return self.path


def read_rows(path: Path) -> list[dict]:
    """The rows of a run file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
