"""Dataset fingerprint: per-case spacing, shape, non-zero bounding box and foreground intensities.

Follows nnU-Net 2.8.1's `DatasetFingerprintExtractor`: every training case is cropped to its
non-zero region, and `1e8 // n_cases` foreground voxels (label > 0) are drawn per case and channel
**with replacement** from a fresh `np.random.RandomState(1234)` per case (channels in order, one
generator). The dataset-wide statistics per channel (mean, median, std, min, max, 0.5 and 99.5
percentiles) are those of all drawn samples together. The draws are the same as nnU-Net's; they
are kept as counts per voxel rather than as an array of 1e8 values, so min, max and the
percentiles are exactly nnU-Net's, and mean and std agree to float32 rounding (nnU-Net sums
float32 samples, here float64). The result is written as `dataset_fingerprint.json` with
nnU-Net's key names (plus `case_ids` and `shapes_before_crop`).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from jaxmamba.data.cropping import crop_to_nonzero
from jaxmamba.data.dataset import RawCase, RawDataset, label_problems
from jaxmamba.data.io import DataError, load_volume

MAX_FG_SAMPLES = 10**8  # nnU-Net's `num_foreground_voxels_for_intensitystats`
_SEED = 1234
_CHUNK = 1 << 22  # draws per `randint` call (the stream does not depend on it)
_PERCENTILES = (0.5, 50.0, 99.5)


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


def draw_counts(rs: np.random.RandomState, n: int, k: int) -> np.ndarray:
    """How often each of `n` items is drawn by `rs.choice(items, k, replace=True)` (the same
    stream: `choice` draws `randint(0, n, k)`), without holding `k` indices at once."""
    counts = np.zeros(n, np.int64)
    dtype = np.int32 if n < 2**31 else np.int64  # same numbers, faster
    for start in range(0, k, _CHUNK):
        counts += np.bincount(rs.randint(0, n, size=min(_CHUNK, k - start), dtype=dtype),
                              minlength=n)
    return counts


def case_fingerprint(case: RawCase, samples_per_case: int) -> dict:
    data, seg, geometry = load_case(case)
    cropped, cseg, bbox, _ = crop_to_nonzero(data, seg)
    rs = np.random.RandomState(_SEED)
    fg = cseg > 0 if cseg is not None else np.zeros(cropped.shape[1:], bool)
    samples = []  # per channel: (distinct values, how often they were drawn)
    for c in range(cropped.shape[0]):
        values = cropped[c][fg]
        if values.size == 0:
            samples.append((values, np.zeros(0, np.int64)))
            continue
        counts = draw_counts(rs, values.size, samples_per_case)
        distinct, inverse = np.unique(values, return_inverse=True)
        samples.append((distinct, np.bincount(inverse.ravel(), weights=counts,
                                              minlength=distinct.size).astype(np.int64)))
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


def _percentile(values: np.ndarray, cum: np.ndarray, q: float) -> float:
    """`np.percentile(x, q)` (linear) of the sorted sample `x` that holds `values[i]` repeated
    `counts[i]` times (`cum` = cumulative counts), interpolated as numpy does."""
    h = (cum[-1] - 1) * (q / 100.0)
    lo = int(np.floor(h))
    a, b = (float(values[np.searchsorted(cum, i, side="right")])
            for i in (lo, min(lo + 1, int(cum[-1]) - 1)))
    t = h - lo
    diff = b - a
    return float(b - diff * (1 - t) if t >= 0.5 else a + diff * t)


def intensity_properties(values: np.ndarray, counts: np.ndarray) -> dict[str, float]:
    """nnU-Net's per-channel statistics of a sample given as distinct values and counts."""
    keep = counts > 0
    values, counts = values[keep], counts[keep]
    if values.size == 0:
        return {k: 0.0 for k in ("mean", "median", "std", "min", "max", "percentile_99_5",
                                 "percentile_00_5")}
    order = np.argsort(values, kind="stable")
    values, counts = values[order], counts[order]
    cum = np.cumsum(counts)
    v64, n = values.astype(np.float64), float(cum[-1])
    mean = float(np.dot(v64, counts) / n)
    std = float(np.sqrt(np.dot((v64 - mean) ** 2, counts) / n))
    p005, p50, p995 = (_percentile(values, cum, q) for q in _PERCENTILES)
    return {"mean": mean, "median": p50, "std": std, "min": float(values[0]),
            "max": float(values[-1]), "percentile_99_5": p995, "percentile_00_5": p005}


def extract_fingerprint(dataset: RawDataset, *, num_workers: int = 0, progress: bool = True,
                        max_samples: int = MAX_FG_SAMPLES) -> dict:
    """The fingerprint of every training case, in nnU-Net's `dataset_fingerprint.json` layout;
    `max_samples // n_cases` foreground samples per case and channel."""
    dataset.require_clean()
    cases = dataset.cases
    if not cases:
        raise DataError(f"{dataset.root / 'imagesTr'}: no training cases")
    per_case = int(max_samples // len(cases))
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
    props = {}
    for c in range(len(dataset.channel_names)):
        values, counts = zip(*(r["foreground_samples"][c] for r in results), strict=True)
        props[str(c)] = intensity_properties(np.concatenate(values), np.concatenate(counts))
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
