"""Forward kernels (README.md beside this file), each beside its pure-jnp reference.

K1 `chunk_states`: every chunk scanned from a zero state, giving its end state and `Σδ`.
K2 (XLA, in `selective_scan.py`): the scan over chunks, giving each chunk's start state.
K3 `chunk_outputs`: every chunk rescanned from its true start state, writing `y` (skip, gate fused).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.kernels import scan_common as sc
from jaxmamba.scan_math import compute_dtype, discretize_delta, skip_and_gate


def _chunk_states_kernel(u_ref, dt_ref, a_ref, b_ref, bias_ref, h_ref, s_ref, *, st):
    a2 = a_ref[...].astype(h_ref.dtype) * sc.LOG2E
    bias = bias_ref[...].astype(h_ref.dtype)
    valid = sc.valid_rows(st)

    def body(i, carry):
        h, s = carry
        r = sc.row(st, i)
        d, _ = sc.delta_row(st, dt_ref, bias, r, valid)
        h, _ = sc.state_step(h, d, u_ref[r, :].astype(h.dtype), b_ref[r, :].astype(h.dtype), a2)
        return h, s + d

    h, s = lax.fori_loop(0, st.tiling.chunk, body,
                         (jnp.zeros(a2.shape, h_ref.dtype), jnp.zeros(bias.shape, h_ref.dtype)))
    h_ref[...] = h
    s_ref[...] = s


def chunk_states(st: sc.ScanStatics, u, dt, A, B, bias, dtype):
    """K1. Padded operands (module docstring of scan_common) -> (end states (B, nC, Dp, Np) from a
    zero start, Σδ per chunk (B, nC, Dp)), both in `dtype`."""
    batch, _, dim = u.shape
    n = A.shape[1]
    n_chunks = st.padded_length // st.tiling.chunk
    sp = sc.Specs(st.tiling, n, st.tiling.block_d)
    return sc.call(
        functools.partial(_chunk_states_kernel, st=st), st, batch, dim, st.tiling.block_d,
        in_specs=[sp.seq, sp.seq, sp.a, sp.bc, sp.vec], out_specs=[sp.state, sp.chunk_vec],
        out_shape=[jax.ShapeDtypeStruct((batch, n_chunks, dim, n), dtype),
                   jax.ShapeDtypeStruct((batch, n_chunks, dim), dtype)],
        warps=st.tiling.fwd_warps, name="selective_scan_chunk_states",
    )(u, dt, A, B, bias)


def _chunk_outputs_kernel(*refs, st, save_states):
    if st.has_z:
        u_ref, dt_ref, z_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, h0_ref, y_ref, *hf = refs
    else:
        u_ref, dt_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, h0_ref, y_ref, *hf = refs
    cdt = h0_ref.dtype
    a2 = a_ref[...].astype(cdt) * sc.LOG2E
    bias = bias_ref[...].astype(cdt)
    valid = sc.valid_rows(st)
    dv = dv_ref[...].astype(cdt)

    def body(i, h):
        r = sc.row(st, i)
        d, _ = sc.delta_row(st, dt_ref, bias, r, valid)
        u = u_ref[r, :].astype(cdt)
        h, _ = sc.state_step(h, d, u, b_ref[r, :].astype(cdt), a2)
        y = jnp.sum(h * c_ref[r, :].astype(cdt)[None, :], axis=1) + dv * u
        if st.has_z:
            y = y * sc.silu_parts(z_ref[r, :].astype(cdt))[0]
        y_ref[r, :] = y.astype(y_ref.dtype)
        return h

    if not save_states:
        lax.fori_loop(0, st.tiling.chunk, body, h0_ref[...])
        return
    group = st.tiling.sub_chunk * st.tiling.state_stride

    def group_rows(k, h):  # the backward's saved state k, then its group of rows
        hf[0][k] = h
        return lax.fori_loop(k * group, (k + 1) * group, body, h)

    lax.fori_loop(0, st.tiling.saved_states, group_rows, h0_ref[...])


def chunk_outputs(st: sc.ScanStatics, u, dt, z, A, B, C, D, bias, h_in, *,
                  save_states: bool = False):
    """K3. Padded operands and the chunk start states `h_in (B, nC, Dp, Np)` -> y (B, Lp, Dp)
    in u's dtype; with `save_states` also the backward's saved states (B1's first output, the
    start state of every `sub_chunk·state_stride` rows: (B, nC, T/(S·stride), Dp, Np))."""
    batch, _, dim = u.shape
    n = A.shape[1]
    sp = sc.Specs(st.tiling, n, st.tiling.block_d, st.tiling.saved_states)
    seq_in = [u, dt] + ([z] if st.has_z else [])
    out_specs, out_shape = [sp.seq], [jax.ShapeDtypeStruct(u.shape, u.dtype)]
    if save_states:
        out_specs.append(sp.fine)
        out_shape.append(jax.ShapeDtypeStruct(
            (batch, h_in.shape[1], st.tiling.saved_states, dim, n), h_in.dtype))
    outs = sc.call(
        functools.partial(_chunk_outputs_kernel, st=st, save_states=save_states), st, batch,
        dim, st.tiling.block_d,
        in_specs=[sp.seq] * len(seq_in) + [sp.a, sp.bc, sp.bc, sp.vec, sp.vec, sp.state],
        out_specs=out_specs, out_shape=out_shape,
        warps=st.tiling.fwd_warps, name="selective_scan_chunk_outputs",
    )(*seq_in, A, B, C, D, bias, h_in)
    return outs if save_states else outs[0]


# ----------------------------------------------------------------- pure-jnp references


def _chunked(x, chunk):
    """(B, Lp, F) -> (B·nC, T, F)."""
    return x.reshape(-1, chunk, x.shape[-1])


def _chunk_recurrence(st: sc.ScanStatics, d, u, B, A, h0, C=None):
    """`h_t = exp(δ_t A) h_{t-1} + δ_t u_t B_t` over each chunk's rows by a sequential `lax.scan`
    from `h0 (B·nC, D, N)`; d, u (B·nC, T, D), B, C (B·nC, T, N), all in h0's dtype. -> (end
    states (B·nC, D, N), `<C_t, h_t>` (B·nC, T, D) or None without C)."""
    def step(h, xs):
        d_t, u_t, b_t, *c_t = xs
        h = jnp.exp(d_t[..., None] * A[None]) * h + (d_t * u_t)[..., None] * b_t[:, None]
        return h, jnp.einsum("bdn,bn->bd", h, c_t[0]) if c_t else None

    xs = [jnp.moveaxis(x, 1, 0) for x in (d, u, B) + (() if C is None else (C,))]
    h, ys = lax.scan(step, h0, xs, reverse=st.reverse)
    return h, None if C is None else jnp.moveaxis(ys, 0, 1)


def chunk_states_reference(st: sc.ScanStatics, u, dt, A, B, bias, dtype):
    """K1 by a sequential `lax.scan` per chunk (no padding mask: use unpadded lengths)."""
    batch, _, dim = u.shape
    t = st.tiling.chunk
    d = _chunked(discretize_delta(dt, bias, st.delta_softplus, dtype), t)
    h0 = jnp.zeros((d.shape[0], dim, A.shape[1]), dtype)
    h, _ = _chunk_recurrence(st, d, _chunked(u.astype(dtype), t), _chunked(B.astype(dtype), t),
                             A.astype(dtype), h0)
    n_chunks = st.padded_length // t
    return h.reshape(batch, n_chunks, dim, -1), d.sum(axis=1).reshape(batch, n_chunks, dim)


def chunk_scan_reference(st: sc.ScanStatics, u, dt, z, A, B, C, D, bias, h_in):
    """Every chunk scanned alone from its start state `h_in (B, nC, D, N)` by a sequential
    `lax.scan` (unpadded lengths): (y (B, L, D) in u's dtype, chunk end states (B, nC, D, N))."""
    batch, length, dim = u.shape
    t, n = st.tiling.chunk, A.shape[1]
    dtype = compute_dtype(u, dt, z, A, B, C, D, bias, h_in)
    uu = u.astype(dtype)
    h, ys = _chunk_recurrence(
        st, _chunked(discretize_delta(dt, bias, st.delta_softplus, dtype), t), _chunked(uu, t),
        _chunked(B.astype(dtype), t), A.astype(dtype), h_in.reshape(-1, dim, n).astype(dtype),
        _chunked(C.astype(dtype), t))
    y = skip_and_gate(ys.reshape(batch, length, dim), uu, D, z)
    return y.astype(u.dtype), h.reshape(h_in.shape)


def chunk_outputs_reference(st: sc.ScanStatics, u, dt, z, A, B, C, D, bias, h_in):
    """K3: y (B, L, D) from each chunk's start state (unpadded lengths)."""
    return chunk_scan_reference(st, u, dt, z, A, B, C, D, bias, h_in)[0]
