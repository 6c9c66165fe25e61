"""Prediction of raw NIfTI cases with nnU-Net's pipeline (`nnUNetPredictor`).

Per case: preprocess exactly as in training with the plan (`jaxmamba.data.preprocess_case`),
sliding-window logits (Gaussian weights, mirroring; averaged over the networks of an ensemble, as
nnU-Net averages the logits of its folds), logits resampled back to the cropped raw grid with the
plan's probability resampling, softmax, argmax, un-crop (background outside the crop), and the
label map written with the input's affine and header. Everything is written atomically.

The pipeline takes plain `apply_fn`s and a `Plan`, so any network (or a test's identity network)
fits; `jaxmamba.infer.network.network_apply_fn` turns an NNX U-Net into one.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from jaxmamba.atomic import atomic_path, remove_stale_temporaries
from jaxmamba.console import progress_enabled
from jaxmamba.data import DataError, load_volume, preprocess_case, revert_to_raw, write_volume
from jaxmamba.errors import UserError
from jaxmamba.infer.preview import save_preview
from jaxmamba.plans import Plan

if TYPE_CHECKING:  # JAX is imported when a case is predicted, so `--help` answers without it
    from jax.sharding import Mesh

    from jaxmamba.infer.sliding_window import Accumulate, ApplyFn


class PredictionError(DataError):
    """Some cases could not be predicted (the others were); `failures` names each one."""

    def __init__(self, failures: list[str], written: list[Path], output_dir: Path):
        self.failures, self.written = failures, written
        super().__init__(f"{len(failures)} case(s) could not be predicted ({len(written)} "
                         f"written to {output_dir}):\n  " + "\n  ".join(failures))


@dataclasses.dataclass(frozen=True)
class InputCase:
    """One case to predict: its id and one file per channel, in channel order."""

    case_id: str
    files: tuple[Path, ...]


def find_cases(inputs: Sequence[str | Path], num_channels: int,
               file_ending: str = ".nii.gz") -> list[InputCase]:
    """Cases from folders (nnU-Net naming `CASE_XXXX<ending>`) and single files.

    A single file `CASE_0000<ending>` brings its sibling channels; with one channel, a file of any
    name is a case of its own. Raises `DataError` naming every case whose channels are missing
    or extra, and every file that does not follow the naming.
    """
    pattern = re.compile(rf"^(.+)_(\d{{4}}){re.escape(file_ending)}$")
    channels: dict[str, dict[int, Path]] = {}
    problems: list[str] = []

    def add(f: Path, explicit: bool) -> None:
        m = pattern.match(f.name)
        if m:
            channels.setdefault(m.group(1), {})[int(m.group(2))] = f
            if explicit:  # a single channel file given: look for its siblings
                for c in range(num_channels):
                    sibling = f.with_name(f"{m.group(1)}_{c:04d}{file_ending}")
                    if sibling.is_file():
                        channels[m.group(1)][c] = sibling
        elif num_channels == 1 and explicit and f.name.endswith(file_ending):
            channels.setdefault(f.name[: -len(file_ending)], {})[0] = f
        else:
            problems.append(f"{f}: name does not follow CASE_XXXX{file_ending} (XXXX = channel "
                            f"number, 0000..{num_channels - 1:04d})")

    for item in map(Path, inputs):
        if item.is_dir():
            files = [f for f in sorted(item.iterdir())
                     if f.name.endswith(file_ending) and not f.name.startswith(".")]
            if not files:
                problems.append(f"{item}: no {file_ending} files")
            for f in files:
                add(f, explicit=False)
        elif item.is_file():
            add(item, explicit=True)
        else:
            problems.append(f"{item}: no such file or folder")
    cases = []
    for case_id in sorted(channels):
        found = channels[case_id]
        missing = [c for c in range(num_channels) if c not in found]
        extra = sorted(c for c in found if c >= num_channels)
        if missing or extra:
            have = ", ".join(f.name for _, f in sorted(found.items()))
            problems.append(f"case {case_id}: the plan expects {num_channels} channel(s) "
                            f"(_0000..._{num_channels - 1:04d}) but found {have}")
            continue
        cases.append(InputCase(case_id, tuple(found[c] for c in range(num_channels))))
    if len(problems) == 1:
        raise DataError(problems[0])
    if problems:
        raise DataError(f"{len(problems)} problems with the inputs (nothing was predicted):\n  "
                        + "\n  ".join(problems))
    return cases


def logits_to_outputs(logits: np.ndarray, properties: dict, plan: Plan
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Preprocessed-space logits `(S0, S1, S2, K)` -> raw-grid `(labels (z, y, x) uint8/int16,
    probabilities (K, z, y, x) float32)`, as nnU-Net's export (resample logits, softmax, argmax,
    un-crop with background outside the crop)."""
    logits = np.moveaxis(np.asarray(logits, np.float32), -1, 0)
    raw = revert_to_raw(logits, properties, plan, probabilities=True)
    raw -= raw.max(axis=0, keepdims=True)
    probabilities = np.exp(raw, out=raw)
    probabilities /= probabilities.sum(axis=0, keepdims=True)
    inside = np.zeros(probabilities.shape[1:], bool)
    inside[tuple(slice(lo, hi) for lo, hi in properties["bbox"])] = True
    probabilities[:, ~inside] = 0.0
    probabilities[0, ~inside] = 1.0
    labels = probabilities.argmax(axis=0).astype(np.uint8 if plan.num_classes <= 256 else np.int16)
    return labels, probabilities


