"""Shared by the selective-scan kernels: block specs, row order, per-row math, `pallas_call`.

Kernel bodies use plain `jnp` on rows `(BD,)`, `(N,)` and state tiles `(BD, N)` read from refs
with a loop index, so they lower through Triton today (`triton_backend.py`, the one module that
imports it) and need only a new wrapper for Mosaic GPU. Layout of the padded operands:
`u, delta, z, g: (B, Lp, Dp)`, `B, C: (B, Lp, Np)`, `A: (Dp, Np)`, `D, delta_bias: (Dp,)`, chunk
states `(B, nC, Dp, Np)`; the grid is `(nC, B, Dp / BD)` and program `(c, b, j)` owns rows
`[c·T, (c+1)·T)` of channels `[j·BD, (j+1)·BD)`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxmamba.kernels import triton_backend
from jaxmamba.kernels.tiling import ScanTiling
from jaxmamba.scan_math import softplus

LOG2E = math.log2(math.e)
_SQUEEZED = getattr(pl, "squeezed", None)


@dataclasses.dataclass(frozen=True)
class ScanStatics:
    """Everything static about one call: tiling, flags and the true (unpadded) length."""

    tiling: ScanTiling
    length: int
    padded_length: int
    delta_softplus: bool
    reverse: bool
    has_z: bool
    interpret: bool
    poison_outputs: bool = False
    #: K3 saves the backward's states in the forward (a residual), so B1 need not replay
    fused_replay: bool = False

    @property
    def masked(self) -> bool:
        return self.padded_length != self.length


class Specs:
    """BlockSpecs of every operand kind for the grid `(nC, B, Dp / BD)`."""

    def __init__(self, tiling: ScanTiling, n: int, block_d: int, sub_chunks: int = 1):
        t, bd, sq = tiling.chunk, block_d, _SQUEEZED
        self.seq = pl.BlockSpec((sq, t, bd), lambda c, b, j: (b, c, j))  # (B, Lp, Dp)
        self.bc = pl.BlockSpec((sq, t, n), lambda c, b, j: (b, c, 0))  # (B, Lp, Np)
        self.a = pl.BlockSpec((bd, n), lambda c, b, j: (j, 0))  # (Dp, Np)
        self.vec = pl.BlockSpec((bd,), lambda c, b, j: (j,))  # (Dp,)
        self.state = pl.BlockSpec((sq, sq, bd, n), lambda c, b, j: (b, c, j, 0))  # (B, nC, Dp, Np)
        self.chunk_vec = pl.BlockSpec((sq, sq, bd), lambda c, b, j: (b, c, j))  # (B, nC, Dp)
        self.fine = pl.BlockSpec((sq, sq, sub_chunks, bd, n),
                                 lambda c, b, j: (b, c, 0, j, 0))  # (B, nC, K, Dp, Np)
        self.partial_bc = pl.BlockSpec((sq, sq, t, n),
                                       lambda c, b, j: (j, b, c, 0))  # (Dp/BD, B, Lp, Np)


def call(kernel, statics: ScanStatics, batch: int, dim: int, block_d: int, *, in_specs,
         out_specs, out_shape, warps: int, name: str):
    """`pl.pallas_call` on the Triton lowering (interpret mode needs no Triton and gets none).

    With `statics.poison_outputs` every output starts as a NaN-filled buffer aliased to it, so a
    test sees any element the kernel fails to write.
    """
    n_chunks = statics.padded_length // statics.tiling.chunk
    params = dict(grid=(n_chunks, batch, dim // block_d), interpret=statics.interpret, name=name)
    if not statics.interpret:
        params["compiler_params"] = triton_backend.compiler_params(warps)
    if not statics.poison_outputs:
        # jitted, so that a kernel whose outputs nothing uses leaves the program: JAX 0.10's DCE
        # rule keeps a bare `pallas_call` even when dead (the recomputed output kernel of a
        # remat="scan" backward, tests/test_lowered_step.py), a dead `jit` goes whole
        return jax.jit(pl.pallas_call(kernel, in_specs=in_specs, out_specs=out_specs,
                                      out_shape=out_shape, **params))
    outs = list(out_shape) if isinstance(out_shape, list | tuple) else [out_shape]
    out_specs_l = list(out_specs) if isinstance(out_specs, list | tuple) else [out_specs]
    n_in, n_out = len(in_specs), len(outs)

    def dropping_aliases(*refs):
        kernel(*refs[:n_in], *refs[n_in + n_out:])

    poisoned = pl.pallas_call(
        dropping_aliases, in_specs=list(in_specs) + out_specs_l, out_specs=out_specs,
        out_shape=out_shape, input_output_aliases={n_in + i: i for i in range(n_out)}, **params)
    return lambda *args: poisoned(*args, *[jnp.full(o.shape, jnp.nan, o.dtype) for o in outs])


def row(statics: ScanStatics, step):
    """Row of the chunk block visited at scan step `step` (read backwards when `reverse`)."""
    return statics.tiling.chunk - 1 - step if statics.reverse else step


def valid_rows(statics: ScanStatics):
    """Rows of this program's chunk that are real tokens (call at the kernel's top level, outside
    loops: interpret mode resolves `program_id` only there); None when nothing is padded."""
    if not statics.masked:
        return None
    return statics.length - pl.program_id(0) * statics.tiling.chunk


def delta_row(statics: ScanStatics, dt_ref, bias, r, valid):
    """(δ, pre-activation) of row r: `softplus(delta + bias)`; δ = 0 on padding rows."""
    x = dt_ref[r, :].astype(bias.dtype) + bias
    d = softplus(x) if statics.delta_softplus else x
    if valid is not None:
        d = jnp.where(r < valid, d, jnp.zeros_like(d))
    return d, x


def delta_grad_factor(statics: ScanStatics, x, r, valid):
    """dδ/d(delta) at pre-activation x (softplus' threshold 20 as the forward), 0 on padding."""
    f = jnp.where(x > 20.0, jnp.ones_like(x), jax.nn.sigmoid(x)) if statics.delta_softplus \
        else jnp.ones_like(x)
    if valid is not None:
        f = jnp.where(r < valid, f, jnp.zeros_like(f))
    return f


def state_step(h, d, u, b, a2):
    """`h ← exp(δ A) h + δ u B` on a (BD, N) tile; `a2 = A·log2(e)`. Returns (h, exp(δ A))."""
    decay = jnp.exp2(d[:, None] * a2)
    return decay * h + (d * u)[:, None] * b[None, :], decay


def silu_parts(z):
    """(silu(z), d silu / dz) of a row."""
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))
