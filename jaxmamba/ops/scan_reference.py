"""The definition of the selective scan: a sequential `lax.scan`, dtype-generic.

Mirrors mamba_ssm's `selective_scan_ref` in jaxmamba's channels-last layout:
`u, delta, z: (B, L, D)`, `B, C: (B, L, N)`, `A: (D, N)`, `D, delta_bias: (D,)`, state `(B, D, N)`.
It runs in float32, or float64 when any input is float64 (under `jax_enable_x64`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.scan_math import compute_dtype, discretize_delta, skip_and_gate


def selective_scan_reference(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    *, reverse=False, initial_state=None,
) -> tuple[jax.Array, jax.Array]:
    """Sequential `h_t = exp(δ_t A) h_{t-1} + δ_t u_t B_t`, `y_t = <C_t, h_t> + D u_t`, gated by z.

    Returns `(y (B, L, D) in u.dtype, final state (B, D, N) in the compute dtype)`. With
    `reverse=True` the recurrence runs from the last token to the first.
    """
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, _, dim = u.shape
    A = A.astype(dtype)
    delta = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    uf = u.astype(dtype)
    h0 = (jnp.zeros((batch, dim, A.shape[1]), dtype) if initial_state is None
          else initial_state.astype(dtype))

    def step(h, xs):
        u_t, d_t, b_t, c_t = xs  # (B, D), (B, D), (B, N), (B, N)
        h = jnp.exp(d_t[:, :, None] * A[None]) * h + (d_t * u_t)[:, :, None] * b_t[:, None, :]
        return h, jnp.einsum("bdn,bn->bd", h, c_t)

    time_major = [jnp.moveaxis(x, 1, 0) for x in (uf, delta, B.astype(dtype), C.astype(dtype))]
    h, ys = lax.scan(step, h0, time_major, reverse=reverse)
    y = skip_and_gate(jnp.moveaxis(ys, 0, 1), uf, D, z)
    return y.astype(u.dtype), h
