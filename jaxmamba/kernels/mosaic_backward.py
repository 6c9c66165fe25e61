"""Backward kernels on Mosaic GPU: B1 `chunk_adjoints` and B3 `chunk_gradients`, the same phases,
operands and results as `scan_backward.py`'s (the maths are in its docstring; checked against its
`chunk_adjoints_reference` and `chunk_gradients_reference`). Deterministic: no atomics; dB and
dC are partial sums per channel tile, dA, dD and dbias per program, added up by XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.kernels import mosaic_common as mc
from jaxmamba.kernels.scan_common import ScanStatics


def _seq_operands(p, st, u_ref, dt_ref, z_ref, g_ref, b_ref, c_ref):
    ops = dict(u=p.seq(u_ref), dt=p.seq(dt_ref), g=p.seq(g_ref), B=p.bc(b_ref),
               C=p.bc(c_ref))
    if st.has_z:
        ops["z"] = p.seq(z_ref)
    return ops


def _gated(p, blk, r, cdt):
    """(g, gy = g·silu(z), silu(z), silu'(z)) of row r (z parts None without z)."""
    g = blk.row("g", r, cdt)
    if not p.st.has_z:
        return g, g, None, None
    silu, dsilu = mc.silu_parts(blk.row("z", r, cdt))
    return g, g * silu, silu, dsilu


def _chunk_adjoints_kernel(*refs, st):
    if st.has_z:
        u_ref, dt_ref, z_ref, g_ref, a_ref, b_ref, c_ref, bias_ref, *states, q_ref = refs
    else:
        u_ref, dt_ref, g_ref, a_ref, b_ref, c_ref, bias_ref, *states, q_ref = refs
        z_ref = None
    p = mc.Program(st)
    cdt = q_ref.dtype
    n = a_ref.shape[1]
    _, a2 = mc.a_log2(p, a_ref, cdt)
    bias = p.channels(bias_ref, cdt)
    rows = st.tiling.block_rows

    if not st.fused_replay:  # else K3 saved the states in the forward
        h0_ref, hf_ref = states
        group = st.tiling.sub_chunk * st.tiling.state_stride

        def replay(blk, first, h):
            def step(s, h):
                r = mc.memory_row(st, s)
                d, _ = mc.delta_row(p, blk, r, bias, cdt)
                return mc.state_step(h, d, blk.row("u", r, cdt), blk.row("B", r, cdt), a2)[0]

            def group_rows(k, h):  # the state before group k, then its rows
                s0 = first + k * group
                p.put_tile(hf_ref, h, s0 // group)
                return lax.fori_loop(0, group, lambda i, h: step(s0 + i, h), h)

            return lax.fori_loop(0, rows // group, group_rows, h)

        mc.walk(p, dict(u=p.seq(u_ref), dt=p.seq(dt_ref), B=p.bc(b_ref)), replay,
                p.tile(h0_ref, dtype=cdt), backwards=False)

    def sweep(blk, first, lam_next):  # lam_next = a_{t+1} λ_{t+1}
        def step(i, lam_next):
            r = mc.memory_row(st, first + rows - 1 - i)
            d, _ = mc.delta_row(p, blk, r, bias, cdt)
            gy = _gated(p, blk, r, cdt)[1]
            lam = mc.by_channel(gy, n) * mc.by_state(blk.row("C", r, cdt), p.bd) + lam_next
            return jnp.exp2(mc.by_channel(d, n) * a2) * lam

        return lax.fori_loop(0, rows, step, lam_next)

    operands = dict(dt=p.seq(dt_ref), g=p.seq(g_ref), C=p.bc(c_ref))
    if st.has_z:
        operands["z"] = p.seq(z_ref)
    q = mc.walk(p, operands, sweep, p.zeros_tile(n, cdt), backwards=True)
    p.put_tile(q_ref, q)


def chunk_adjoints(st: ScanStatics, u, dt, z, g, A, B, C, bias, h_in):
    """B1. -> (saved states (B, nC, T/(S·stride), Dp, Np), local adjoints (B, nC, Dp, Np));
    with `st.fused_replay` (None, local adjoints) and `h_in` only a shape."""
    mc.check_poison(st)
    batch, _, dim = u.shape
    n_chunks, n = h_in.shape[1], A.shape[1]
    local = jax.ShapeDtypeStruct((batch, n_chunks, dim, n), h_in.dtype)
    seq_in = [u, dt] + ([z] if st.has_z else []) + [g]
    name = "selective_scan_mosaic_chunk_adjoints"
    if st.fused_replay:
        q = mc.call(st, _chunk_adjoints_kernel, name, batch, dim, [local])(
            *seq_in, A, B, C, bias)[0]
        return None, q
    saved = jax.ShapeDtypeStruct((batch, n_chunks, st.tiling.saved_states, dim, n), h_in.dtype)
    return tuple(mc.call(st, _chunk_adjoints_kernel, name, batch, dim, [saved, local])(
        *seq_in, A, B, C, bias, h_in))


def _chunk_gradients_kernel(*refs, st):
    if st.has_z:
        (u_ref, dt_ref, z_ref, g_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, hf_ref, mu_ref,
         du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs
    else:
        (u_ref, dt_ref, g_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, hf_ref, mu_ref,
         du_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs
        z_ref = dz_ref = None
    p = mc.Program(st)
    cdt = mu_ref.dtype
    n = a_ref.shape[1]
    a_nat, a2 = mc.a_log2(p, a_ref, cdt)
    bias = p.channels(bias_ref, cdt)
    dv = p.channels(dv_ref, cdt)
    s, stride, rows = st.tiling.sub_chunk, st.tiling.state_stride, st.tiling.block_rows

    def block(blk, first, carry):
        def replay(s_, h):
            r = mc.memory_row(st, s_)
            d, _ = mc.delta_row(p, blk, r, bias, cdt)
            return mc.state_step(h, d, blk.row("u", r, cdt), blk.row("B", r, cdt), a2)[0]

        def sub_chunk(i, carry):
            lam_next, da, dd, dbias = carry
            k = first // s + rows // s - 1 - i  # the chunk's sub-chunk k, last first
            h = blk.state("hf", k // stride, cdt)
            if stride > 1:  # from the saved state at the start of k's group up to k's start
                g0 = (k // stride) * stride * s
                h = lax.fori_loop(0, (k % stride) * s, lambda j, h: replay(g0 + j, h), h)
            hs = [h]
            for j in range(s):  # replay: the sub-chunk's states in registers
                hs.append(replay(k * s + j, hs[-1]))
            for j in reversed(range(s)):  # adjoint steps, last row first
                r = mc.memory_row(st, k * s + j)
                d, x = mc.delta_row(p, blk, r, bias, cdt)
                u, b, c = blk.row("u", r, cdt), blk.row("B", r, cdt), blk.row("C", r, cdt)
                g, gy, _, dsilu = _gated(p, blk, r, cdt)
                h = hs[j + 1]
                if st.has_z:
                    y = jnp.sum(h * mc.by_state(c, p.bd), axis=1) + dv * u
                    p.put_row(dz_ref, r, g * y * dsilu)
                lam = mc.by_channel(gy, n) * mc.by_state(c, p.bd) + lam_next
                decay = jnp.exp2(mc.by_channel(d, n) * a2)
                decayed_prev = decay * hs[j]  # a_t h_{t-1}
                lam_b = jnp.sum(lam * mc.by_state(b, p.bd), axis=1)
                p.put_row(du_ref, r, d * lam_b + dv * gy)
                ddt = (jnp.sum(lam * (a_nat * decayed_prev), axis=1) + u * lam_b) \
                    * mc.delta_grad_factor(p, x, r)
                p.put_row(ddt_ref, r, ddt)
                p.put_partial(db_ref, r, jnp.sum(lam * mc.by_channel(d * u, n), axis=0))
                p.put_partial(dc_ref, r, jnp.sum(h * mc.by_channel(gy, n), axis=0))
                da = da + lam * (mc.by_channel(d, n) * decayed_prev)
                dd = dd + gy * u
                dbias = dbias + ddt
                lam_next = decay * lam
            return lam_next, da, dd, dbias

        return lax.fori_loop(0, rows // s, sub_chunk, carry)

    zeros = p.zeros_channels(cdt)
    carry = (p.tile(mu_ref, dtype=cdt), p.zeros_tile(n, cdt), zeros, zeros)
    _, da, dd, dbias = mc.walk(
        p, _seq_operands(p, st, u_ref, dt_ref, z_ref, g_ref, b_ref, c_ref), block, carry,
        backwards=True, states=dict(hf=hf_ref.at[p.b, p.c, :, p.ch, :]))
    p.put_tile(da_ref, da)
    p.put_channels(dd_ref, dd)
    p.put_channels(dbias_ref, dbias)


def chunk_gradients(st: ScanStatics, u, dt, z, g, A, B, C, D, bias, h_fine, mu):
    """B3. `h_fine` from B1 (or K3), `mu (B, nC, Dp, Np)` the adjoint entering each chunk's last
    row -> (du, ddelta, dz or None) in the inputs' dtypes; dB, dC partials (Dp/BD, B, Lp, Np);
    dA partials (B, nC, Dp, Np); dD, dbias partials (B, nC, Dp)."""
    mc.check_poison(st)
    batch, length, dim = u.shape
    n = A.shape[1]
    n_tiles = dim // st.tiling.block_d
    cdt = mu.dtype
    seq_in = [u, dt] + ([z] if st.has_z else []) + [g]
    seq_out = [u, dt] + ([z] if st.has_z else [])
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in seq_out] + [
        jax.ShapeDtypeStruct((n_tiles, batch, length, n), cdt),
        jax.ShapeDtypeStruct((n_tiles, batch, length, n), cdt),
        jax.ShapeDtypeStruct(mu.shape, cdt),
        jax.ShapeDtypeStruct(mu.shape[:3], cdt),
        jax.ShapeDtypeStruct(mu.shape[:3], cdt)]
    outs = mc.call(st, _chunk_gradients_kernel, "selective_scan_mosaic_chunk_gradients", batch,
                dim, out)(*seq_in, A, B, C, D, bias, h_fine, mu)
    outs = list(outs)
    if not st.has_z:
        outs = [*outs[:2], None, *outs[2:]]
    return outs
