"""What a cached case was made from: its raw files by name within the dataset, with size,
modification time and SHA-256 (`jaxmamba.data.cache_check` compares them with the files now)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from jaxmamba.data.dataset import RawCase


def file_name(path: Path) -> str:
    """`imagesTr/CASE_0000.nii.gz`: a raw file's name within its dataset, wherever it moved."""
    return f"{path.parent.name}/{path.name}"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sources(case: RawCase) -> list[dict]:
    """The raw files of `case` (images in channel order, then the label): name, size, time
    and SHA-256."""
    out = []
    for f in (*case.images, *((case.label,) if case.label is not None else ())):
        st = os.stat(f)
        out.append({"file": file_name(Path(f)), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256(Path(f))})
    return out
