"""nnU-Net's 5-fold cross-validation splits, `splits_final.json`.

Created like nnU-Net's `generate_crossval_split`: sklearn `KFold(5, shuffle=True,
random_state=12345)` over the sorted case ids, re-implemented without sklearn (same permutation,
same fold sizes), so a jaxmamba split equals nnU-Net's for the same cases. An existing file is
read unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxmamba.data.io import DataError, read_json, write_json

SPLITS_FILE = "splits_final.json"


def kfold_splits(case_ids: Sequence[str], n_folds: int = 5, seed: int = 12345) -> list[dict]:
    """`[{"train": [...], "val": [...]}, ...]`, one per fold, ids in sorted order inside each."""
    keys = sorted(case_ids)
    if len(keys) < n_folds:
        raise ValueError(f"{n_folds}-fold splits need at least {n_folds} cases, got {len(keys)}")
    order = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(order)
    sizes = np.full(n_folds, len(keys) // n_folds)
    sizes[: len(keys) % n_folds] += 1
    splits, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        start += size
        splits.append({"train": [k for i, k in enumerate(keys) if i not in val],
                       "val": [k for i, k in enumerate(keys) if i in val]})
    return splits


def load_or_create_splits(folder: str | Path, case_ids: Sequence[str], *, seed: int = 12345
                          ) -> list[dict]:
    """Read `folder/splits_final.json`, or create it (5 folds, `seed`) and write it there."""
    path = Path(folder) / SPLITS_FILE
    if path.is_file():
        splits = read_json_list(path)
        known = set(case_ids)
        for i, s in enumerate(splits):
            unknown = sorted((set(s.get("train", [])) | set(s.get("val", []))) - known)
            if "train" not in s or "val" not in s or unknown:
                raise DataError(f"{path}: fold {i} must hold 'train' and 'val' lists of known "
                                f"case ids (unknown: {unknown[:5]})")
        return splits
    splits = kfold_splits(case_ids, seed=seed)
    write_json(path, splits)
    return splits


def fold_cases(folder: str | Path, fold: int | str, case_ids: Sequence[str] | None = None
               ) -> tuple[list[str], list[str]]:
    """`(train ids, val ids)` of `fold` (an int, or "all": every case trains, none validates)."""
    if case_ids is None:
        splits = read_json_list(Path(folder) / SPLITS_FILE)
    else:
        splits = load_or_create_splits(folder, case_ids)
    if fold == "all":
        return sorted(set(splits[0]["train"]) | set(splits[0]["val"])), []
    fold = int(fold)
    if not 0 <= fold < len(splits):
        raise DataError(f"{Path(folder) / SPLITS_FILE}: fold {fold} does not exist (folds "
                        f"0..{len(splits) - 1} or 'all')")
    return list(splits[fold]["train"]), list(splits[fold]["val"])


def read_json_list(path: Path) -> list[dict]:
    data = read_json(path)
    if not isinstance(data, list) or not data:
        raise DataError(f"{path}: expected a non-empty list of folds")
    return data
