"""The padded selective scan on the Mosaic GPU kernels behind a `jax.custom_vjp`:
`selective_scan_pallas(..., backend="mosaic")` pads, picks the tiling and calls `scan` here.

The same phases as the Triton backend (`selective_scan.py`): K1 (`mosaic_forward.chunk_states`)
→ K2 (`chunk_carries`, XLA) → K3 (`mosaic_forward.chunk_outputs`); backward B1
(`mosaic_backward.chunk_adjoints`) → B2 (XLA) → B3 (`mosaic_backward.chunk_gradients`), with the
same residuals: the inputs, the chunk start states (or, with `fused_replay`, the backward's saved
states) and Σδ. Its own custom VJP so that each backend's phases can change on their own.
"""

from __future__ import annotations

import functools

import jax

from jaxmamba.kernels import mosaic_backward as kb
from jaxmamba.kernels import mosaic_forward as kf
from jaxmamba.kernels.chunk_carries import chunk_carries, chunk_decay
from jaxmamba.kernels.scan_common import ScanStatics


def _forward(st: ScanStatics, u, dt, z, A, B, C, D, bias, h0, *, save_states=False):
    """-> (y, final state, chunk start states, Σδ, the backward's saved states or None)."""
    h_loc, sdt = kf.chunk_states(st, u, dt, A, B, bias, h0.dtype)
    h_in, h_last = chunk_carries(chunk_decay(A, sdt), h_loc, h0, reverse=st.reverse)
    outs = kf.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in, save_states=save_states)
    if save_states:
        return outs[0], h_last, h_in, sdt, outs[1]
    return outs, h_last, h_in, sdt, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _scan(st: ScanStatics, u, dt, z, A, B, C, D, bias, h0):
    y, h_last, *_ = _forward(st, u, dt, z, A, B, C, D, bias, h0)
    return y, h_last


def _scan_fwd(st, u, dt, z, A, B, C, D, bias, h0):
    y, h_last, h_in, sdt, h_fine = _forward(st, u, dt, z, A, B, C, D, bias, h0,
                                            save_states=st.fused_replay)
    states = h_fine if st.fused_replay else h_in
    return (y, h_last), (u, dt, z, A, B, C, D, bias, h0, states, sdt)


def _scan_bwd(st, res, cotangents):
    u, dt, z, A, B, C, D, bias, h0, states, sdt = res
    g, g_last = cotangents
    if st.fused_replay:
        h_fine = states
        _, q_loc = kb.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, jax.ShapeDtypeStruct(
            states.shape[:2] + states.shape[3:], states.dtype))
    else:
        h_fine, q_loc = kb.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, states)
    mu, dh0 = chunk_carries(chunk_decay(A, sdt), q_loc, g_last.astype(q_loc.dtype),
                            reverse=not st.reverse)
    du, ddt, dz, db, dc, da, dd, dbias = kb.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                                            h_fine, mu)
    return (du, ddt, dz, da.sum((0, 1)).astype(A.dtype), db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), dd.sum((0, 1)).astype(D.dtype),
            dbias.sum((0, 1)).astype(bias.dtype), dh0.astype(h0.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)
#: Padded operands (`scan_common`'s layout) -> (y (B, Lp, Dp), final state (B, Dp, Np)).
scan = jax.jit(_scan, static_argnums=0)
