"""The compiled backends of the Pallas selective scan and which one a GPU gets.

`triton`: Pallas' Triton lowering (`triton_backend.py`, `scan_forward.py`, `scan_backward.py`),
deprecated upstream since JAX 0.11. `mosaic`: Pallas' Mosaic GPU (`mosaic_backend.py`,
`mosaic_forward.py`, `mosaic_backward.py`), Hopper (sm_90) and newer. With both available a GPU
gets `preferred(jax.__version__)` (the environment variable `JAXMAMBA_PALLAS_BACKEND=triton` or
`mosaic` picks one instead); with one, that one, silently; with neither, `ops.selective_scan`
falls back to `xla` with a warning.
"""

from __future__ import annotations

import os
import re

import jax

BACKENDS = ("triton", "mosaic")
#: Names the backend compiled kernels use by default, instead of `preferred`'s.
ENV = "JAXMAMBA_PALLAS_BACKEND"
#: The backend measured faster per JAX `major.minor`, both compiled on one GPU in the same run
#: (docs/benchmarks.md, benchmarks/results/). 0.11: Mosaic GPU, on one H200 (2026-12-07): 1.32 /
#: 4.61 ms fwd / fwd+bwd at (2, 262144, 64, 16) vs 1.41 / 4.93, 9.47 / 41.0 ms at Synapse stage
#: 0 vs 19.3 / 82.6, and a SegMamba train step of 346 ms vs 418 ms.
FASTER: dict[str, str] = {"0.11": "mosaic"}


def _minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "0.12.0.1" or "0.13.0.dev20270101"."""
    major, minor = (re.findall(r"\d+", version) + ["0", "0"])[:2]
    return int(major), int(minor)


def preferred(version: str) -> str:
    """The backend a GPU where both compile gets on JAX `version`: `FASTER`'s entry for the
    newest measured `major.minor` at or below it (JAX 0.12 takes 0.11's: Mosaic GPU, whose
    Triton alternative upstream deprecates), `triton` below every measured version (JAX 0.10,
    where the Mosaic kernels were never compiled on a GPU)."""
    measured = sorted((_minor(v), b) for v, b in FASTER.items())
    choice = BACKENDS[0]
    for v, b in measured:
        if v <= _minor(version):
            choice = b
    return choice


def unavailable_reason(backend: str) -> str | None:
    """None when `backend`'s kernels can compile here, else why not."""
    if backend == "triton":
        from jaxmamba.kernels import triton_backend

        return triton_backend.unavailable_reason()
    if backend == "mosaic":
        from jaxmamba.kernels import mosaic_backend

        return mosaic_backend.unavailable_reason()
    raise ValueError(f"selective_scan: unknown Pallas backend={backend!r}; expected one of "
                     f"{BACKENDS}")


def compiled_backend() -> str | None:
    """The backend compiled kernels use by default here, or None when none can compile;
    `JAXMAMBA_PALLAS_BACKEND`'s where set (an error when it cannot compile here)."""
    if forced := os.environ.get(ENV, "").strip():
        if forced not in BACKENDS:
            raise ValueError(f"{ENV}={forced!r}: expected one of {', '.join(BACKENDS)}")
        if reason := unavailable_reason(forced):
            raise ValueError(f"{ENV}={forced}: its kernels cannot compile here: {reason}")
        return forced
    usable = [b for b in BACKENDS if unavailable_reason(b) is None]
    if not usable:
        return None
    choice = preferred(jax.__version__)
    return choice if choice in usable else usable[0]


def pallas_unavailable() -> str | None:
    """None when some backend compiles, else the reason of each."""
    reasons = {b: unavailable_reason(b) for b in BACKENDS}
    if any(r is None for r in reasons.values()):
        return None
    return "; ".join(f"{b}: {r}" for b, r in reasons.items())
