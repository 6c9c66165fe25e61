"""Bundled datasets, built offline as nnU-Net raw folders.

- `demo`: real MRI (MNI152 2009a T1 + 4-class tissue map) from files the `nilearn` wheel ships,
  with an honest held-out test set (`jaxmamba.datasets.demo`); needs `pip install -e '.[demo]'`.
- `phantom`: synthetic shapes with anisotropic spacing, for tests (`jaxmamba.datasets.phantom`).

`build(name, root)` writes one; `jaxmamba dataset NAME -o ROOT` does the same from the shell.
"""

from __future__ import annotations

from pathlib import Path

from jaxmamba.choices import BUNDLED_DATASETS
from jaxmamba.datasets.demo import build_demo
from jaxmamba.datasets.phantom import make_phantom_dataset

_BUILDERS = {"demo": build_demo, "phantom": make_phantom_dataset}
#: Each of `jaxmamba.choices.BUNDLED_DATASETS` with its builder.
BUILDERS = {name: _BUILDERS[name] for name in BUNDLED_DATASETS}


def build(name: str, root: str | Path, **kwargs) -> Path:
    """Build dataset `name` (one of `BUILDERS`) as an nnU-Net raw folder at `root`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(BUILDERS)}")
    return BUILDERS[name](root, **kwargs)