def predict_case(apply_fns: Sequence[ApplyFn], plan: Plan, case: InputCase, output_dir: Path, *,
                 save_probabilities: bool = False, mirror_axes: Sequence[int] | None = (0, 1, 2),
                 step_size: float = 0.5, batch_size: int | None = None, mesh: Mesh | None = None,
                 accumulate: Accumulate = "auto", preview: bool = False,
                 progress: bool = False) -> Path:
    """Predict one raw case and write `output_dir/CASE<ending>` (and `CASE.npz` with
    `probabilities (K, z, y, x)`, and `previews/CASE.png`); returns the label map's path."""
    from jaxmamba.infer.sliding_window import predict_logits

    data, _, properties = preprocess_case(case.files, plan, case_id=case.case_id)
    image = np.moveaxis(data, 0, -1)
    logits = None
    for i, fn in enumerate(apply_fns):
        desc = case.case_id if len(apply_fns) == 1 else f"{case.case_id} [{i + 1}/{len(apply_fns)}]"
        out = predict_logits(fn, image, plan.patch_size, num_classes=plan.num_classes,
                             step_size=step_size, mirror_axes=mirror_axes, batch_size=batch_size,
                             mesh=mesh, accumulate=accumulate, progress=desc if progress else False)
        logits = out if logits is None else logits + out
    labels, probabilities = logits_to_outputs(logits / len(apply_fns), properties, plan)
    path = output_dir / f"{case.case_id}{plan.file_ending}"
    if save_probabilities:
        _save_npz(output_dir / f"{case.case_id}.npz", probabilities=probabilities)
    if preview:
        image, geometry = load_volume(case.files[0])
        save_preview(output_dir / "previews" / f"{case.case_id}.png", labels, image=image,
                     spacing=geometry["spacing"], title=case.case_id,
                     num_classes=plan.num_classes,
                     class_names={value: name for name, value in plan.labels})
    write_volume(path, labels, properties["geometry"])  # last: marks the case done
    return path


