"""The padded selective scan behind one `jax.custom_vjp`, on either backend's kernels.

Forward: K1 chunk states → K2 scan over chunks (`chunk_carries`, XLA) → K3 outputs; backward:
B1 chunk adjoints → B2 adjoint scan over chunks (XLA) → B3 gradients (README.md beside this file).
The VJP saves only the chunk start states `(B, L/T, D, N)` and `Σδ (B, L/T, D)` besides the
inputs (with `fused_replay`, the backward's saved states instead of the start states). A backend
is its four kernels, a `Phases`: Triton's (`scan_forward.py`, `scan_backward.py`) and Mosaic GPU's
(`mosaic_forward.py`, `mosaic_backward.py`) take the same arguments and return the same layouts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax

from jaxmamba.kernels.chunk_carries import chunk_carries, chunk_decay
from jaxmamba.kernels.scan_common import ScanStatics


class Phases(NamedTuple):
    """One backend's kernels: K1, K3, B1, B3 (hashable: a static argument of `scan`)."""

    chunk_states: Callable
    chunk_outputs: Callable
    chunk_adjoints: Callable
    chunk_gradients: Callable


def _forward(ph: Phases, st: ScanStatics, u, dt, z, A, B, C, D, bias, h0, *, save_states=False):
    """-> (y, final state, chunk start states, Σδ, the backward's saved states or None)."""
    h_loc, sdt = ph.chunk_states(st, u, dt, A, B, bias, h0.dtype)
    h_in, h_last = chunk_carries(chunk_decay(A, sdt), h_loc, h0, reverse=st.reverse)
    if save_states:
        y, h_fine = ph.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in, save_states=True)
        return y, h_last, h_in, sdt, h_fine
    return ph.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in), h_last, h_in, sdt, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _scan(ph: Phases, st: ScanStatics, u, dt, z, A, B, C, D, bias, h0):
    y, h_last, *_ = _forward(ph, st, u, dt, z, A, B, C, D, bias, h0)
    return y, h_last


def _scan_fwd(ph, st, u, dt, z, A, B, C, D, bias, h0):
    """Saves the inputs, Σδ and the chunk start states, or (`fused_replay`) the backward's
    saved states, whose first per chunk is the chunk's start state."""
    y, h_last, h_in, sdt, h_fine = _forward(ph, st, u, dt, z, A, B, C, D, bias, h0,
                                            save_states=st.fused_replay)
    states = h_fine if st.fused_replay else h_in
    return (y, h_last), (u, dt, z, A, B, C, D, bias, h0, states, sdt)


def _scan_bwd(ph, st, res, cotangents):
    u, dt, z, A, B, C, D, bias, h0, states, sdt = res
    g, g_last = cotangents
    if st.fused_replay:
        h_fine = states
        _, q_loc = ph.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, jax.ShapeDtypeStruct(
            states.shape[:2] + states.shape[3:], states.dtype))
    else:
        h_fine, q_loc = ph.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, states)
    mu, dh0 = chunk_carries(chunk_decay(A, sdt), q_loc, g_last.astype(q_loc.dtype),
                            reverse=not st.reverse)
    du, ddt, dz, db, dc, da, dd, dbias = ph.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                                            h_fine, mu)
    return (du, ddt, dz, da.sum((0, 1)).astype(A.dtype), db.sum(0).astype(B.dtype),
            dc.sum(0).astype(C.dtype), dd.sum((0, 1)).astype(D.dtype),
            dbias.sum((0, 1)).astype(bias.dtype), dh0.astype(h0.dtype))


_scan.defvjp(_scan_fwd, _scan_bwd)
#: (phases, statics, padded operands in `scan_common`'s layout) -> (y (B, Lp, Dp), final state
#: (B, Dp, Np)). Jitted: one executable per phase when called eagerly (interpret mode in tests
#: compiles op by op otherwise); inlined under an outer jit.
scan = jax.jit(_scan, static_argnums=(0, 1))
