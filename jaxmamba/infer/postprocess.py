"""nnU-Net's postprocessing: keep only the largest connected component of the foreground, or of a
class, where that raised the cross-validation Dice (nnunetv2 2.8
`postprocessing/remove_connected_components.py`).

A `Postprocessing` is an ordered list of steps, each "keep the largest component of the mask of
these label values, set the rest of the mask to background" (nnU-Net's
`remove_all_but_largest_component_from_segmentation`; components are 26-connected in 3-D, as
scikit-image's `label` with its default full connectivity, and components tied for the largest
are all kept). It is decided by `jaxmamba.infer.postprocess_decide` on a cross-validation's
merged predictions and stored as `postprocessing.json`:

```
{"format": "jaxmamba-postprocessing-1", "dataset_name": ..., "labels": {"background": 0, ...},
 "file_ending": ".nii.gz", "steps": [{"name": "all foreground", "labels": [1, 2]}, ...],
 "decisions": [...what was tried, the Dice before and after...]}
```

`load` checks the file against the dataset it is applied to (name and labels), `apply_to_folder`
postprocesses label maps on disk (`jaxmamba postprocess`), `Postprocessing.apply` one array
(`jaxmamba predict --postprocessing`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from jaxmamba.atomic import atomic_path, remove_stale_temporaries, write_text
from jaxmamba.data import load_volume
from jaxmamba.data.io import DataError, load_header, write_volume
from jaxmamba.errors import UserError

FORMAT = "jaxmamba-postprocessing-1"
POSTPROCESSING_FILE = "postprocessing.json"
FOREGROUND = "all foreground"


class PostprocessingError(UserError, ValueError):
    """A postprocessing file, or a label map, that cannot be used; the message names it."""


def keep_largest_component(labels: np.ndarray, values: Sequence[int], background: int = 0
                           ) -> np.ndarray:
    """`labels` with every voxel of the mask `isin(labels, values)` outside its largest
    connected component (full connectivity; ties all kept) set to `background`; a new array."""
    mask = np.isin(labels, np.asarray(values))
    components, n = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    out = np.array(labels, copy=True)
    if n <= 1:
        return out
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    out[mask & ~np.isin(components, keep)] = background
    return out


@dataclasses.dataclass(frozen=True)
class Step:
    """Keep the largest component of the voxels holding one of `labels`."""

    name: str  # "all foreground", or the class (or region) name
    labels: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Postprocessing:
    dataset_name: str
    labels: tuple[tuple[str, int | tuple[int, ...]], ...]  # dataset.json labels, in its order
    steps: tuple[Step, ...]
    file_ending: str = ".nii.gz"
    decisions: tuple[dict, ...] = ()  # how it was decided (for people; not used to apply)

    @property
    def label_values(self) -> set[int]:
        """Every value a label map of the dataset may hold (background included)."""
        out = {0}
        for _, v in self.labels:
            out |= {v} if isinstance(v, int) else set(v)
        return out

    def apply(self, labels: np.ndarray) -> np.ndarray:
        """The steps in order on one label map (a new array of its dtype)."""
        for step in self.steps:
            labels = keep_largest_component(labels, step.labels)
        return labels

    def describe(self) -> str:
        """One line: what is applied."""
        if not self.steps:
            return "postprocessing: none (keeping only the largest component did not help)"
        return "postprocessing: keep the largest component of " + ", then ".join(
            s.name for s in self.steps)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "dataset_name": self.dataset_name,
                "labels": {k: (v if isinstance(v, int) else list(v)) for k, v in self.labels},
                "file_ending": self.file_ending,
                "steps": [{"name": s.name, "labels": list(s.labels)} for s in self.steps],
                "decisions": list(self.decisions)}

    def save(self, path: str | Path) -> None:
        write_text(path, json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n")


def labels_of(dataset_labels: Mapping[str, Any]) -> tuple[tuple[str, int | tuple[int, ...]], ...]:
    """dataset.json `labels` as `(name, value or values)` pairs, in the file's order."""
    return tuple((str(k), int(v) if isinstance(v, int) else tuple(int(x) for x in v))
                 for k, v in dataset_labels.items())


