"""The selective scan's maths shared by every implementation (`ops/scan_reference.py`,
`ops/scan_xla.py`, `ops/spatial.py` and the Pallas kernels in `kernels/`): softplus, the
discretised step δ, the dtype rule, the skip-and-gate epilogue and the associative operator.

It imports nothing from jaxmamba, so `kernels/` and `ops/` both stand on it and neither imports
the other's maths (docs/architecture.md, "Layers and imports"). The formulas are mamba_ssm's
`selective_scan_ref` (mamba_ssm/ops/selective_scan_interface.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def softplus(x: jax.Array) -> jax.Array:
    """PyTorch's (and mamba_ssm's) softplus with threshold 20: `x if x > 20 else log1p(e^x)`."""
    return jnp.where(x > 20.0, x, jnp.log1p(jnp.exp(jnp.minimum(x, 20.0))))


def compute_dtype(*arrays: jax.Array | None) -> jnp.dtype:
    """float32 for bf16/fp16/fp32 inputs, float64 when any input is float64."""
    return jnp.result_type(jnp.float32, *[a.dtype for a in arrays if a is not None])


def discretize_delta(delta, delta_bias, delta_softplus: bool, dtype) -> jax.Array:
    """`softplus(delta + delta_bias)` (or without softplus), in `dtype`. Shapes (B, L, D), (D,)."""
    delta = delta.astype(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.astype(dtype)[None, None, :]
    return softplus(delta) if delta_softplus else delta


def skip_and_gate(y, u, D, z) -> jax.Array:
    """`y + D * u`, then the SiLU gate `* z * sigmoid(z)`; all (B, L, D) in y's dtype."""
    if D is not None:
        y = y + u.astype(y.dtype) * D.astype(y.dtype)[None, None, :]
    if z is not None:
        y = y * jax.nn.silu(z.astype(y.dtype))
    return y


def affine_combine(earlier, later):
    """Composition of `h ← a·h + b` steps, earlier then later: the associative scan's operator."""
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2
