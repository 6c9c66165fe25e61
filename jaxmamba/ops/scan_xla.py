"""The portable selective scan: `lax.scan` over chunks, `lax.associative_scan` inside each chunk.

Each chunk's body is rematerialised (`jax.checkpoint`), so a forward+backward keeps only the inputs,
the outputs and one state `(B, D, N)` per chunk: memory O(B·L·D + B·(L/T)·D·N) plus the work
arrays of a single chunk, O(B·T·D·N). No `(B, L, D, N)` tensor is ever allocated
(measured: docs/benchmarks.md, "Selective scan").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.scan_math import affine_combine, compute_dtype, discretize_delta, skip_and_gate

#: Target number of elements of one chunk's (B, T, D, N) work array (16 MiB in float32).
CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(batch: int, length: int, dim: int, state: int) -> int:
    """Largest power of two T with B·T·D·N ≤ CHUNK_ELEMENTS (at least 16), capped at L."""
    t = 16
    while t * 2 * batch * dim * state <= CHUNK_ELEMENTS and t < length:
        t *= 2
    return min(t, max(length, 1))


def selective_scan_xla(
    u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True,
    *, reverse=False, initial_state=None, chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Contract of `selective_scan_reference`; `chunk_size` T defaults to `default_chunk_size`."""
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    batch, length, dim = u.shape
    state = A.shape[1]
    t = chunk_size or default_chunk_size(batch, length, dim, state)
    n_chunks = -(-length // t)
    pad = n_chunks * t - length

    A = A.astype(dtype)
    uf = u.astype(dtype)
    dt = discretize_delta(delta, delta_bias, delta_softplus, dtype)
    xs = [dt, uf, B.astype(dtype), C.astype(dtype)]
    if pad:
        # δ = 0 on padded tokens: exp(0·A) = 1 and no input, so the state passes through unchanged.
        # Padding goes where the scan ends (after the last token, or before the first in reverse).
        where = ((0, 0), (pad, 0) if reverse else (0, pad), (0, 0))
        xs = [jnp.pad(x, where) for x in xs]
    # (B, nC·T, ·) -> (nC, B, T, ·)
    xs = [jnp.moveaxis(x.reshape(batch, n_chunks, t, x.shape[-1]), 1, 0) for x in xs]
    h0 = (jnp.zeros((batch, dim, state), dtype) if initial_state is None
          else initial_state.astype(dtype))

    @jax.checkpoint
    def chunk(h, chunk_xs):
        d, uu, b, c = chunk_xs  # (B, T, D), (B, T, D), (B, T, N), (B, T, N)
        decay = jnp.exp(d[..., None] * A[None, None])  # (B, T, D, N)
        inp = (d * uu)[..., None] * b[:, :, None, :]  # (B, T, D, N)
        a_cum, b_cum = lax.associative_scan(affine_combine, (decay, inp), axis=1, reverse=reverse)
        hs = a_cum * h[:, None] + b_cum  # (B, T, D, N)
        y = jnp.einsum("btdn,btn->btd", hs, c)
        return hs[:, 0 if reverse else -1], y

    h, ys = lax.scan(chunk, h0, xs, reverse=reverse)
    y = jnp.moveaxis(ys, 0, 1).reshape(batch, n_chunks * t, dim)  # (B, nC·T, D)
    y = y[:, pad:] if reverse else y[:, :length]
    y = skip_and_gate(y, uf, D, z)
    return y.astype(u.dtype), h
