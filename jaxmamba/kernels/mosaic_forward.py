"""Forward kernels on Mosaic GPU: K1 `chunk_states` and K3 `chunk_outputs`, the same phases,
operands and results as `scan_forward.py`'s (checked against its `chunk_states_reference` and
`chunk_outputs_reference`); `mosaic_common.py` has the program layout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.kernels import mosaic_common as mc
from jaxmamba.kernels.scan_common import ScanStatics


def _chunk_states_kernel(u_ref, dt_ref, a_ref, b_ref, bias_ref, h_ref, s_ref, *, st):
    p = mc.Program(st)
    cdt = h_ref.dtype
    n = a_ref.shape[1]
    _, a2 = mc.a_log2(p, a_ref, cdt)
    bias = p.channels(bias_ref, cdt)

    def block(blk, first, carry):
        def step(i, carry):
            h, s = carry
            r = mc.memory_row(st, first + i)
            d, _ = mc.delta_row(p, blk, r, bias, cdt)
            h, _ = mc.state_step(h, d, blk.row("u", r, cdt), blk.row("B", r, cdt), a2)
            return h, s + d

        return lax.fori_loop(0, blk.rows, step, carry)

    h, s = mc.walk(p, dict(u=p.seq(u_ref), dt=p.seq(dt_ref), B=p.bc(b_ref)), block,
                   (p.zeros_tile(n, cdt), p.zeros_channels(cdt)), backwards=False)
    p.put_tile(h_ref, h)
    p.put_channels(s_ref, s)


def chunk_states(st: ScanStatics, u, dt, A, B, bias, dtype):
    """K1. Padded operands -> (end states (B, nC, Dp, Np) from a zero start, Σδ (B, nC, Dp))."""
    mc.check_poison(st)
    batch, _, dim = u.shape
    n_chunks = st.padded_length // st.tiling.chunk
    out = [jax.ShapeDtypeStruct((batch, n_chunks, dim, A.shape[1]), dtype),
           jax.ShapeDtypeStruct((batch, n_chunks, dim), dtype)]
    return mc.call(st, _chunk_states_kernel, "selective_scan_mosaic_chunk_states", batch, dim,
                out)(u, dt, A, B, bias)


def _chunk_outputs_kernel(*refs, st, save_states):
    if st.has_z:
        u_ref, dt_ref, z_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, h0_ref, y_ref, *hf = refs
    else:
        u_ref, dt_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, h0_ref, y_ref, *hf = refs
        z_ref = None
    p = mc.Program(st)
    cdt = h0_ref.dtype
    _, a2 = mc.a_log2(p, a_ref, cdt)
    bias = p.channels(bias_ref, cdt)
    dv = p.channels(dv_ref, cdt)
    group = st.tiling.sub_chunk * st.tiling.state_stride if save_states else st.tiling.block_rows

    def block(blk, first, h):
        def step(s, h):
            r = mc.memory_row(st, s)
            d, _ = mc.delta_row(p, blk, r, bias, cdt)
            u = blk.row("u", r, cdt)
            h, _ = mc.state_step(h, d, u, blk.row("B", r, cdt), a2)
            y = jnp.sum(h * mc.by_state(blk.row("C", r, cdt), p.bd), axis=1) + dv * u
            if st.has_z:
                y = y * mc.silu_parts(blk.row("z", r, cdt))[0]
            p.put_row(y_ref, r, y)
            return h

        def group_rows(g, h):
            s0 = first + g * group
            if save_states:  # the backward's saved state s0 / group, then its rows
                p.put_tile(hf[0], h, s0 // group)
            return lax.fori_loop(0, group, lambda i, h: step(s0 + i, h), h)

        return lax.fori_loop(0, blk.rows // group, group_rows, h)

    operands = dict(u=p.seq(u_ref), dt=p.seq(dt_ref), B=p.bc(b_ref), C=p.bc(c_ref))
    if st.has_z:
        operands["z"] = p.seq(z_ref)
    mc.walk(p, operands, block, p.tile(h0_ref, dtype=cdt), backwards=False)


def chunk_outputs(st: ScanStatics, u, dt, z, A, B, C, D, bias, h_in, *,
                  save_states: bool = False):
    """K3. Padded operands and the chunk start states `h_in (B, nC, Dp, Np)` -> y (B, Lp, Dp)
    in u's dtype; with `save_states` also the backward's saved states (B, nC, T/(S·stride),
    Dp, Np), the state before every `sub_chunk·state_stride` rows."""
    mc.check_poison(st)
    batch, _, dim = u.shape
    out = [jax.ShapeDtypeStruct(u.shape, u.dtype)]
    if save_states:
        out.append(jax.ShapeDtypeStruct(
            (batch, h_in.shape[1], st.tiling.saved_states, dim, A.shape[1]), h_in.dtype))
    seq_in = [u, dt] + ([z] if st.has_z else [])
    outs = mc.call(st, functools.partial(_chunk_outputs_kernel, save_states=save_states),
                "selective_scan_mosaic_chunk_outputs", batch, dim, out)(
        *seq_in, A, B, C, D, bias, h_in)
    return outs if save_states else outs[0]