def predict_cases(apply_fns: Sequence[ApplyFn], plan: Plan, cases: Sequence[InputCase],
                  output_dir: str | Path, *, overwrite: bool = False, progress: bool = True,
                  **options) -> tuple[list[Path], list[str]]:
    """Predict every case not yet in `output_dir` (all with `overwrite`); `options` go to
    `predict_case`. Returns `(written paths, skipped case ids)`.

    A case that cannot be predicted (unreadable file, wrong geometry, ...) does not stop the
    others: after the last case, `PredictionError` lists every failure. An output of 0 bytes is
    not a finished case, and temporaries left by a killed run are removed first.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    remove_stale_temporaries(output_dir / "previews")
    written, skipped, failures = [], [], []
    for case in tqdm(cases, desc="predict", unit="case", disable=not progress):
        done = _complete(output_dir / f"{case.case_id}{plan.file_ending}")
        if options.get("save_probabilities"):
            done = done and _complete(output_dir / f"{case.case_id}.npz")
        if done and not overwrite:
            skipped.append(case.case_id)
            continue
        try:
            written.append(predict_case(apply_fns, plan, case, output_dir, progress=progress,
                                        **options))
        except (DataError, ValueError, OSError) as err:
            message = str(err)
            failures.append(message if message.startswith(f"case {case.case_id}:")
                            else f"case {case.case_id}: {message}")
    if failures:
        raise PredictionError(failures, written, output_dir)
    return written, skipped


def _complete(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


# ---------------------------------------------------------------------- `jaxmamba predict`
def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", required=True, nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directory (several: an ensemble, e.g. the five folds; their "
                             "logits are averaged)")
    parser.add_argument("-i", "--input", required=True, nargs="+", type=Path,
                        help="folder of CASE_XXXX.nii.gz images (nnU-Net naming), or files")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for CASE.nii.gz label maps")
    parser.add_argument("--checkpoint", choices=("latest", "best"), default=None,
                        help="latest (end of training, as nnU-Net's checkpoint_final) or best "
                             "(best EMA pseudo-Dice); default: latest if the run has it, else "
                             "best (converted PyTorch checkpoints)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write CASE.npz with 'probabilities' (K, z, y, x) float32")
    parser.add_argument("--preview", action="store_true",
                        help="also write previews/CASE.png: three slices through the largest "
                             "predicted structure over the image")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict cases whose output already exists (default: skip them)")
    parser.add_argument("--no-mirroring", action="store_true",
                        help="switch mirror test-time augmentation off (8x faster)")
    parser.add_argument("--mirror-axes", default="0,1,2",
                        help="spatial axes to mirror, nnU-Net order (default 0,1,2)")
    parser.add_argument("--step-size", type=float, default=0.5,
                        help="window stride as a fraction of the patch (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per network call (default: one per device, or per N "
                             "devices with --spatial N)")
    parser.add_argument("--accumulate", choices=("auto", "device", "host"), default="auto",
                        help="where logits are summed: auto picks the device when it fits")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="predict even with a checkpoint whose parameters hold NaN or inf "
                             "(refused by default: its predictions would be meaningless)")
    parser.add_argument("--spatial", type=int, default=1, metavar="N",
                        help="devices sharing each window, split along its first axis (windows "
                             "larger than one device's memory; default 1)")


def run(args) -> int:
    """Predict every case; on several processes (`jaxmamba.distributed`) each predicts its share
    of the cases (round robin) on its own devices and writes its own outputs."""
    import jax

    from jaxmamba import distributed
    from jaxmamba.infer.network import network_apply_fn
    from jaxmamba.infer.runs import check_same_plan, load_run
    from jaxmamba.infer.sliding_window import data_mesh
    from jaxmamba.ops.spatial import check_patch_splits

    written, skipped, error = [], [], None
    try:
        distributed.initialize()
        say = print if distributed.is_main() else (lambda *a, **k: None)
        mirror_axes = None if args.no_mirroring else _parse_axes(args.mirror_axes)
        runs = [load_run(d, args.checkpoint, allow_non_finite=args.allow_non_finite)
                for d in args.model]
        check_same_plan(runs)
        plan = runs[0].plan
        cases = find_cases(args.input, plan.num_input_channels, plan.file_ending)
        for r in runs:
            say(f"{r.run_dir}: {r.variant}, {r.checkpoint} checkpoint")
        over = (f" over {jax.process_count()} processes" if jax.process_count() > 1 else "")
        say(f"{len(cases)} case(s){over}; patch {list(plan.patch_size)}, mirroring "
            f"{list(mirror_axes) if mirror_axes else 'off'}, {len(jax.local_devices())} "
            f"device(s) per process")
        mesh = data_mesh(spatial=args.spatial)  # this process's devices
        check_patch_splits(plan.patch_size, plan.strides, args.spatial,
                           devices=len(jax.local_devices()), name="--spatial", patch_key=None)
        apply_fns = [network_apply_fn(r.model, mesh) for r in runs]
        try:
            written, skipped = predict_cases(
                apply_fns, plan, distributed.split(cases), args.output, mesh=mesh,
                overwrite=args.overwrite, save_probabilities=args.save_probabilities,
                mirror_axes=mirror_axes, step_size=args.step_size, batch_size=args.batch_size,
                accumulate=args.accumulate, preview=args.preview, progress=progress_enabled())
        finally:
            if distributed.is_main():  # and dataset.json, for `jaxmamba evaluate`
                plan.save(args.output / "nnUNetPlans.json")
    except (UserError, ValueError) as err:
        if not jax.distributed.is_initialized():
            raise  # one process: the CLI entry reports it in one line
        error = str(err)
    if not jax.distributed.is_initialized():
        reports = [{"written": len(written), "skipped": len(skipped), "error": error}]
    else:  # every process learns how the others did, so all end the same way
        reports = distributed.agree("predicted", {"written": len(written),
                                                  "skipped": len(skipped), "error": error})
    errors = [(i, r["error"]) for i, r in enumerate(reports) if r["error"]]
    if errors:
        for i, e in errors:
            print(f"error: process {i}: {e}", file=sys.stderr)
        return 1
    if jax.process_index() != 0:
        return 0
    n_written, n_skipped = (sum(r[k] for r in reports) for k in ("written", "skipped"))
    if n_skipped:
        print(f"skipped {n_skipped} case(s) already predicted in {args.output} (--overwrite "
              f"to predict them again)")
    print(f"wrote {n_written} prediction(s) to {args.output}. Next: jaxmamba evaluate -p "
          f"{args.output} -g LABELS_FOLDER -d {args.output / 'dataset.json'}")
    return 0


def _parse_axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        axes = (-1,)
    if not set(axes) <= {0, 1, 2}:
        raise UserError(f"--mirror-axes {text}: expected axes among 0, 1, 2, e.g. 0,1,2")
    return axes
