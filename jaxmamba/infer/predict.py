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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from jaxmamba.atomic import atomic_path, remove_stale_temporaries
from jaxmamba.data import DataError, load_volume, preprocess_case, revert_to_raw, write_volume
from jaxmamba.data.dataset import case_file_pattern
from jaxmamba.infer.preview import save_preview
from jaxmamba.plans import Plan

if TYPE_CHECKING:  # JAX is imported when a case is predicted, so `--help` answers without it
    from jaxmamba.infer.sliding_window import ApplyFn, WindowOptions


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
    pattern = case_file_pattern(file_ending)
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
                 window: WindowOptions | None = None, save_probabilities: bool = False,
                 preview: bool = False,
                 postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                 progress: bool = False) -> Path:
    """Predict one raw case with sliding windows (`window`, default nnU-Net's on this process's
    devices) and write `output_dir/CASE<ending>` (and `CASE.npz` with `probabilities (K, z, y,
    x)`, and `previews/CASE.png`); returns the label map's path. `postprocess` maps the label map
    (z, y, x) before it is drawn and written (e.g.
    `jaxmamba.infer.postprocess.Postprocessing.apply`; the probabilities stay as predicted)."""
    from jaxmamba.infer.sliding_window import DEFAULT_WINDOW, predict_logits

    data, _, properties = preprocess_case(case.files, plan, case_id=case.case_id)
    image = np.moveaxis(data, 0, -1)
    logits = None
    for i, fn in enumerate(apply_fns):
        desc = case.case_id if len(apply_fns) == 1 else f"{case.case_id} [{i + 1}/{len(apply_fns)}]"
        out = predict_logits(fn, image, plan.patch_size, num_classes=plan.num_classes,
                             window=window or DEFAULT_WINDOW, progress=desc if progress else False)
        logits = out if logits is None else logits + out
    labels, probabilities = logits_to_outputs(logits / len(apply_fns), properties, plan)
    if postprocess is not None:
        labels = postprocess(labels)
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
                  output_dir: str | Path, *, window: WindowOptions | None = None,
                  save_probabilities: bool = False, preview: bool = False,
                  postprocess: Callable[[np.ndarray], np.ndarray] | None = None,
                  overwrite: bool = False, progress: bool = True) -> tuple[list[Path], list[str]]:
    """Predict every case not yet in `output_dir` (all with `overwrite`) as `predict_case` does.
    Returns `(written paths, skipped case ids)`.

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
        if save_probabilities:
            done = done and _complete(output_dir / f"{case.case_id}.npz")
        if done and not overwrite:
            skipped.append(case.case_id)
            continue
        try:
            written.append(predict_case(apply_fns, plan, case, output_dir, window=window,
                                        save_probabilities=save_probabilities, preview=preview,
                                        postprocess=postprocess, progress=progress))
        except (DataError, ValueError, OSError, MemoryError) as err:
            message = str(err) or f"{type(err).__name__} (the case does not fit in memory)"
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
