"""Final validation at the end of training: sliding-window prediction of whole held-out cases,
scored like `jaxmamba evaluate` (paper_spec §5; nnU-Net's `perform_actual_validation`).

Two sets, when they exist: `validation` (the fold's validation cases from `imagesTr`) and `test`
(`imagesTs` with `labelsTs`, e.g. the demo's held-out blocks, never trained on). Predictions are
NIfTI files in `RUN_DIR/final_validation/<set>/` with `summary.json` and `summary.csv` beside.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxmamba.data import RawDataset
from jaxmamba.infer.evaluate import evaluate_folder, write_summary
from jaxmamba.infer.network import network_apply_fn
from jaxmamba.infer.predict import InputCase, find_cases, predict_cases
from jaxmamba.plans import Plan

FOLDER = "final_validation"


def final_validation(model: nnx.Module, plan: Plan, raw_dir: str | Path, val_ids: Sequence[str],
                     run_dir: str | Path, *, mesh: Mesh | None = None, progress: bool = True,
                     ) -> dict[str, dict[str, float]]:
    """Predict and score the held-out sets; returns `{set: {class or "mean": Dice}}`."""
    raw = Path(raw_dir)
    dataset = RawDataset.open(raw)
    sets = []
    if val_ids:
        cases = [InputCase(c, tuple(dataset.case(c).images)) for c in val_ids]
        sets.append(("validation", cases, raw / "labelsTr", True))
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir():
        cases = find_cases([raw / "imagesTs"], plan.num_input_channels, plan.file_ending)
        sets.append(("test", cases, raw / "labelsTs", False))
    if not sets:
        return {}
    apply_fn = network_apply_fn(model, mesh)
    results = {}
    for name, cases, labels, partial in sets:
        out = set_folder(run_dir, name)
        predict_cases([apply_fn], plan, cases, out, overwrite=True, progress=progress)
        summary = evaluate_folder(out, labels, raw / "dataset.json", partial=partial)
        write_summary(summary, out)
        results[name] = {region: m["Dice"] for region, m in summary["mean"].items()}
    return results


def set_folder(run_dir: str | Path, name: str) -> Path:
    """Where the predictions and summaries of the held-out set `name` go."""
    return Path(run_dir) / FOLDER / name


def format_results(results: dict[str, dict[str, float]], run_dir: str | Path) -> str:
    """Per set: the mean and per-class Dice, and the folder of its predictions and summaries."""
    if not results:
        return ("final validation: no held-out cases (the fold has no validation cases and the "
                "dataset no imagesTs with labelsTs)")
    lines = []
    for name, dice in results.items():
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in dice.items() if k != "mean")
        lines += [f"final {name} Dice: mean {dice['mean']:.4f} ({per_class})",
                  f"  in {set_folder(run_dir, name)}/: predictions, summary.json, summary.csv"]
    return "\n".join(lines)


def merged_model(graphdef: nnx.GraphDef, params, rest) -> nnx.Module:
    """The trained network as a module (for prediction), from the train state's parts."""
    return nnx.merge(graphdef, jax.device_get(params), jax.device_get(rest))