def load(path: str | Path, *, dataset_name: str | None = None,
         labels: Mapping[str, Any] | None = None) -> Postprocessing:
    """Read `postprocessing.json`; with `dataset_name` / `labels` (dataset.json's), refuse a file
    decided for another dataset."""
    path = Path(path)
    hint = "give the postprocessing.json that `jaxmamba crossval --postprocessing` wrote"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise PostprocessingError(f"{path}: file not found; {hint}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PostprocessingError(f"{path}: not valid JSON ({err}); {hint}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise PostprocessingError(f"{path}: not a jaxmamba postprocessing file (expected "
                                  f"\"format\": \"{FORMAT}\"); {hint}")
    try:
        pp = Postprocessing(
            dataset_name=str(raw["dataset_name"]), labels=labels_of(raw["labels"]),
            steps=tuple(Step(str(s["name"]), tuple(int(v) for v in s["labels"]))
                        for s in raw["steps"]),
            file_ending=str(raw.get("file_ending", ".nii.gz")),
            decisions=tuple(raw.get("decisions", ())))
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise PostprocessingError(f"{path}: malformed ({type(err).__name__}: {err}); "
                                  f"{hint}") from None
    unknown = sorted({v for s in pp.steps for v in s.labels} - (pp.label_values - {0}))
    if unknown:
        raise PostprocessingError(f"{path}: its steps name label value(s) {unknown} that its "
                                  f"labels {dict(pp.labels)} do not define as foreground; "
                                  f"{hint}")
    if dataset_name is not None and pp.dataset_name != dataset_name:
        raise PostprocessingError(f"{path}: decided for dataset {pp.dataset_name!r}, not "
                                  f"{dataset_name!r}; use the postprocessing.json of a "
                                  f"cross-validation on {dataset_name}")
    if labels is not None and pp.labels != labels_of(labels):
        raise PostprocessingError(f"{path}: its labels {dict(pp.labels)} are not the dataset's "
                                  f"{dict(labels)}; use the postprocessing.json of a "
                                  f"cross-validation on this dataset")
    return pp


def read_label_map(path: Path, valid: set[int]) -> tuple[np.ndarray, dict]:
    """An integer label map (z, y, x) in its file's dtype, and its geometry; label values
    outside `valid` are a `PostprocessingError` naming the file."""
    img, _ = load_header(path)
    dtype = img.get_data_dtype()
    data, geometry = load_volume(path, dtype=np.float64)
    labels = np.rint(data)
    if not np.array_equal(labels, data):
        raise PostprocessingError(f"{path}: holds non-integer values; expected a label map")
    bad = sorted(set(np.unique(labels).astype(int).tolist()) - valid)
    if bad:
        raise PostprocessingError(f"{path}: has label value(s) {bad[:10]} that the "
                                  f"postprocessing's dataset does not define ({sorted(valid)}); "
                                  f"use the postprocessing.json of this dataset")
    out_dtype = dtype if np.issubdtype(dtype, np.integer) else np.int16
    return labels.astype(out_dtype), geometry


def label_files(folder: Path, file_ending: str) -> list[Path]:
    """The label maps in `folder` (`*<file_ending>`, hidden names skipped), sorted."""
    return sorted(f for f in folder.iterdir()
                  if f.name.endswith(file_ending) and not f.name.startswith(".") and f.is_file())


def apply_to_folder(pp: Postprocessing, inputs: Sequence[Path], output_dir: str | Path, *,
                    progress: bool = False) -> list[Path]:
    """Postprocess label-map files into `output_dir` (same names, each written atomically with
    its input's geometry); returns the written paths. Every file is tried: the failures are
    raised together at the end as one `PostprocessingError`."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    written, failures = [], []
    valid = pp.label_values
    for path in tqdm(inputs, desc="postprocess", unit="case", disable=not progress):
        try:
            labels, geometry = read_label_map(path, valid)
            target = out / path.name
            write_volume(target, pp.apply(labels), geometry)
            written.append(target)
        except (PostprocessingError, DataError) as err:
            failures.append(str(err))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise PostprocessingError(f"{failures[0]}{more}")
    return written


def copy_dataset_files(src: Path, dst: Path, names: Sequence[str]) -> None:
    """Copy the files `names` (dataset.json, nnUNetPlans.json) that exist in `src` to `dst`."""
    for name in names:
        if (src / name).is_file() and (src / name).resolve() != (dst / name).resolve():
            with atomic_path(dst / name) as tmp:
                shutil.copyfile(src / name, tmp)
