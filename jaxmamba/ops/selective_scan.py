"""`selective_scan`: the public op, its argument checks and the dispatcher over implementations.

Layout is channels-last: `u, delta, z, y: (B, L, D)`, `B, C: (B, L, N)`, `A: (D, N)`,
`D, delta_bias: (D,)`, `initial_state` and the final state `(B, D, N)`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxmamba.choices import SCAN_IMPLEMENTATIONS
from jaxmamba.ops.batch_parallel import map_over_batch
from jaxmamba.ops.scan_reference import selective_scan_reference
from jaxmamba.ops.scan_xla import selective_scan_xla
from jaxmamba.ops.spatial import scan_over_tokens, token_shards

IMPLEMENTATIONS = SCAN_IMPLEMENTATIONS

_BUILTIN: dict[str, Callable] = {
    "reference": selective_scan_reference,
    "xla": selective_scan_xla,
}


_warned_fallback = False


def _pallas_unavailable() -> str | None:
    """Why no compiled Pallas backend (Triton, Mosaic GPU) can run on this GPU (None when one
    can; which one runs is `jaxmamba.kernels.backends.compiled_backend`)."""
    from jaxmamba.kernels.backends import pallas_unavailable

    return pallas_unavailable()


def _load(name: str) -> Callable:
    """The implementation called `name`; "pallas" is imported on first use only (and its Triton
    or Mosaic GPU backend only when it compiles, on a GPU)."""
    if name in _BUILTIN:
        return _BUILTIN[name]
    try:
        from jaxmamba.kernels.selective_scan import selective_scan_pallas
    except ImportError as err:
        raise ValueError(
            f"selective_scan: implementation={name!r} is not available in this installation "
            f"({err}); use implementation='xla' (portable) or 'reference'."
        ) from err
    if jax.default_backend() == "gpu" and (reason := _pallas_unavailable()):
        raise ValueError(
            f"selective_scan: implementation={name!r} cannot compile on this GPU: {reason}; "
            "use implementation='xla' (or None), a JAX whose Pallas ships the Triton lowering, "
            "or a Hopper (sm_90) or newer GPU for Pallas' Mosaic GPU."
        )
    return selective_scan_pallas


def default_implementation() -> str:
    """`pallas` on a GPU when its kernels can compile (on Triton or on Mosaic GPU, silently
    either), else `xla`; a GPU that falls back to `xla` warns once."""
    global _warned_fallback
    if jax.default_backend() != "gpu":
        return "xla"
    try:
        _load("pallas")
        return "pallas"
    except ValueError as err:
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(f"{err} Falling back to implementation='xla' (several times slower).",
                          stacklevel=3)
    return "xla"


def _check(name, x, expected: tuple, optional=False):
    if x is None:
        if optional:
            return
        raise ValueError(f"selective_scan: {name} is required, expected shape {expected}")
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"selective_scan: {name} must be an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(
            f"selective_scan: {name} has dtype {x.dtype}, expected a floating dtype "
            f"(float32, bfloat16, float16 or float64)"
        )
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"selective_scan: {name} has shape {tuple(x.shape)}, expected {tuple(expected)}"
        )


def _check_all(u, delta, A, B, C, D, z, delta_bias, initial_state, validate):
    if not hasattr(u, "ndim") or u.ndim != 3:
        shape = getattr(u, "shape", None)
        raise ValueError(f"selective_scan: u has shape {shape}, expected (batch, length, dim)")
    if not hasattr(A, "ndim") or A.ndim != 2:
        shape = getattr(A, "shape", None)
        raise ValueError(f"selective_scan: A has shape {shape}, expected (dim, d_state)")
    b, l, d = u.shape
    n = A.shape[1]
    _check("u", u, (b, l, d))
    _check("delta", delta, (b, l, d))
    _check("A", A, (d, n))
    _check("B", B, (b, l, n))
    _check("C", C, (b, l, n))
    _check("D", D, (d,), optional=True)
    _check("z", z, (b, l, d), optional=True)
    _check("delta_bias", delta_bias, (d,), optional=True)
    _check("initial_state", initial_state, (b, d, n), optional=True)
    if validate:
        try:
            a = np.asarray(A)
        except jax.errors.TracerArrayConversionError as err:
            raise ValueError(
                "selective_scan: validate=True needs a concrete A; call it outside jit"
            ) from err
        if (a > 0).any():
            raise ValueError(
                f"selective_scan: A of shape {a.shape} has {(a > 0).sum()} positive entries "
                f"(max {a.max():.3g}); expected A ≤ 0 (A = -exp(A_log)) for a stable scan"
            )


def selective_scan(
    u: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    z: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    delta_softplus: bool = True,
    *,
    reverse: bool = False,
    initial_state: jax.Array | None = None,
    return_final_state: bool = False,
    implementation: str | None = None,
    validate: bool = False,
):
    """Mamba-1 selective scan (`selective_scan_fn` of mamba_ssm/ops/selective_scan_interface.py).

    `δ = softplus(delta + delta_bias)`; `h_t = exp(δ_t A) ⊙ h_{t-1} + δ_t u_t B_t` from
    `h_{-1} = initial_state` (zeros by default); `y_t = <C_t, h_t> + D u_t`; `y *= silu(z)`.
    `reverse=True` runs the recurrence from the last token to the first, which equals flipping
    every input along L, scanning, and flipping `y` back.

    Args:
      u, delta, z: (B, L, D). B, C: (B, L, N). A: (D, N). D, delta_bias: (D,).
      initial_state: (B, D, N) or None.
      implementation: None (fastest available: "pallas" on GPU, else "xla"), "reference", "xla"
        or "pallas".
      validate: also check values (A ≤ 0); needs concrete arrays.

    Returns:
      y (B, L, D) in u's dtype, or `(y, final_state (B, D, N) float32)` with
      `return_final_state=True`.
    """
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"selective_scan: unknown implementation={implementation!r}; "
            f"expected one of {IMPLEMENTATIONS} or None"
        )
    _check_all(u, delta, A, B, C, D, z, delta_bias, initial_state, validate)
    name = implementation or default_implementation()
    fn = _load(name)

    def scan(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  reverse=reverse, initial_state=initial_state)

    if token_shards(u.shape[1]) > 1:  # the token axis is split over the mesh's `spatial` axis
        y, h = scan_over_tokens(fn, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                reverse=reverse, initial_state=initial_state)
        return (y, h) if return_final_state else y
    if name == "pallas":  # a custom call: split the batch over the devices by hand
        scan = map_over_batch(scan, (True, True, False, True, True, False, True, False, True),
                              u.shape[0])
    y, h = scan(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return (y, h) if return_final_state else y
