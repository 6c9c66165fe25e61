"""The one module that touches Pallas' Triton backend (`jax.experimental.pallas.triton`).

The kernels lower through Triton on GPUs only; interpret mode (CPU tests) never imports it, nor
does importing `jaxmamba`. The backend is deprecated upstream since JAX 0.11: when a JAX drops it,
`unavailable_reason()` says why and `jaxmamba.ops.selective_scan` falls back to `xla` with a
one-time warning instead of failing.
"""

from __future__ import annotations

import functools


@functools.cache
def _module():
    from jax.experimental.pallas import triton

    return triton


def unavailable_reason() -> str | None:
    """None when the Triton backend imports and has `CompilerParams`, else why not."""
    try:
        module = _module()
    except ImportError as err:
        return f"jax.experimental.pallas.triton does not import ({err})"
    if not hasattr(module, "CompilerParams"):
        return "jax.experimental.pallas.triton has no CompilerParams"
    return None


def compiler_params(num_warps: int, num_stages: int = 1):
    """Triton `CompilerParams` for a compiled (not interpreted) `pallas_call`."""
    return _module().CompilerParams(num_warps=num_warps, num_stages=num_stages)
