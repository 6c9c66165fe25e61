"""Tile sizes of the Pallas selective-scan kernels, chosen per shape (README.md beside this file).

A program of every kernel owns one chunk of `chunk` tokens of one batch element and `block_d`
channels; it keeps a `(block_d, N)` float32 state in registers and walks its chunk row by row. The
backward's gradient kernel replays `sub_chunk` steps at a time and holds all of their states in
registers; the adjoint kernel saves the start state of every `state_stride`-th sub-chunk, and the
gradient kernel recomputes the others from the saved one. So `sub_chunk` trades registers for
replay length and `state_stride` trades replay for the size of that buffer,
`(B, L/(sub_chunk·state_stride), D, N)`.
"""

from __future__ import annotations

import dataclasses

#: Programs wanted per launch: an H100 has 132 SMs and runs several small programs on each.
MIN_PROGRAMS = 2048
#: State elements per thread in the forward kernels (measured on an H100: BD=64 and 2 warps at
#: N=16 beat 4 warps; the per-channel work is replicated across the lanes of a channel).
FWD_ELEMENTS_PER_THREAD = 16
#: Register budget of the gradient kernel's replayed states, fp32 words per thread. Measured on
#: an H100 (docs/benchmarks.md): at (2, 262144, 64, 16) the gradient kernel took 3.2 ms with one
#: warp per (32, 16) tile and 8 replayed steps, 6.4 ms with 4 warps and 16 steps; at N ≥ 32 a
#: single channel tile per program (more warps) beat 16-channel one-warp tiles by ~2x, whose
#: partial dB/dC buffers grow with D/16.
BWD_STATE_WORDS = 96
#: Sub-chunks per saved backward state: 2 halves the buffer (3.6 -> 1.8 GB at Synapse stage 0)
#: for half a replayed step more per row in the gradient kernel.
STATE_STRIDE = 2


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class ScanTiling:
    """Static tile sizes (all powers of two; `chunk` a multiple of `sub_chunk·state_stride`)."""

    chunk: int
    block_d: int
    fwd_warps: int
    bwd_block_d: int
    sub_chunk: int
    bwd_warps: int
    state_stride: int = 1

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"ScanTiling.{f.name}={v}: expected a power of two")
        if self.chunk % (self.sub_chunk * self.state_stride):
            raise ValueError(f"ScanTiling: chunk={self.chunk} is not a multiple of "
                             f"sub_chunk={self.sub_chunk} x state_stride={self.state_stride}")

    @property
    def saved_states(self) -> int:
        """Backward states saved per chunk (every `state_stride`-th sub-chunk's start)."""
        return self.chunk // (self.sub_chunk * self.state_stride)


def padded_state(n: int) -> int:
    """N rounded up to a power of two (Triton tiles), at least 8."""
    return max(8, next_pow2(n))


def default_tiling(batch: int, length: int, dim: int, state: int) -> ScanTiling:
    """The tiling for `(B, L, D, N)`.

    * `block_d`: 64 channels up to N=32, then `2048 // N` (a (BD, N) tile of ≤ 2048 state
      elements), never more than D rounded up, at least 16.
    * `chunk`: the largest of 256, 128, ..., 16 that still gives `MIN_PROGRAMS` programs, capped
      at L rounded up (fewer, longer chunks make the scan over chunks and its buffers cheaper).
    * warps: `FWD_ELEMENTS_PER_THREAD` state elements per thread forward. Backward: up to N=16
      one warp per 32 channels, 8 replayed steps; beyond, the forward's channel tile with warps
      and `sub_chunk` such that the replayed states fit `BWD_STATE_WORDS` per thread.
    * `state_stride`: `STATE_STRIDE` where the chunk holds that many sub-chunks.
    """
    n = padded_state(state)
    block_d = max(16, min(64 if n <= 32 else 2048 // n, next_pow2(dim)))
    n_d = -(-dim // block_d)
    chunk = 256
    while chunk > 16 and batch * n_d * -(-length // chunk) < MIN_PROGRAMS:
        chunk //= 2
    chunk = max(8, min(chunk, next_pow2(length)))
    fwd_warps = min(8, max(1, block_d * n // (32 * FWD_ELEMENTS_PER_THREAD)))
    if n <= 16:  # one warp per (32, N) tile: no barrier in the per-step reductions
        bwd_block_d, bwd_warps, sub_chunk = min(32, block_d), 1, min(8, chunk)
        return ScanTiling(chunk, block_d, fwd_warps, bwd_block_d, sub_chunk, bwd_warps,
                          _stride(chunk, sub_chunk))
    # one channel tile for the whole block (dB, dC partial sums cost one (B, L, N) buffer per
    # tile), warps and sub-chunk such that the replayed states fit BWD_STATE_WORDS per thread
    tile = block_d * n
    sub_chunk = min(16, chunk)
    bwd_warps = min(8, max(1, next_pow2(-(-sub_chunk * tile // (32 * BWD_STATE_WORDS)))))
    while sub_chunk > 4 and sub_chunk * tile // (32 * bwd_warps) > BWD_STATE_WORDS:
        sub_chunk //= 2
    return ScanTiling(chunk, block_d, fwd_warps, block_d, sub_chunk, bwd_warps,
                      _stride(chunk, sub_chunk))


def _stride(chunk: int, sub_chunk: int) -> int:
    return max(1, min(STATE_STRIDE, chunk // sub_chunk))
