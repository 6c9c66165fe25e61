"""The compiled backends of the Pallas selective scan and which one a GPU gets.

`triton`: Pallas' Triton lowering (`triton_backend.py`, `scan_forward.py`, `scan_backward.py`),
deprecated upstream since JAX 0.11. `mosaic`: Pallas' Mosaic GPU (`mosaic_backend.py`,
`mosaic_forward.py`, `mosaic_backward.py`), Hopper (sm_90) and newer. With both available a GPU
gets the one measured faster on the installed JAX (`FASTER`, docs/benchmarks.md); with one, that
one, silently; with neither, `ops.selective_scan` falls back to `xla` with a warning.
"""

from __future__ import annotations

import jax

BACKENDS = ("triton", "mosaic")
#: The faster backend on one H100 per JAX `major.minor` where both compile (docs/benchmarks.md);
#: versions not listed get the first of `BACKENDS` that compiles.
FASTER: dict[str, str] = {}


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
    """The backend compiled kernels use by default here, or None when none can compile."""
    usable = [b for b in BACKENDS if unavailable_reason(b) is None]
    if not usable:
        return None
    faster = FASTER.get(".".join(jax.__version__.split(".")[:2]))
    return faster if faster in usable else usable[0]


def pallas_unavailable() -> str | None:
    """None when some backend compiles, else the reason of each."""
    reasons = {b: unavailable_reason(b) for b in BACKENDS}
    if any(r is None for r in reasons.values()):
        return None
    return "; ".join(f"{b}: {r}" for b, r in reasons.items())
