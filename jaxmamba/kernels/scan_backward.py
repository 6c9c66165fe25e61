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
sums per channel tile, dA/dD/dbias partial sums per program; XLA adds them up. That is the
`loop` variant; `blocked` (`GRADIENT_KERNELS`, README.md) walks only the two recurrences row by
row and computes every gradient once per sub-chunk on `(S, BD, N)` blocks.
With `fused_replay` the forward's K3 saves B1's states and B1 only sweeps the adjoint.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels.scan_forward import chunk_scan_reference
from jaxmamba.ops.scan_reference import discretize_delta


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


class _GradientRows:
    """What B3's per-sub-chunk bodies share: the refs, per-program constants, the replay."""

    def __init__(self, refs, st):
        if st.has_z:
            (self.u, self.dt, self.z, self.g, a_ref, self.b, self.c, dv_ref, bias_ref, self.hf,
             self.mu, self.du, self.ddt, self.dz, self.db, self.dc, *self.totals) = refs
        else:
            (self.u, self.dt, self.g, a_ref, self.b, self.c, dv_ref, bias_ref, self.hf, self.mu,
             self.du, self.ddt, self.db, self.dc, *self.totals) = refs
        self.st = st
        self.cdt = cdt = self.mu.dtype
        self.a_nat = a_ref[...].astype(cdt)
        self.a2 = self.a_nat * sc.LOG2E
        self.bias = bias_ref[...].astype(cdt)
        self.valid = sc.valid_rows(st)
        self.dv = dv_ref[...].astype(cdt)

    def row_in(self, ref, r):
        return ref[r, :].astype(self.cdt)

    def replay_step(self, i, h):
        r = sc.row(self.st, i)
        d, _ = sc.delta_row(self.st, self.dt, self.bias, r, self.valid)
        return sc.state_step(h, d, self.row_in(self.u, r), self.row_in(self.b, r), self.a2)[0]

    def start_state(self, k):
        """The state before sub-chunk k: from the saved state at the start of k's group."""
        st, s = self.st, self.st.tiling.sub_chunk
        stride = st.tiling.state_stride
        if stride == 1:
            return self.hf[k]
        first = (k // stride) * stride * s
        return lax.fori_loop(first, k * s, self.replay_step, self.hf[k // stride])

    def gated(self, r):
        """(g, gy = g·silu(z), silu'(z) or None) of row r."""
        g = self.row_in(self.g, r)
        if not self.st.has_z:
            return g, g, None
        silu, dsilu = sc.silu_parts(self.row_in(self.z, r))
        return g, g * silu, dsilu


def _loop_sub_chunk(k, carry, p: _GradientRows):
    """B3 "loop": the sub-chunk's states into registers, then one adjoint step per row with its
    reductions and row stores."""
    st, cdt, s = p.st, p.cdt, p.st.tiling.sub_chunk
    lam_next, da, dd, dbias = carry
    hs = [p.start_state(k)]
    for j in range(s):  # replay: the sub-chunk's states in registers
        hs.append(p.replay_step(k * s + j, hs[-1]))
    for j in reversed(range(s)):  # adjoint steps, last row first
        r = sc.row(st, k * s + j)
        d, x = sc.delta_row(st, p.dt, p.bias, r, p.valid)
        u, b, c = p.row_in(p.u, r), p.row_in(p.b, r), p.row_in(p.c, r)
        g, gy, dsilu = p.gated(r)
        h = hs[j + 1]
        if st.has_z:
            y = jnp.sum(h * c[None, :], axis=1) + p.dv * u
            p.dz[r, :] = (g * y * dsilu).astype(p.dz.dtype)
        lam = gy[:, None] * c[None, :] + lam_next
        decay = jnp.exp2(d[:, None] * p.a2)
        decayed_prev = decay * hs[j]  # a_t h_{t-1}
        lam_b = jnp.sum(lam * b[None, :], axis=1)
        p.du[r, :] = (d * lam_b + p.dv * gy).astype(p.du.dtype)
        ddt = (jnp.sum(lam * (p.a_nat * decayed_prev), axis=1) + u * lam_b) \
            * sc.delta_grad_factor(st, x, r, p.valid)
        p.ddt[r, :] = ddt.astype(p.ddt.dtype)
        p.db[r, :] = jnp.sum(lam * (d * u)[:, None], axis=0).astype(cdt)
        p.dc[r, :] = jnp.sum(h * gy[:, None], axis=0).astype(cdt)
        da = da + lam * (d[:, None] * decayed_prev)
        dd = dd + gy * u
        dbias = dbias + ddt
        lam_next = decay * lam
    return lam_next, da, dd, dbias


def _loop_gradients(p: _GradientRows, carry):
    n_sub = p.st.tiling.chunk // p.st.tiling.sub_chunk
    return lax.fori_loop(0, n_sub, lambda i, carry: _loop_sub_chunk(n_sub - 1 - i, carry, p),
                         carry)


def _blocked_sub_chunk(k, h, carry, p: _GradientRows):
    """B3 "blocked" for sub-chunk k from its start state h: only the two recurrences walk the
    rows (one FMA chain each, no reduction, no store); their S states and adjoints are stacked
    into `(S, BD, N)` blocks and every gradient is one expression over the sub-chunk, reduced
    once and stored as one `(S, ·)` block."""
    st, cdt, s = p.st, p.cdt, p.st.tiling.sub_chunk
    lam_next, da, dd, dbias = carry
    decays, decayed = [], []  # a_t and a_t h_{t-1} per step
    for j in range(s):
        r = sc.row(st, k * s + j)
        d, _ = sc.delta_row(st, p.dt, p.bias, r, p.valid)
        h_prev = h
        h, decay = sc.state_step(h, d, p.row_in(p.u, r), p.row_in(p.b, r), p.a2)
        decays.append(decay)
        decayed.append(decay * h_prev)
    lams = [None] * s
    for j in reversed(range(s)):  # λ_t = C_t gy_t + a_{t+1} λ_{t+1}
        r = sc.row(st, k * s + j)
        lams[j] = p.gated(r)[1][:, None] * p.row_in(p.c, r)[None, :] + lam_next
        lam_next = decays[j] * lams[j]
    # blocks in row order: steps k·S..k·S+S-1 are rows r0..r0+S-1 (descending when reverse)
    r0 = st.tiling.chunk - (k + 1) * s if st.reverse else k * s
    order = (lambda xs: xs[::-1]) if st.reverse else (lambda xs: xs)
    lam3, dp3 = sc.stack_leading(order(lams)), sc.stack_leading(order(decayed))
    d, x, rows = sc.delta_rows(st, p.dt, p.bias, r0, s, p.valid)
    blk = pl.ds(r0, s)
    u, b, c, g = (ref[blk, :].astype(cdt) for ref in (p.u, p.b, p.c, p.g))
    du3 = (d * u)[:, :, None]
    if st.has_z:
        silu, dsilu = sc.silu_parts(p.z[blk, :].astype(cdt))
        gy = g * silu
    else:
        gy = g
    h3 = dp3 + du3 * b[:, None, :]  # h_t = a_t h_{t-1} + δ u B
    if st.has_z:
        y = jnp.sum(h3 * c[:, None, :], axis=2) + p.dv[None, :] * u
        p.dz[blk, :] = (g * y * dsilu).astype(p.dz.dtype)
    lam_b = jnp.sum(lam3 * b[:, None, :], axis=2)
    p.du[blk, :] = (d * lam_b + p.dv[None, :] * gy).astype(p.du.dtype)
    ddt = (jnp.sum(lam3 * (p.a_nat[None] * dp3), axis=2) + u * lam_b) \
        * sc.delta_grad_factor(st, x, rows, p.valid)
    p.ddt[blk, :] = ddt.astype(p.ddt.dtype)
    p.db[blk, :] = jnp.sum(lam3 * du3, axis=1).astype(cdt)
    p.dc[blk, :] = jnp.sum(h3 * gy[:, :, None], axis=1).astype(cdt)
    da = da + jnp.sum(lam3 * (d[:, :, None] * dp3), axis=0)
    return lam_next, da, dd + jnp.sum(gy * u, axis=0), dbias + jnp.sum(ddt, axis=0)


def _blocked_gradients(p: _GradientRows, carry):
    """Saved-state groups last first; a group's sub-chunk start states are replayed forward
    once from its saved state (kept in registers), then its sub-chunks run last first."""
    s, stride = p.st.tiling.sub_chunk, p.st.tiling.state_stride
    n_groups = p.st.tiling.saved_states

    def group(i, carry):
        q = n_groups - 1 - i
        starts = [p.hf[q]]
        for m in range(1, stride):
            starts.append(lax.fori_loop((q * stride + m - 1) * s, (q * stride + m) * s,
                                        p.replay_step, starts[-1]))
        for m in reversed(range(stride)):
            carry = _blocked_sub_chunk(q * stride + m, starts[m], carry, p)
        return carry

    return lax.fori_loop(0, n_groups, group, carry)


#: B3's variants: `loop` steps through the rows with per-row reductions and stores; `blocked`
#: walks only the recurrences row by row and computes every gradient per sub-chunk block.
GRADIENT_KERNELS = {"loop": _loop_gradients, "blocked": _blocked_gradients}


def _chunk_gradients_kernel(*refs, st):
    p = _GradientRows(refs, st)
    zeros_d = jnp.zeros(p.bias.shape, p.cdt)
    _, da, dd, dbias = GRADIENT_KERNELS[st.gradients](
        p, (p.mu[...], jnp.zeros(p.a2.shape, p.cdt), zeros_d, zeros_d))
    da_ref, dd_ref, dbias_ref = p.totals
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
        warps=st.tiling.gradient_warps, name="selective_scan_chunk_gradients",
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
