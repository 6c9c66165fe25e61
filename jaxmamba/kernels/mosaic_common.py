"""Shared by the Mosaic GPU kernels (`mosaic_forward.py`, `mosaic_backward.py`): their tiling,
what a program knows about itself, the walk over a chunk's rows and the per-row maths.

A program owns one chunk of `T` rows of one batch element and a tile of 64 channels (the WGMMA
register layout's rows, `mosaic_backend.py`); the grid is `(L/T, B, D/64)`, the layout of every
operand is `scan_common`'s. It walks its chunk row by row with the `(64, N)` state in registers;
rows come from shared memory, `block_rows` at a time, copied there by an `emit_pipeline` (TMA)
while the previous block is processed. Outputs go from registers straight to global memory (GPU
interpret mode cannot run a pipeline's output copies).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxmamba.kernels import mosaic_backend as mb
from jaxmamba.kernels.scan_common import LOG2E, ScanStatics
from jaxmamba.kernels.tiling import MIN_PROGRAMS, ScanTiling, next_pow2, padded_state

GRID_NAMES = ("chunk", "batch", "channels")
#: Rows per pipelined block: 32 fp32 rows of 64 channels are 8 KiB per operand and buffer.
BLOCK_ROWS = 32
#: Registers (fp32 words per thread) for the gradient kernel's replayed states: a (64, N) state
#: is N/2 words per thread, so N=16 replays 8 steps, N=32 four.
BWD_STATE_WORDS = 64
#: Rows between the backward's saved states: the Triton kernels' (`tiling.default_tiling`: 8-row
#: sub-chunks, a state every second one), so both backends keep the same `(B, L/16, D, N)` buffer
#: where `MAX_STATE_STRIDE` allows it (N <= 32).
SAVED_STATE_ROWS = 16
#: Sub-chunks per saved state at most: the gradient kernel replays `(stride - 1)/2` sub-chunks
#: per sub-chunk on average before its own (docs/benchmarks.md: the trade at Synapse stage 0).
MAX_STATE_STRIDE = 4


@dataclasses.dataclass(frozen=True)
class MosaicTiling(ScanTiling):
    """`ScanTiling` for the Mosaic kernels: `block_d == bwd_block_d`, a multiple of 64; the
    warps are a warpgroup's four; `block_rows`: rows per pipelined block, a divisor of `chunk`
    and a multiple of `sub_chunk·state_stride` (a backward group never spans two blocks)."""

    block_rows: int = BLOCK_ROWS

    def __post_init__(self):
        super().__post_init__()
        if self.block_d != self.bwd_block_d or self.block_d % mb.TILE_ROWS:
            raise ValueError(f"MosaicTiling: block_d={self.block_d}, bwd_block_d="
                             f"{self.bwd_block_d}: expected equal multiples of {mb.TILE_ROWS}")
        group = self.sub_chunk * self.state_stride
        if self.chunk % self.block_rows or self.block_rows % group:
            raise ValueError(f"MosaicTiling: block_rows={self.block_rows} must divide chunk="
                             f"{self.chunk} and be a multiple of sub_chunk x state_stride="
                             f"{group}")


def default_mosaic_tiling(batch: int, length: int, dim: int, state: int) -> MosaicTiling:
    """64-channel tiles; `chunk` as `tiling.default_tiling` (the largest of 256…16 giving
    `MIN_PROGRAMS` programs); `sub_chunk` such that its states fit `BWD_STATE_WORDS`;
    `state_stride` such that a state is saved every `SAVED_STATE_ROWS` rows, at most
    `MAX_STATE_STRIDE` (N=16: 8 x 2, N=32: 4 x 4, N=64: 2 x 4, N >= 128: 1 x 4) and at most the
    chunk's sub-chunks."""
    n = padded_state(state)
    n_d = -(-dim // mb.TILE_ROWS)
    chunk = 256
    while chunk > 16 and batch * n_d * -(-length // chunk) < MIN_PROGRAMS:
        chunk //= 2
    chunk = max(8, min(chunk, next_pow2(length)))
    sub_chunk = max(1, min(8, chunk, 2 * BWD_STATE_WORDS // n))
    stride = max(1, min(MAX_STATE_STRIDE, SAVED_STATE_ROWS // sub_chunk, chunk // sub_chunk))
    rows = min(chunk, max(BLOCK_ROWS, sub_chunk * stride))
    return MosaicTiling(chunk, mb.TILE_ROWS, 4, mb.TILE_ROWS, sub_chunk, 4, stride, rows)


def as_mosaic(tiling: ScanTiling) -> MosaicTiling:
    """A `ScanTiling` given for the Mosaic backend, checked (`block_rows` from the defaults)."""
    if isinstance(tiling, MosaicTiling):
        return tiling
    rows = min(tiling.chunk, max(BLOCK_ROWS, tiling.sub_chunk * tiling.state_stride))
    return MosaicTiling(**dataclasses.asdict(tiling), block_rows=rows)


def named(name, fn, **kw):
    """`fn` with `kw` bound, called `name` (the kernel's name in profiles and HLO)."""
    bound = functools.partial(fn, **kw)

    def kernel(*refs):
        return bound(*refs)

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


def call(st: ScanStatics, body, name, batch, dim, out_shape):
    """`mosaic_backend.kernel` over the grid `(nC, B, Dp / BD)`."""
    grid = (st.padded_length // st.tiling.chunk, batch, dim // st.tiling.block_d)
    return mb.kernel(named(name, body, st=st), out_shape=out_shape, grid=grid,
                     grid_names=GRID_NAMES, interpret=st.interpret, name=name)


def check_poison(st: ScanStatics):
    if st.poison_outputs and not st.interpret:
        raise NotImplementedError(
            "selective_scan: poison_outputs on the Mosaic GPU backend needs interpret mode "
            "(its outputs start as NaN there; compiled kernels cannot alias NaN buffers)")


class Program:
    """One program's place (read at the kernel's top level): its chunk `c`, batch element `b`,
    channel tile `ch`, views of its blocks of the operands and its valid row count."""

    def __init__(self, st: ScanStatics):
        self.st = st
        self.t = st.tiling.chunk
        self.bd = st.tiling.block_d
        self.c, self.b, self.j = (lax.axis_index(n) for n in GRID_NAMES)
        self.ch = pl.ds(self.j * self.bd, self.bd)
        self.rows = pl.ds(self.c * self.t, self.t)
        self.valid = st.length - self.c * self.t if st.masked else None

    def seq(self, ref):
        """The chunk's (T, BD) block of a (B, Lp, Dp) operand."""
        return ref.at[self.b, self.rows, self.ch]

    def bc(self, ref):
        """The chunk's (T, Np) block of B or C (B, Lp, Np)."""
        return ref.at[self.b, self.rows, :]

    def channels(self, ref, dtype):
        """The tile's (BD,) slice of a (Dp,) vector, in the row layout."""
        return mb.load(ref.at[self.ch], mb.layouts()[1], vectorized=False).astype(dtype)

    def tile(self, ref, *index, dtype=None):
        """The (BD, Np) tile of `ref[b, c, *index]` (A when no batch: `tile(A, batch=False)`)."""
        x = mb.load(ref.at[(self.b, self.c, *index, self.ch, slice(None))], mb.layouts()[0],
                    vectorized=False)
        return x if dtype is None else x.astype(dtype)

    def a_tile(self, ref, dtype):
        return mb.load(ref.at[self.ch, :], mb.layouts()[0], vectorized=False).astype(dtype)

    def put_tile(self, ref, x, *index):
        mb.store(ref.at[(self.b, self.c, *index, self.ch, slice(None))], x.astype(ref.dtype))

    def put_channels(self, ref, x):
        """A per-program (BD,) result into ref (B, nC, Dp)."""
        mb.store(ref.at[self.b, self.c, self.ch], x.astype(ref.dtype))

    def put_row(self, ref, r, x):
        """Row r (in the chunk) of a (B, Lp, Dp) output."""
        mb.store(ref.at[self.b, self.c * self.t + r, self.ch], x.astype(ref.dtype))

    def put_partial(self, ref, r, x):
        """Row r (in the chunk) of this channel tile's (Np,) partial sum into ref (Dp/BD, B, Lp,
        Np)."""
        mb.store(ref.at[self.j, self.b, self.c * self.t + r, :], x.astype(ref.dtype))

    def zeros_tile(self, n, dtype):
        return mb.layout_cast(jnp.zeros((self.bd, n), dtype), mb.layouts()[0])

    def zeros_channels(self, dtype):
        return mb.layout_cast(jnp.zeros((self.bd,), dtype), mb.layouts()[1])


class Block:
    """The shared-memory block of every pipelined operand (by name) at one pipeline step, and
    where its rows lie: memory block `m` of the chunk; `descending` when rows are visited from
    the block's end (a forward walk with `reverse`, or a backward walk without)."""

    def __init__(self, p: Program, refs: dict, m, first, descending: bool):
        self.p, self.refs, self.m, self.descending = p, refs, m, descending
        self.first = first  # the scan step of the block's first row in scan order
        self.rows = p.st.tiling.block_rows

    def local(self, r):
        return r - self.m * self.rows

    def row(self, name, r, dtype):
        """Row r (in the chunk) of operand `name`, in the row layout (BD,) or, for B and C,
        the column layout (Np,)."""
        layout = mb.layouts()[2 if name in ("B", "C") else 1]
        return mb.load(self.refs[name].at[self.local(r)], layout).astype(dtype)

    def state(self, name, k, dtype):
        """Saved state k (of the chunk, in scan order) of the scan-ordered operand `name`: a
        (BD, Np) tile. The block holds the states of the groups of rows it holds."""
        per_block = self.refs[name].shape[0]
        return mb.load(self.refs[name].at[k - self.first // self.rows * per_block],
                       mb.layouts()[0], vectorized=False).astype(dtype)


def walk(p: Program, operands: dict, body, carry, *, backwards: bool,
         states: dict | None = None):
    """Visits the chunk block by block, in scan order (`backwards=False`) or the reverse:
    `body(block, first, carry) -> carry`, `first` the scan step of the block's first row in
    scan order. Operands (name -> the program's (T, ·) view) arrive in shared memory, and so do
    `states` (name -> a (T/group, BD, Np) view of saved states in scan order, `Block.state`)."""
    st = p.st
    rows = st.tiling.block_rows
    n_blocks = p.t // rows
    descending = backwards != st.reverse
    states = states or {}

    def memory_block(k):
        return n_blocks - 1 - k if descending else k

    def scan_block(m):
        return n_blocks - 1 - m if st.reverse else m

    names = list(operands) + list(states)
    specs = [mb.block_spec((rows, v.shape[-1]), lambda k: (memory_block(k), 0))
             for v in operands.values()]
    specs += [mb.block_spec((v.shape[0] // n_blocks, *v.shape[1:]),
                            lambda k: (scan_block(memory_block(k)), 0, 0))
              for v in states.values()]

    def block_body(idx, *refs_and_carry):
        *refs, carry = refs_and_carry
        m = memory_block(idx[0])
        first = scan_block(m) * rows
        blk = Block(p, dict(zip(names, refs, strict=True)), m, first, descending)
        return body(blk, first, carry)

    return mb.pipeline(block_body, steps=n_blocks, in_specs=specs, carry=carry)(
        *operands.values(), *states.values())


def memory_row(st: ScanStatics, s):
    """The chunk row visited at scan step s (rows run backwards with `reverse`)."""
    return st.tiling.chunk - 1 - s if st.reverse else s


def _broadcast(pred, like):
    return jnp.broadcast_to(pred, like.shape)


def log1p(x):
    """log(1 + x) to an ulp or two without `log1p` (Mosaic GPU has no lowering for it): with
    w = 1 + x, `log(w)·x/(w - 1)` (Goldberg), x itself where w rounds to 1."""
    w = 1.0 + x
    return jnp.where(w == 1.0, x, jnp.log(w) * (x / (w - 1.0)))


def delta_row(p: Program, blk: Block, r, bias, dtype):
    """(δ, pre-activation x) of chunk row r: `softplus(delta + bias)` (threshold 20, as
    `scan_math.softplus`), δ = 0 on padding rows."""
    x = blk.row("dt", r, dtype) + bias
    d = x
    if p.st.delta_softplus:
        d = jnp.where(x > 20.0, x, log1p(jnp.exp(jnp.minimum(x, 20.0))))
    if p.valid is not None:
        d = jnp.where(_broadcast(r < p.valid, d), d, jnp.zeros_like(d))
    return d, x


def delta_grad_factor(p: Program, x, r):
    """dδ/d(delta) at pre-activation x, 0 on padding rows (`scan_common.delta_grad_factor`)."""
    f = jnp.ones_like(x)
    if p.st.delta_softplus:
        f = jnp.where(x > 20.0, f, jax.nn.sigmoid(x))
    if p.valid is not None:
        f = jnp.where(_broadcast(r < p.valid, f), f, jnp.zeros_like(f))
    return f


def by_channel(x, n):
    """A (BD,) row broadcast over the state axis: (BD, n)."""
    return lax.broadcast_in_dim(x, (x.shape[0], n), (0,))


def by_state(x, bd):
    """An (Np,) row broadcast over the channel axis: (bd, Np)."""
    return lax.broadcast_in_dim(x, (bd, x.shape[0]), (1,))


def state_step(h, d, u, b, a2):
    """`h ← exp(δ A) h + δ u B` on the (BD, N) tile; `a2 = A·log2(e)`. -> (h, exp(δ A))."""
    bd, n = h.shape
    decay = jnp.exp2(by_channel(d, n) * a2)
    return decay * h + by_channel(d * u, n) * by_state(b, bd), decay


def silu_parts(z):
    """(silu(z), d silu / dz) of a row."""
    s = jax.nn.sigmoid(z)
    return z * s, s * (1.0 + z * (1.0 - s))


def a_log2(p: Program, a_ref, dtype):
    """The tile's A, and A·log2(e) (exp2 of it is the decay)."""
    a = p.a_tile(a_ref, dtype)
    return a, a * LOG2E
