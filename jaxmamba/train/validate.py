"""Final validation at the end of training: sliding-window prediction of whole held-out cases,
scored like `jaxmamba evaluate` (nnU-Net's `nnUNetTrainer.perform_actual_validation`).

Two sets, when they exist: `validation` (the fold's validation cases from `imagesTr`) and `test`
(`imagesTs` with `labelsTs`, e.g. the demo's held-out blocks, never trained on). Predictions are
NIfTI files in `RUN_DIR/final_validation/<set>/` with `summary.json` and `summary.csv` beside;
`RUN_DIR/final_validation/results.json` is written last and marks the validation done (a run
killed before it redoes the validation when started again).

On several processes the cases are split over them (round robin); each predicts its own on its
local devices, so the predictions, and the Dice, are those of one process with as many devices.
Process 0 scores.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxmamba import console, distributed
from jaxmamba.atomic import write_text
from jaxmamba.config import Config
from jaxmamba.data import RawDataset
from jaxmamba.infer.evaluate import evaluate_folder, write_summary
from jaxmamba.infer.network import network_apply_fn
from jaxmamba.infer.predict import InputCase, find_cases, predict_cases
from jaxmamba.infer.sliding_window import WindowOptions
from jaxmamba.ops.mesh import local_mesh
from jaxmamba.plans import Plan
from jaxmamba.rundir import FINAL_VALIDATION_DIR, FINAL_VALIDATION_DONE


def after_training(cfg: Config, graphdef: nnx.GraphDef, params, rest, plan: Plan,
                   val_ids: Sequence[str], run_dir: Path, *, progress: bool,
                   say: Callable[[str], None]) -> dict[str, dict[str, float]]:
    """`final_validation` of a finished run's network (its train state's `params`, `rest`) on
    this process's devices (`--spatial` as `mesh.spatial`), its results said; none for
    `data.fold=all` (nothing is held out)."""
    if cfg.data.fold == "all":
        say(console.no_final_validation_line())
        return {}
    t0 = time.perf_counter()
    model = merged_model(graphdef, params, rest)
    results = final_validation(model, plan, cfg.data.raw_dir, val_ids, run_dir,
                               epoch=cfg.train.epochs, mesh=local_mesh(spatial=cfg.mesh.spatial),
                               progress=progress)
    say(console.validation_line(format_results(results, run_dir), time.perf_counter() - t0))
    return results


def final_validation(model: nnx.Module, plan: Plan, raw_dir: str | Path, val_ids: Sequence[str],
                     run_dir: str | Path, *, epoch: int, mesh: Mesh | None = None,
                     progress: bool = True) -> dict[str, dict[str, float]]:
    """Predict and score the held-out sets with the network of `epoch` epochs; returns
    `{set: {class or "mean": Dice}}`. `mesh`: this process's devices (default: all local)."""
    raw, out_root = Path(raw_dir), Path(run_dir) / FINAL_VALIDATION_DIR
    if distributed.is_main():
        (out_root / FINAL_VALIDATION_DONE).unlink(missing_ok=True)
    dataset = RawDataset.open(raw)
    sets = []
    if val_ids:
        cases = [InputCase(c, tuple(dataset.case(c).images)) for c in val_ids]
        sets.append(("validation", cases, raw / "labelsTr", True))
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir():
        cases = find_cases([raw / "imagesTs"], plan.num_input_channels, plan.file_ending)
        sets.append(("test", cases, raw / "labelsTs", False))
    apply_fn = network_apply_fn(model, mesh)
    results = {}
    for name, cases, labels, partial in sets:
        out = set_folder(run_dir, name)
        predict_cases([apply_fn], plan, distributed.split(cases), out,
                      window=WindowOptions(mesh=mesh), overwrite=True, progress=progress)
        distributed.barrier(f"final validation {name}")
        results[name] = distributed.run_once(
            f"score {name}", lambda out=out, labels=labels, partial=partial: _score(
                out, labels, raw / "dataset.json", partial))
    if distributed.is_main():
        write_text(out_root / FINAL_VALIDATION_DONE,
                   json.dumps({"epoch": epoch, "results": results}, indent=1))
    distributed.barrier("final validation written")
    return results


def _score(out: Path, labels: Path, dataset_json: Path, partial: bool) -> dict[str, float]:
    summary = evaluate_folder(out, labels, dataset_json, partial=partial)
    write_summary(summary, out)
    return {region: m["Dice"] for region, m in summary["mean"].items()}


def done(run_dir: str | Path, epoch: int) -> dict | None:
    """The results of a completed final validation of `run_dir` after `epoch` epochs, or None."""
    path = Path(run_dir) / FINAL_VALIDATION_DIR / FINAL_VALIDATION_DONE
    record = json.loads(path.read_text()) if path.is_file() else {}
    return record["results"] if record.get("epoch") == epoch else None


def set_folder(run_dir: str | Path, name: str) -> Path:
    """Where the predictions and summaries of the held-out set `name` go."""
    return Path(run_dir) / FINAL_VALIDATION_DIR / name


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
    """The trained network as a module (for prediction), from the train state's parts: host
    copies of this process's replica (the state is replicated over all processes' devices)."""
    def host(x):
        return jax.device_get(x.addressable_data(0)) if isinstance(x, jax.Array) else x
    return nnx.merge(graphdef, jax.tree.map(host, params), jax.tree.map(host, rest))
