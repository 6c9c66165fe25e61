"""Whether a cached case is still good: made with this plan, from the raw files as they are now,
its arrays whole.

Each case's properties (`3d_fullres/CASE.json`, written last) record its raw files by name
within the dataset (`imagesTr/CASE_0000.nii.gz`), with size, modification time and SHA-256
(`sources`), so a dataset and its cache can move together. A case is redone when the plan
changed, when a raw image or label was changed or replaced since (another size, or another time
and content: a copy that did not keep the times is compared by content), or when one of its arrays
is damaged: not a `.npy` file, a header that does not parse, a file shorter or longer than its
header says (a truncated copy), or a shape that disagrees with the properties. These checks read
the headers and the file sizes only, so a large cache is checked in moments; a read-only cache
whose cases all pass is used without writing to it. Caches written before `sources` existed are
trusted as they are.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from jaxmamba.data.dataset import RawCase
from jaxmamba.data.io import DataError, read_json
from jaxmamba.data.preprocess import case_paths
from jaxmamba.data.sources import file_name, sha256


def changed_source(recorded: list[dict], case: RawCase) -> str | None:
    """Which of `case`'s raw files changed since `recorded` (`sources` then), or None. A file of
    the same size but another time (a copy that did not keep times) is compared by content."""
    files = [Path(f) for f in (*case.images, *((case.label,) if case.label is not None else ()))]
    if [r.get("file") for r in recorded] != [file_name(f) for f in files]:
        return "its raw files are not the ones it was preprocessed from"
    for r, f in zip(recorded, files, strict=True):
        try:
            st = os.stat(f)
            same = st.st_size == r.get("size") and (st.st_mtime_ns == r.get("mtime_ns")
                                                    or sha256(f) == r.get("sha256"))
        except OSError as err:
            return f"{f} cannot be read now ({err})"
        if not same:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(st.st_mtime_ns / 1e9))
            return (f"{f} changed since it was preprocessed ({r.get('size')} -> {st.st_size} "
                    f"bytes, modified {when})")
    return None


def array_problem(path: Path, shape: tuple[int, ...] | None = None) -> str | None:
    """Why the `.npy` file `path` is not a whole array (of `shape`, when given), or None."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            found, _, dtype = read(f)
            offset = f.tell()
    except Exception as err:  # noqa: BLE001 (numpy's header parser raises many types)
        return f"{path} is not a readable .npy array ({type(err).__name__}: {err})"
    expected = offset + math.prod(found) * dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        return (f"{path} holds {size} bytes, its header says {expected} "
                f"({'truncated' if size < expected else 'extra bytes'})")
    if shape is not None and tuple(found) != tuple(shape):
        return f"{path} has shape {list(found)}, its properties say {list(shape)}"
    return None


def redo_reason(cache: str | Path, case: RawCase, key: str) -> tuple[bool, str | None]:
    """`(done, why)`: whether `case` is complete in `cache` for plan `key`, and when it is not
    but was preprocessed before, why it must be redone (a sentence naming the case)."""
    p = case_paths(cache, case.case_id)
    if not p["props"].is_file():
        return False, None
    try:
        props = read_json(p["props"])
    except DataError as err:
        return False, f"case {case.case_id}: {err}"
    if props.get("plan_key") != key:
        return False, None  # preprocessed for another plan: plainly redone
    for name in ("data", "seg", "fg"):
        if not p[name].is_file():
            return False, f"case {case.case_id}: {p[name]} is missing"
    if "sources" in props and (change := changed_source(props["sources"], case)):
        return False, f"case {case.case_id}: {change}"
    shape = props.get("shape_after_resample")
    channels = len(props.get("normalization", [])) or None
    expected = {"data": (channels, *shape) if shape and channels else None,
                "seg": tuple(shape) if shape else None, "fg": None}
    for name, want in expected.items():
        if problem := array_problem(p[name], want):
            return False, f"case {case.case_id}: {problem}"
    return True, None
