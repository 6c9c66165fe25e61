"""nnU-Net raw folders: `dataset.json`, `imagesTr/CASE_XXXX<ending>`, `labelsTr/CASE<ending>`.

`RawDataset.open(root)` lists the cases; `check_dataset(root)` reads every file and reports every
problem at once (`jaxmamba check DATASET`), each naming the case and the file.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from jaxmamba.data.io import DataError, load_header, load_volume, read_json

_REQUIRED_KEYS = ("channel_names", "labels", "file_ending")


@dataclasses.dataclass(frozen=True)
class RawCase:
    """One case: a file per channel (channel order) and the label file (None for test images)."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None


@dataclasses.dataclass(frozen=True)
class RawDataset:
    """A parsed nnU-Net raw folder. `cases` are the labelled training cases, sorted by id."""

    root: Path
    meta: dict
    cases: tuple[RawCase, ...]
    test_cases: tuple[RawCase, ...]  # imagesTs (with labelsTs where that folder exists)
    problems: tuple[str, ...]  # training-set problems found while listing (missing files, ...)
    test_problems: tuple[str, ...] = ()  # the same for imagesTs/labelsTs (training ignores them)

    @property
    def channel_names(self) -> tuple[str, ...]:
        names = self.meta["channel_names"]
        return tuple(str(names[k]) for k in sorted(names, key=int))

    @property
    def labels(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.meta["labels"].items()}

    @property
    def file_ending(self) -> str:
        return str(self.meta["file_ending"])

    def case(self, case_id: str) -> RawCase:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"{self.root}: no training case {case_id!r}")

    @classmethod
    def open(cls, root: str | Path) -> RawDataset:
        """Parse `dataset.json` and list `imagesTr`/`labelsTr` (and `imagesTs`/`labelsTs`).

        Raises `DataError` if `dataset.json` is unusable; file-level problems are collected in
        `problems` (use `check_dataset` to see them, or `require_clean()`).
        """
        root = Path(root)
        meta_path = root / "dataset.json"
        meta = read_json(meta_path)
        missing = [k for k in _REQUIRED_KEYS if k not in meta]
        if missing:
            raise DataError(f"{meta_path}: missing key(s) {missing} (nnU-Net v2 dataset.json needs "
                            f"{list(_REQUIRED_KEYS)})")
        channels = meta["channel_names"]
        if not isinstance(channels, dict) or not channels or sorted(map(str, channels)) != sorted(
                map(str, range(len(channels)))):
            raise DataError(f"{meta_path}: channel_names = {meta['channel_names']!r}: expected an "
                            f"object {{\"0\": \"NAME\", \"1\": ...}} numbering the channels from 0")
        if not isinstance(meta["labels"], dict):
            raise DataError(f"{meta_path}: labels = {meta['labels']!r}: expected an object "
                            f"{{\"background\": 0, \"NAME\": 1, ...}}")
        if not isinstance(meta["file_ending"], str) or not meta["file_ending"].startswith("."):
            raise DataError(f"{meta_path}: file_ending = {meta['file_ending']!r}: expected a file "
                            f"ending such as \".nii.gz\"")
        for name, value in meta["labels"].items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise DataError(f"{meta_path}: label {name!r} = {value!r}; only integer labels are "
                                f"supported (no region-based training)")
        n_channels = len(meta["channel_names"])
        ending = str(meta["file_ending"])
        problems: list[str] = []
        cases = _list_cases(root / "imagesTr", root / "labelsTr", n_channels, ending, problems)
        test_labels = root / "labelsTs" if (root / "labelsTs").is_dir() else None
        test_problems: list[str] = []
        test = (_list_cases(root / "imagesTs", test_labels, n_channels, ending, test_problems)
                if (root / "imagesTs").is_dir() else ())
        n = meta.get("numTraining")
        if n is not None and int(n) != len(cases):
            problems.append(f"{meta_path}: numTraining is {n} but labelsTr/imagesTr hold "
                            f"{len(cases)} complete cases")
        return cls(root, meta, tuple(cases), tuple(test), tuple(problems), tuple(test_problems))

    def require_clean(self) -> RawDataset:
        if self.problems:
            raise DataError(f"{self.root}: {len(self.problems)} problem(s); run `jaxmamba check "
                            f"{self.root}`:\n  " + "\n  ".join(self.problems))
        return self


def case_file_pattern(ending: str) -> re.Pattern:
    """nnU-Net's image file name `CASE_XXXX<ending>`: group 1 the case id, group 2 the channel."""
    return re.compile(rf"^(.+)_(\d{{4}}){re.escape(ending)}$")


def _list_cases(images_dir: Path, labels_dir: Path | None, n_channels: int, ending: str,
                problems: list[str]) -> list[RawCase]:
    if not images_dir.is_dir():
        problems.append(f"{images_dir}: folder not found")
        return []
    pattern = case_file_pattern(ending)
    channels: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        if f.name.startswith("."):
            continue
        m = pattern.match(f.name)
        if not m:
            problems.append(f"{f}: name does not match CASE_XXXX{ending}")
            continue
        channels.setdefault(m.group(1), {})[int(m.group(2))] = f
    labels: dict[str, Path] = {}
    if labels_dir is not None:
        if not labels_dir.is_dir():
            problems.append(f"{labels_dir}: folder not found")
        else:
            for f in sorted(labels_dir.iterdir()):
                if f.name.startswith("."):
                    continue
                if not f.name.endswith(ending):
                    problems.append(f"{f}: name does not end with {ending}")
                    continue
                labels[f.name[: -len(ending)]] = f
    cases = []
    for case_id in sorted(set(channels) | set(labels)):
        files = channels.get(case_id, {})
        if not files:
            problems.append(f"case {case_id}: label file {labels[case_id]} has no image in "
                            f"{images_dir}")
            continue
        missing = [c for c in range(n_channels) if c not in files]
        extra = sorted(c for c in files if c >= n_channels)
        if missing:
            problems.append(f"case {case_id}: missing channel file(s) " + ", ".join(
                str(images_dir / f"{case_id}_{c:04d}{ending}") for c in missing))
        if extra:
            problems.append(f"case {case_id}: channel file(s) {extra} beyond the {n_channels} "
                            f"channel(s) of dataset.json channel_names")
        label = labels.get(case_id)
        if labels_dir is not None and label is None:
            problems.append(f"case {case_id}: no label file {labels_dir / (case_id + ending)}")
        if missing or (labels_dir is not None and label is None):
            continue
        cases.append(RawCase(case_id, tuple(files[c] for c in range(n_channels)), label))
    return cases


