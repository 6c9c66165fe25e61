"""Preprocessing cache (nnU-Net's `DefaultPreprocessor`) and its inversion for prediction.

Per case, in nnU-Net's order (nnunetv2 2.8 `DefaultPreprocessor.run_case_npy`): crop to the
non-zero region, normalise each channel by the plan's scheme (masked z-score over `seg >= 0`, as
nnU-Net), resample to the plan's spacing by `jaxmamba.data.resample` (images order 3, labels the
argmax of order-1 label indicators, the coarse axis separately with order 0 when anisotropic).
The cache folder holds:

    nnUNetPlans.json, dataset.json      the plan used (nnU-Net field names)
    3d_fullres/CASE.npy                 (C, S0, S1, S2) float32, memory-mappable
    3d_fullres/CASE_seg.npy             (S0, S1, S2) int8/int16; -1 = outside the non-zero mask
    3d_fullres/CASE_fg.npy              (N, 4) int32 (label, i0, i1, i2): sampled voxels per label
    3d_fullres/CASE.json                properties: geometry, bbox, spacings, shapes, norm stats

`CASE.json` is written last, so a case without it (a crash mid-case) is redone by the next run;
it records the raw files' sizes and times, and `jaxmamba.data.cache_check` redoes a case whose
plan or raw files changed or whose arrays are damaged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmamba.data.cropping import crop_to_nonzero
from jaxmamba.data.dataset import RawCase
from jaxmamba.data.fingerprint import load_case
from jaxmamba.data.io import DataError, read_json, save_npy, write_json, write_volume
from jaxmamba.data.normalize import normalize_channel
from jaxmamba.data.resample import new_shape, resample_image, resample_labels, separate_z_axis
from jaxmamba.data.sources import sources
from jaxmamba.data.spacing import resampled_problem
from jaxmamba.diskspace import DiskFullError, check_room, full_error, is_disk_full
from jaxmamba.plans import Plan

CONFIG_DIR = "3d_fullres"
_KEPT = "the cases finished before are kept"
_LOCATIONS_PER_CLASS, _MIN_COVERAGE, _SEED = 10_000, 0.01, 1234


def plan_key(plan: Plan) -> str:
    """Hash of the plan fields that change preprocessed arrays."""
    fields = (plan.spacing, plan.normalization_schemes, plan.use_mask_for_norm,
              plan.foreground_intensity_properties, plan.resampling)
    return hashlib.sha1(json.dumps(fields, sort_keys=True, default=list).encode()).hexdigest()[:16]


def _resampling(plan: Plan, which: str) -> tuple[int, int, bool | None]:
    kw = plan.resampling[f"resampling_fn_{which}_kwargs"]
    return int(kw.get("order", 1)), int(kw.get("order_z", 0)), kw.get("force_separate_z")


def preprocess_arrays(data: np.ndarray, seg: np.ndarray | None, geometry: dict, plan: Plan, *,
                      source: str | Path = "the image"
                      ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Crop, normalise and resample `data (C, S0, S1, S2)` and `seg`; returns the properties too.
    A spacing that cannot be resampled to the plan's is a `DataError` naming `source`."""
    if data.shape[0] != plan.num_input_channels:
        raise DataError(f"got {data.shape[0]} channel(s), the plan expects "
                        f"{plan.num_input_channels} ({list(plan.channel_names)})")
    shape_before = list(data.shape[1:])
    data, seg, bbox, mask = crop_to_nonzero(data, seg)
    norm_mask = mask if seg is None else seg >= 0  # nnU-Net's mask: labelled voxels count too
    norm = []
    for c, scheme in enumerate(plan.normalization_schemes):
        fg = (plan.foreground_intensity_properties[c]
              if c < len(plan.foreground_intensity_properties) else None)
        data[c] = normalize_channel(data[c], scheme, mask=norm_mask,
                                    use_mask=plan.use_mask_for_norm[c],
                                    ct_properties=fg)
        norm.append({"scheme": scheme, "use_mask": plan.use_mask_for_norm[c]})
    spacing = geometry["spacing"]
    if problem := resampled_problem(data.shape[1:], spacing, plan.spacing, "the plan's spacing"):
        raise DataError(f"{source}: {problem}")
    shape = new_shape(data.shape[1:], spacing, plan.spacing)
    order, order_z, force = _resampling(plan, "data")
    z_axis = separate_z_axis(spacing, plan.spacing, force)
    data = resample_image(data, shape, order=order, z_axis=z_axis, order_z=order_z)
    if seg is not None:
        order, order_z, force = _resampling(plan, "seg")
        seg = resample_labels(seg, shape, order=order,
                              z_axis=separate_z_axis(spacing, plan.spacing, force), order_z=order_z)
    props = {
        "geometry": geometry,
        "shape_before_crop": shape_before,
        "bbox": bbox,
        "shape_after_crop": list(mask.shape),
        "spacing_original": list(spacing),
        "spacing": list(plan.spacing),
        "shape_after_resample": list(shape),
        "normalization": norm,
        "plan_key": plan_key(plan),
    }
    return data, seg, props


