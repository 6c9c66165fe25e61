"""Backward kernels (README.md beside this file), deterministic (no atomics), each beside a
pure-jnp reference.

With `a_t = exp(δ_t A)`, upstream gradient g, `gy = g·silu(z)`, the adjoint of the state obeys
`λ_t = C_t gy_t + a_{t+1} λ_{t+1}` (same decays, opposite direction), and
`du = Σ_n λ δ B + D gy`, `dδ = Σ_n λ (A a_t h_{t-1} + u B)`, `dB = Σ_d λ δ u`, `dC = Σ_d gy h`,
`dA = Σ λ δ a_t h_{t-1}`, `dD = Σ gy u`, `dz = g y silu'(z)`.

B1 `chunk_adjoints`: per chunk, replay the states from the chunk's true start state and save the
start state of every `state_stride`-th sub-chunk; sweep the chunk backwards from λ = 0 and return
`a_first·λ_first`.
B2 (XLA, in `selective_scan.py`): the adjoint scan over chunks, giving the adjoint entering each
chunk from its successor.
B3 `chunk_gradients`: per chunk, sub-chunks last to first: replay from the saved state before the
sub-chunk up to its start (no step when it is saved), then its states into registers (a static
unroll), then step backwards through them emitting every gradient row. dB and dC are partial
sums per channel tile, dA/dD/dbias partial sums per program; XLA adds them up.
With `fused_replay` the forward's K3 saves B1's states and B1 only sweeps the adjoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels.scan_forward import chunk_scan_reference
from jaxmamba.scan_math import discretize_delta


def _chunk_adjoints_kernel(*refs, st):
    if st.has_z:
        u_ref, dt_ref, z_ref, g_ref, a_ref, b_ref, c_ref, bias_ref, *states, q_ref = refs
    else:
        u_ref, dt_ref, g_ref, a_ref, b_ref, c_ref, bias_ref, *states, q_ref = refs
    cdt = q_ref.dtype
    a2 = a_ref[...].astype(cdt) * sc.LOG2E
    bias = bias_ref[...].astype(cdt)
    valid = sc.valid_rows(st)
    s = st.tiling.sub_chunk

    def forward_step(i, h):
        r = sc.row(st, i)
        d, _ = sc.delta_row(st, dt_ref, bias, r, valid)
        return sc.state_step(h, d, u_ref[r, :].astype(cdt), b_ref[r, :].astype(cdt), a2)[0]

    if not st.fused_replay:  # else K3 saved the states in the forward
        h0_ref, hf_ref = states
        group = s * st.tiling.state_stride

        def saved_state(k, h):  # h: the start state of group k - 1
            h = lax.fori_loop(0, group, lambda j, h: forward_step((k - 1) * group + j, h), h)
            hf_ref[k] = h
            return h

        hf_ref[0] = h0_ref[...]
        lax.fori_loop(1, st.tiling.saved_states, saved_state, h0_ref[...])

    def backward_step(i, lam_next):  # lam_next = a_{t+1} λ_{t+1}
        r = sc.row(st, st.tiling.chunk - 1 - i)
        d, _ = sc.delta_row(st, dt_ref, bias, r, valid)
        gy = g_ref[r, :].astype(cdt)
        if st.has_z:
            gy = gy * sc.silu_parts(z_ref[r, :].astype(cdt))[0]
        lam = gy[:, None] * c_ref[r, :].astype(cdt)[None, :] + lam_next
        return jnp.exp2(d[:, None] * a2) * lam

    q_ref[...] = lax.fori_loop(0, st.tiling.chunk, backward_step, jnp.zeros(a2.shape, cdt))


def chunk_adjoints(st: sc.ScanStatics, u, dt, z, g, A, B, C, bias, h_in):
    """B1. -> (saved states (B, nC, T/(S·stride), Dp, Np), local adjoints (B, nC, Dp, Np)).
    With `st.fused_replay` the states come from K3: `h_in` is only a shape, the result is
    (None, local adjoints) and the kernel does not replay the chunk."""
    batch, _, dim = u.shape
    n = A.shape[1]
    n_chunks, n_saved = h_in.shape[1], st.tiling.saved_states
    sp = sc.Specs(st.tiling, n, st.tiling.bwd_block_d, n_saved)
    seq_in = [u, dt] + ([z] if st.has_z else []) + [g]
    local = jax.ShapeDtypeStruct((batch, n_chunks, dim, n), h_in.dtype)
    call = functools.partial(
        sc.call, functools.partial(_chunk_adjoints_kernel, st=st), st, batch, dim,
        st.tiling.bwd_block_d, warps=st.tiling.bwd_warps, name="selective_scan_chunk_adjoints")
    in_specs = [sp.seq] * len(seq_in) + [sp.a, sp.bc, sp.bc, sp.vec]
    if st.fused_replay:
        q = call(in_specs=in_specs, out_specs=[sp.state], out_shape=[local])(
            *seq_in, A, B, C, bias)[0]
        return None, q
    return call(
        in_specs=in_specs + [sp.state], out_specs=[sp.fine, sp.state],
        out_shape=[jax.ShapeDtypeStruct((batch, n_chunks, n_saved, dim, n), h_in.dtype), local],
    )(*seq_in, A, B, C, bias, h_in)


def _chunk_gradients_kernel(*refs, st):
    if st.has_z:
        (u_ref, dt_ref, z_ref, g_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, hf_ref, mu_ref,
         du_ref, ddt_ref, dz_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs
    else:
        (u_ref, dt_ref, g_ref, a_ref, b_ref, c_ref, dv_ref, bias_ref, hf_ref, mu_ref,
         du_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, dbias_ref) = refs
    cdt = mu_ref.dtype
    a_nat = a_ref[...].astype(cdt)
    a2 = a_nat * sc.LOG2E
    bias = bias_ref[...].astype(cdt)
    valid = sc.valid_rows(st)
    dv = dv_ref[...].astype(cdt)
    s = st.tiling.sub_chunk
    n_sub = st.tiling.chunk // s
    stride = st.tiling.state_stride

    def replay_step(i, h):
        r = sc.row(st, i)
        d, _ = sc.delta_row(st, dt_ref, bias, r, valid)
        return sc.state_step(h, d, u_ref[r, :].astype(cdt), b_ref[r, :].astype(cdt), a2)[0]

    def sub_chunk(i, carry):
        lam_next, da, dd, dbias = carry
        k = n_sub - 1 - i
        if stride == 1:
            h = hf_ref[k]
        else:  # from the saved state at the start of k's group up to k's start
            first = (k // stride) * stride * s
            h = lax.fori_loop(first, k * s, replay_step, hf_ref[k // stride])
        hs = [h]
        for j in range(s):  # replay: the sub-chunk's states in registers
            hs.append(replay_step(k * s + j, hs[-1]))
        for j in reversed(range(s)):  # adjoint steps, last row first
            r = sc.row(st, k * s + j)
            d, x = sc.delta_row(st, dt_ref, bias, r, valid)
            u = u_ref[r, :].astype(cdt)
            b = b_ref[r, :].astype(cdt)
            c = c_ref[r, :].astype(cdt)
            g = g_ref[r, :].astype(cdt)
            h = hs[j + 1]
            if st.has_z:
                silu, dsilu = sc.silu_parts(z_ref[r, :].astype(cdt))
                y = jnp.sum(h * c[None, :], axis=1) + dv * u
                dz_ref[r, :] = (g * y * dsilu).astype(dz_ref.dtype)
                gy = g * silu
            else:
                gy = g
            lam = gy[:, None] * c[None, :] + lam_next
            decay = jnp.exp2(d[:, None] * a2)
            decayed_prev = decay * hs[j]  # a_t h_{t-1}
            lam_b = jnp.sum(lam * b[None, :], axis=1)
            du_ref[r, :] = (d * lam_b + dv * gy).astype(du_ref.dtype)
            ddt = (jnp.sum(lam * (a_nat * decayed_prev), axis=1) + u * lam_b) \
                * sc.delta_grad_factor(st, x, r, valid)
            ddt_ref[r, :] = ddt.astype(ddt_ref.dtype)
            db_ref[r, :] = jnp.sum(lam * (d * u)[:, None], axis=0)
            dc_ref[r, :] = jnp.sum(h * gy[:, None], axis=0)
            da = da + lam * (d[:, None] * decayed_prev)
            dd = dd + gy * u
            dbias = dbias + ddt
            lam_next = decay * lam
        return lam_next, da, dd, dbias

    zeros_d = jnp.zeros(bias.shape, cdt)
    _, da, dd, dbias = lax.fori_loop(
        0, n_sub, sub_chunk, (mu_ref[...], jnp.zeros(a2.shape, cdt), zeros_d, zeros_d))
    da_ref[...] = da
    dd_ref[...] = dd
    dbias_ref[...] = dbias


def chunk_gradients(st: sc.ScanStatics, u, dt, z, g, A, B, C, D, bias, h_fine, mu):
    """B3. `h_fine` from B1, `mu (B, nC, Dp, Np)` the adjoint entering each chunk's last row from
    its successor -> (du, ddelta, dz or None) rows in the inputs' dtypes; dB, dC partials
    (Dp/BD, B, Lp, Np); dA partials (B, nC, Dp, Np); dD, dbias partials (B, nC, Dp)."""
    batch, length, dim = u.shape
    n = A.shape[1]
    n_chunks, n_tiles = mu.shape[1], dim // st.tiling.bwd_block_d
    sp = sc.Specs(st.tiling, n, st.tiling.bwd_block_d, h_fine.shape[2])
    cdt = mu.dtype
    seq_in = [u, dt] + ([z] if st.has_z else []) + [g]
    seq_out = [u, dt] + ([z] if st.has_z else [])
    outs = sc.call(
        functools.partial(_chunk_gradients_kernel, st=st), st, batch, dim, st.tiling.bwd_block_d,
        in_specs=[sp.seq] * len(seq_in) + [sp.a, sp.bc, sp.bc, sp.vec, sp.vec, sp.fine, sp.state],
        out_specs=[sp.seq] * len(seq_out) + [sp.partial_bc, sp.partial_bc, sp.state,
                                             sp.chunk_vec, sp.chunk_vec],
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in seq_out] + [
            jax.ShapeDtypeStruct((n_tiles, batch, length, n), cdt),
            jax.ShapeDtypeStruct((n_tiles, batch, length, n), cdt),
            jax.ShapeDtypeStruct(mu.shape, cdt),
            jax.ShapeDtypeStruct((batch, n_chunks, dim), cdt),
            jax.ShapeDtypeStruct((batch, n_chunks, dim), cdt)],
        warps=st.tiling.bwd_warps, name="selective_scan_chunk_gradients",
    )(*seq_in, A, B, C, D, bias, h_fine, mu)
    if not st.has_z:
        outs = [*outs[:2], None, *outs[2:]]
    return outs


# ----------------------------------------------------------------- pure-jnp reference


def chunk_adjoints_reference(st: sc.ScanStatics, dt, z, g, A, C, bias, dtype):
    """B1's local adjoints by a sequential `lax.scan` per chunk (unpadded lengths)."""
    batch, _, dim = dt.shape
    t = st.tiling.chunk
    d = discretize_delta(dt, bias, st.delta_softplus, dtype).reshape(-1, t, dim)
    gy = g.astype(dtype) if z is None else g.astype(dtype) * jax.nn.silu(z.astype(dtype))
    gy, c = gy.reshape(-1, t, dim), C.astype(dtype).reshape(-1, t, C.shape[-1])

    def step(lam_next, xs):
        d_t, gy_t, c_t = xs
        lam = gy_t[..., None] * c_t[:, None] + lam_next
        return jnp.exp(d_t[..., None] * A.astype(dtype)[None]) * lam, None

    q0 = jnp.zeros((d.shape[0], dim, A.shape[1]), dtype)
    q, _ = lax.scan(step, q0, [jnp.moveaxis(x, 1, 0) for x in (d, gy, c)],
                    reverse=not st.reverse)
    return q.reshape(batch, -1, dim, A.shape[1])


def chunk_gradients_reference(st: sc.ScanStatics, u, dt, z, g, A, B, C, D, bias, h_in, mu):
    """B3 as the VJP of each chunk's sequential scan from its start state `h_in`, with the
    cotangent g on y and `mu` (the adjoint from the successor chunk) on the chunk's end state
    (unpadded lengths). -> (du, ddelta, dz or None, dB, dC, dA, dD, dbias), totals over chunks."""
    def scan(u, dt, z, B, C, A, D, bias):
        return chunk_scan_reference(st, u, dt, z, A, B, C, D, bias, h_in)

    _, vjp = jax.vjp(scan, u, dt, z, B, C, A, D, bias)
    return vjp((g.astype(u.dtype), mu))