def label_problems(data: np.ndarray, path: Path, allowed: set[int] | None = None) -> list[str]:
    """What is wrong with a label map's values: values that are not whole numbers (refused by
    `check`, preprocessing and training alike, never rounded), and values not in `allowed`."""
    values = np.unique(data[np.isfinite(data)])
    problems = []
    fractional = values[values != np.rint(values)]
    if fractional.size:
        problems.append(f"{path} holds label value(s) that are not whole numbers "
                        f"({', '.join(f'{v:g}' for v in fractional[:5])}); a label map holds the "
                        f"integers of dataset.json labels (was it resampled with interpolation?)")
    whole = {int(v) for v in values[values == np.rint(values)]}
    bad = sorted(whole - allowed) if allowed is not None else []
    if bad:
        problems.append(f"{path} has label value(s) {bad[:10]} not in dataset.json labels "
                        f"{sorted(allowed)}")
    return problems


def check_case(case: RawCase, label_values: set[int]) -> tuple[list[str], list[str]]:
    """Read one case fully; returns `(errors, warnings)`, each naming the case and the file."""
    errors: list[str] = []
    warnings: list[str] = []
    ref = None
    for f in (*case.images, *((case.label,) if case.label else ())):
        try:
            img, shape = load_header(f)
        except DataError as err:
            errors.append(f"case {case.case_id}: {err}")
            continue
        if ref is None:
            ref = (f, shape, np.asarray(img.affine))
        elif shape != ref[1]:
            errors.append(f"case {case.case_id}: {f} has shape {list(shape)}, but {ref[0]} has "
                          f"{list(ref[1])}")
        elif not np.allclose(img.affine, ref[2], rtol=1e-4, atol=1e-3):
            diff = float(np.abs(np.asarray(img.affine) - ref[2]).max())
            origins = [np.round(a[:3, 3], 3).tolist() for a in (np.asarray(img.affine), ref[2])]
            errors.append(f"case {case.case_id}: {f} has an affine different from {ref[0]} "
                          f"(by up to {diff:.4g}; origin {origins[0]} vs {origins[1]})")
        try:
            data, _ = load_volume(f)
        except DataError as err:
            errors.append(f"case {case.case_id}: {err}")
            continue
        if not np.isfinite(data).all():
            errors.append(f"case {case.case_id}: {f} has {int((~np.isfinite(data)).sum())} "
                          f"non-finite voxel(s) (NaN or inf)")
        if f == case.label:
            errors += [f"case {case.case_id}: {p}" for p in label_problems(data, f, label_values)]
            if not data.any():
                warnings.append(f"case {case.case_id}: {f} is empty (background only); allowed, "
                                f"but the case gives no foreground samples")
    return errors, warnings


def check_dataset(root: str | Path, *, progress: bool = False) -> tuple[list[str], list[str]]:
    """Validate a raw folder: `(errors, warnings)` for every case and file, all reported at once."""
    try:
        ds = RawDataset.open(root)
    except DataError as err:
        return [str(err)], []
    errors, warnings = [*ds.problems, *ds.test_problems], []
    if not ds.cases:
        errors.append(f"{ds.root / 'imagesTr'}: no training cases (expected CASE_0000"
                      f"{ds.file_ending} images there, with CASE{ds.file_ending} in labelsTr)")
    values = set(ds.labels.values())
    if sorted(values) != list(range(len(values))):
        errors.append(f"{ds.root / 'dataset.json'}: label values {sorted(values)} must be "
                      f"0..{len(values) - 1}")
    cases = [*ds.cases, *ds.test_cases]
    if progress:
        from tqdm import tqdm
        cases = tqdm(cases, desc="check", unit="case")
    for case in cases:
        e, w = check_case(case, values)
        errors += e
        warnings += w
    return errors + _spacing_outliers(ds.cases), warnings


def _spacing_outliers(cases: list[RawCase]) -> list[str]:
    """Training cases whose spacing would resample to no voxels, or to more than memory holds,
    at the dataset's median spacing (what the plan's target spacing will be)."""
    from jaxmamba.data.spacing import resampled_problem

    geometry = {}
    for case in cases:
        try:
            img, shape = load_header(case.images[0])
        except DataError:  # said by check_case
            continue
        geometry[case] = (shape[::-1], [float(z) for z in img.header.get_zooms()[:3]][::-1])
    if not geometry:
        return []
    median = np.median([spacing for _, spacing in geometry.values()], axis=0).tolist()
    problems = []
    for case, (shape, spacing) in geometry.items():
        if problem := resampled_problem(shape, spacing, median, "the dataset's median spacing"):
            problems.append(f"case {case.case_id}: {case.images[0]}: {problem}")
    return problems
