"""Data: nnU-Net raw folders → fingerprint, plan → preprocessed cache → grain batches.

Stable API (other packages build on these names and signatures):

Preprocessing
    `preprocess_dataset(raw, cache, plan=None, *, num_workers=0, progress=True, case_ids=None)
    -> (Plan, errors)` writes `cache/nnUNetPlans.json`, `cache/splits_final.json` and
    `cache/3d_fullres/CASE.{npy,json}`; idempotent. `plan` may be a `Plan` or an
    `nnUNetPlans.json` path (used unchanged). `load_plan(cache)` reads the plan back.
    `preprocess_case(image_files, plan, label_file=None, *, case_id=None) -> (data (C, S0, S1,
    S2) float32, seg | None, properties)` for one raw case (prediction).
Inversion
    `revert_to_raw(array, properties, plan, *, probabilities=False)`: a preprocessed-space label
    map `(S0, S1, S2)` or probability map `(K, S0, S1, S2)` on the raw grid (z, y, x).
    `export_prediction(labels, properties, plan, path)` writes it as NIfTI with the input's
    affine and header, atomically. `write_volume(path, array_zyx, properties["geometry"])` writes
    any raw-grid array (e.g. probabilities of one class).
Splits
    `fold_cases(cache, fold, case_ids=None) -> (train ids, val ids)`; fold is 0..4 or "all".
    `load_or_create_splits(cache, case_ids)` → nnU-Net's `splits_final.json` list.
Batches
    `train_iterator(cache, plan, case_ids, *, seed, batch_size=None, num_workers=0,
    augment=True, oversample=0.33, shard_index=0, shard_count=1)`: infinite grain iterator of
    `{"image": (B, S0, S1, S2, C) float32, "target": tuple of (B, s0, s1, s2) int32}`, one
    target per `plan.deep_supervision_scales`, full resolution first; `get_state()/set_state()`
    and `grain.checkpoint.CheckpointSave(it)/CheckpointRestore(it)` for orbax.
    `val_iterator(cache, plan, case_ids, *, num_batches=50, seed=0, batch_size=None,
    shard_index=0, shard_count=1)`: the same un-augmented batches on every call. `batch_size` is
    the global batch; with `shard_count` processes each yields its consecutive share of it.
Raw data
    `RawDataset.open(root)`, `check_dataset(root) -> (errors, warnings)`, `load_volume(path)`,
    `DataError` (bad input; the message names the case and the file).

Internal, may change: the cache's file names, `augment`, `sampling`, `planner` helpers.
"""

from pathlib import Path

from jaxmamba.data.dataset import RawCase, RawDataset, check_dataset
from jaxmamba.data.io import DataError, load_volume, write_volume
from jaxmamba.data.prepare import PLANS_FILE, preprocess_dataset
from jaxmamba.data.preprocess import (
    export_prediction,
    load_properties,
    preprocess_case,
    revert_to_raw,
)
from jaxmamba.data.splits import fold_cases, load_or_create_splits
from jaxmamba.plans import Plan


def __getattr__(name: str):
    # grain is imported only when batches are asked for (prediction does not need it).
    if name in ("train_iterator", "val_iterator"):
        from jaxmamba.data import pipeline
        return getattr(pipeline, name)
    raise AttributeError(f"module 'jaxmamba.data' has no attribute {name!r}")


def load_plan(cache: str | Path) -> Plan:
    """The plan a cache was made with (`cache/nnUNetPlans.json`)."""
    return Plan.load(Path(cache) / PLANS_FILE)


__all__ = [
    "DataError", "RawCase", "RawDataset", "check_dataset", "export_prediction", "fold_cases",
    "load_or_create_splits", "load_plan", "load_properties", "load_volume", "preprocess_case",
    "preprocess_dataset", "revert_to_raw", "train_iterator", "val_iterator", "write_volume",
]
