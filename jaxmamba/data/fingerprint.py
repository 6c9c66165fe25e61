"""Dataset fingerprint: per-case spacing, shape, non-zero bounding box and foreground intensities.

Follows nnU-Net's fingerprint extractor (ecosystem.md §2.1 "Fingerprint"): foreground voxels
(label > 0) are sampled per case and channel with a fixed seed (at most 1e8 in all), then the
dataset-wide 0.5 / 50 / 99.5 percentiles, mean, std, min and max are computed per channel. The
result is written as `dataset_fingerprint.json` with nnU-Net's key names.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from jaxmamba.data.cropping import crop_to_nonzero
from jaxmamba.data.dataset import RawCase, RawDataset, label_problems
from jaxmamba.data.io import DataError, load_volume

_MAX_FG_SAMPLES = 10**8
_SEED = 1234


def load_case(case: RawCase) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """`(data (C, S0, S1, S2) float32, seg (S0, S1, S2) int16 or None, geometry of channel 0)`.

    Raises `DataError` naming the case and the file if a file is unreadable, shapes or affines
    disagree, voxels are not finite, or the label map holds values that are not whole numbers."""
    arrays, geometry = [], None
    files = (*case.images, *((case.label,) if case.label is not None else ()))
    for f in files:
        try:
            a, g = load_volume(f)
        except DataError as err:
            raise DataError(f"case {case.case_id}: {err}") from err
        geometry = geometry or g
        if g["shape"] != geometry["shape"] or not np.allclose(g["affine"], geometry["affine"],
                                                              rtol=1e-4, atol=1e-3):
            raise DataError(f"case {case.case_id}: {f} has a shape or affine different from "
                            f"{files[0]}")
        if not np.isfinite(a).all():
            raise DataError(f"case {case.case_id}: {f} has non-finite voxels (NaN or inf)")
        if f == case.label and (problems := label_problems(a, f)):
            raise DataError(f"case {case.case_id}: {problems[0]}")
        arrays.append(a)
    seg = np.rint(arrays.pop()).astype(np.int16) if case.label is not None else None
    return np.stack(arrays), seg, geometry


def case_fingerprint(case: RawCase, samples_per_case: int) -> dict:
    data, seg, geometry = load_case(case)
    cropped, cseg, bbox, _ = crop_to_nonzero(data, seg)
    rng = np.random.default_rng(_SEED)
    fg = cseg > 0 if cseg is not None else np.zeros(cropped.shape[1:], bool)
    samples = []
    for c in range(cropped.shape[0]):
        values = cropped[c][fg]
        n = min(samples_per_case, values.size)
        samples.append(rng.choice(values, n, replace=False) if n < values.size else values)
    return {
        "spacing": geometry["spacing"],
        "shape": geometry["shape"],
        "shape_after_crop": list(cropped.shape[1:]),
        "bbox": bbox,
        "relative_size_after_cropping": float(np.prod(cropped.shape[1:]) / np.prod(data.shape[1:])),
        "foreground_samples": samples,
    }


def _case_fingerprint_or_error(case: RawCase, samples_per_case: int) -> dict | str:
    try:
        return case_fingerprint(case, samples_per_case)
    except DataError as err:
        return str(err)


def _intensity_properties(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "median", "std", "min", "max", "percentile_99_5",
                                 "percentile_00_5")}
    p005, p50, p995 = np.percentile(values, [0.5, 50.0, 99.5])
    return {"mean": float(values.mean()), "median": float(p50), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def extract_fingerprint(dataset: RawDataset, *, num_workers: int = 0,
                        progress: bool = True) -> dict:
    """The fingerprint of every training case, in nnU-Net's `dataset_fingerprint.json` layout."""
    dataset.require_clean()
    cases = dataset.cases
    if not cases:
        raise DataError(f"{dataset.root / 'imagesTr'}: no training cases")
    per_case = _MAX_FG_SAMPLES // len(cases)
    if num_workers > 0:
        with ProcessPoolExecutor(num_workers, mp_context=get_context("spawn")) as pool:
            it = pool.map(_case_fingerprint_or_error, cases, [per_case] * len(cases))
            results = list(_progress(it, len(cases), "fingerprint", progress))
    else:
        results = [_case_fingerprint_or_error(c, per_case)
                   for c in _progress(cases, len(cases), "fingerprint", progress)]
    errors = [r for r in results if isinstance(r, str)]
    if errors:  # every bad case at once, not only the first
        raise DataError(f"{dataset.root}: {len(errors)} case(s) cannot be read (run `jaxmamba "
                        f"check {dataset.root}` for every problem):\n  " + "\n  ".join(errors))
    n_channels = len(dataset.channel_names)
    props = {str(c): _intensity_properties(np.concatenate(
        [r["foreground_samples"][c] for r in results]).astype(np.float64))
        for c in range(n_channels)}
    return {
        "case_ids": [c.case_id for c in cases],
        "spacings": [r["spacing"] for r in results],
        "shapes_before_crop": [r["shape"] for r in results],
        "shapes_after_crop": [r["shape_after_crop"] for r in results],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(
            np.median([r["relative_size_after_cropping"] for r in results])),
    }


def _progress(it, total: int, desc: str, enabled: bool):
    if not enabled:
        return it
    from tqdm import tqdm
    return tqdm(it, total=total, desc=desc, unit="case")


def fingerprint_path(root: str | Path) -> Path:
    return Path(root) / "dataset_fingerprint.json"