def preprocess_case(image_files: Sequence[str | Path], plan: Plan, label_file: str | Path | None
                    = None, *, case_id: str | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Preprocess one raw case (one NIfTI file per channel, channel order) for prediction.

    Returns `(data (C, S0, S1, S2) float32, seg or None, properties)`; pass `properties` to
    `revert_to_raw` / `export_prediction`. Errors name `case_id` (default: the first file's
    name) and the file. Stable API.
    """
    case = RawCase(case_id or Path(image_files[0]).name, tuple(Path(f) for f in image_files),
                   Path(label_file) if label_file else None)
    data, seg, geometry = load_case(case)
    data, seg, props = preprocess_arrays(data, seg, geometry, plan, source=case.images[0])
    props["files"] = [str(f) for f in case.images]
    return data, seg, props


def class_locations(seg: np.ndarray, seed: int = _SEED) -> tuple[np.ndarray, dict[str, list[int]]]:
    """Sampled voxels per foreground label: `(rows (N, 4) int32, {label: [start, end)})`."""
    rng = np.random.default_rng(seed)
    rows, index = [], {}
    for value in np.unique(seg):
        if value <= 0:
            continue
        locs = np.argwhere(seg == value)
        n = max(min(_LOCATIONS_PER_CLASS, len(locs)), int(np.ceil(len(locs) * _MIN_COVERAGE)))
        if n < len(locs):
            locs = locs[np.sort(rng.choice(len(locs), n, replace=False))]
        start = sum(len(r) for r in rows)
        index[str(int(value))] = [start, start + len(locs)]
        rows.append(np.concatenate([np.full((len(locs), 1), value), locs], axis=1))
    table = np.concatenate(rows).astype(np.int32) if rows else np.zeros((0, 4), np.int32)
    return table, index


def case_paths(cache: str | Path, case_id: str) -> dict[str, Path]:
    d = Path(cache) / CONFIG_DIR
    return {"data": d / f"{case_id}.npy", "seg": d / f"{case_id}_seg.npy",
            "fg": d / f"{case_id}_fg.npy", "props": d / f"{case_id}.json"}


class CacheWriteError(DataError):
    """The cache folder cannot take a case's arrays: no other case would go there either."""


def preprocess_to_cache(case: RawCase, plan: Plan, cache: str | Path) -> str | None:
    """Preprocess one training case into the cache; returns the case's error as a message
    instead of raising. A cache that cannot be written (`CacheWriteError`) or a full disk
    (`jaxmamba.diskspace.DiskFullError`) raise: no other case would be written either."""
    try:
        recorded = sources(case)  # before reading: a change while reading shows next time
        data, seg, geometry = load_case(case)
        if seg is None:
            raise DataError(f"no label file for training case {case.case_id}")
        bad = sorted(set(np.unique(seg).tolist()) - {v for _, v in plan.labels})
        if bad:
            raise DataError(f"{case.label} has label value(s) {bad} not in the plan's labels "
                            f"{dict(plan.labels)}")
        data, seg, props = preprocess_arrays(data, seg, geometry, plan, source=case.images[0])
        seg = seg.astype(np.int8 if seg.max() < 127 else np.int16)
        table, index = class_locations(seg)
    except Exception as err:  # report and go on: one bad case never stops or corrupts the others
        message = str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"
        return message if message.startswith(f"case {case.case_id}:") else \
            f"case {case.case_id}: {message}"
    props.update(case_id=case.case_id, files=[str(f) for f in case.images],
                 label_file=str(case.label), class_locations=index, sources=recorded)
    _write_case(case_paths(cache, case.case_id), case.case_id, data.astype(np.float32), seg,
                table, props)
    return None


def _write_case(p: dict[str, Path], case_id: str, data: np.ndarray, seg: np.ndarray,
                table: np.ndarray, props: dict) -> None:
    folder, what = p["data"].parent, f"case {case_id}'s preprocessed arrays"
    needed = data.nbytes + seg.nbytes + table.nbytes + 3 * 4096
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_room(folder, what, needed, _KEPT)
        save_npy(p["data"], data)
        save_npy(p["seg"], seg)
        save_npy(p["fg"], table)
        write_json(p["props"], props)  # last: marks the case complete
    except DiskFullError:
        raise
    except OSError as err:
        if is_disk_full(err, folder, needed):
            raise full_error(folder, what, needed, _KEPT) from None
        raise CacheWriteError(f"{folder}: cannot write {what} ({err.strerror or err}); make the "
                              f"cache folder writable, or give another one (-o, "
                              f"data.preprocessed_dir)") from None


def load_properties(cache: str | Path, case_id: str) -> dict:
    return read_json(case_paths(cache, case_id)["props"])


def load_preprocessed(cache: str | Path, case_id: str, *, mmap: bool = True
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(data (C, S0, S1, S2), seg (S0, S1, S2), fg rows (N, 4))`, memory-mapped by default."""
    p = case_paths(cache, case_id)
    mode = "r" if mmap else None
    arrays = []
    for name in ("data", "seg", "fg"):
        try:
            arrays.append(np.load(p[name], mmap_mode=mode if name != "fg" else None))
        except Exception as err:  # numpy's header parser raises many types
            raise DataError(f"case {case_id}: the cached array {p[name]} cannot be read "
                            f"({type(err).__name__}: {err}); run `jaxmamba preprocess` on the "
                            f"dataset to rebuild it") from err
    return tuple(arrays)


# ---------------------------------------------------------------------- inversion
def revert_to_raw(array: np.ndarray, properties: dict, plan: Plan, *,
                  probabilities: bool = False) -> np.ndarray:
    """Map a preprocessed-space result back to the raw image grid (un-resample, un-crop).

    `array` is a label map `(S0, S1, S2)` int, or with `probabilities=True` a per-class map
    `(K, S0, S1, S2)` float (outside the crop: probability 1 for background). Returns the same
    kind of array on the raw grid `properties["geometry"]["shape"]` (z, y, x). Stable API.
    """
    expected = tuple(properties["shape_after_resample"])
    if tuple(array.shape[-3:]) != expected:
        raise ValueError(f"array spatial shape {list(array.shape[-3:])} does not match the "
                         f"preprocessed shape {list(expected)} in the case properties")
    shape, bbox = properties["shape_after_crop"], properties["bbox"]
    order, order_z, force = _resampling(plan, "probabilities" if probabilities else "seg")
    z_axis = separate_z_axis(properties["spacing"], properties["spacing_original"], force)
    region = tuple(slice(lo, hi) for lo, hi in bbox)
    if probabilities:
        out = np.zeros((array.shape[0], *properties["shape_before_crop"]), np.float32)
        out[0] = 1.0
        out[(slice(None), *region)] = resample_image(array, shape, order=order, z_axis=z_axis,
                                                     order_z=order_z)
        return out
    out = np.zeros(properties["shape_before_crop"], array.dtype)
    out[region] = resample_labels(array, shape, order=order, z_axis=z_axis, order_z=order_z)
    return out


def export_prediction(labels: np.ndarray, properties: dict, plan: Plan, path: str | Path) -> None:
    """Revert a preprocessed-space label map and write it as NIfTI with the input's affine and
    header (uint8, or int16 for more than 255 labels), atomically. Stable API."""
    raw = revert_to_raw(np.asarray(labels), properties, plan)
    dtype = np.uint8 if plan.num_classes <= 256 else np.int16
    write_volume(path, raw.astype(dtype), properties["geometry"])
