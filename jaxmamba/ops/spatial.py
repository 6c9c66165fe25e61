"""Token-axis (spatial) parallelism: the selective scan and the causal conv on a sharded sequence.

When the ambient mesh (`jaxmamba.ops.batch_parallel.traced_under`) has an axis `spatial` of P > 1
devices and the sequence length L splits into P equal blocks, device i holds tokens
`[i·L/P, (i+1)·L/P)` and the ops below run as a `shard_map` over the mesh:

* `scan_over_tokens` (the recurrence `h_t = a_t ⊙ h_{t-1} + b_t` is affine, so a block acts on
  its start state as `h ↦ Ā h + h̄`):
  1. each device scans its block from a zero state, keeping only the final state `h̄ (B, D, N)`,
     and sums its `δ` to get the block's total decay `Ā = exp(A Σδ) (B, D, N)`;
  2. the P pairs `(Ā, h̄)` are all-gathered (a psum of 2·P·B·D·N floats) and each device composes
     the ones before it (after it, with `reverse=True`) with the true start state: its exclusive
     prefix, the state entering its block;
  3. each device rescans its block from that state. The rescan gives the exact outputs and final
     state with the underlying implementation's own memory bound (no `(B, L, D, N)` tensor, no
     separate correction term `C_t · exp(A Σ_{s≤t} δ_s) h0` to add), at twice the local scan's
     compute (step 1 needs no outputs, D or z).
  The backward is JAX's differentiation of this program: the implementations' own VJPs for the
  local scans, and the transpose of the gather's psum (a copy of the cotangent on every device,
  each keeping its own slot), which carries the adjoint of every block's start state back to the
  devices that produced it: the cross-device exclusive prefix of adjoints, in the opposite
  direction. The shard_map runs with `check_vma=False` (Pallas custom calls carry no
  replication types); the tests check every gradient against the unsharded op.
* `conv_over_tokens`: the causal conv of width W reads W-1 tokens before each token (after it,
  with `reverse=True`); device i receives that halo from device i-1 (i+1) by `ppermute` and the
  first (last) device receives zeros, which are the conv's padding.

With fewer tokens than devices, or a length that does not split evenly, `token_shards` is 1 and the
callers run the unsharded op (correct; XLA then gathers the sequence onto every device).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxmamba.ops.batch_parallel import axis_shards, batch_axis
from jaxmamba.ops.mesh import SPATIAL_AXIS
from jaxmamba.scan_math import compute_dtype, discretize_delta


def token_shards(length: int, min_block: int = 1) -> int:
    """P, the ambient `spatial` axis size, when L splits into P blocks of at least `min_block`
    tokens; 1 otherwise (run unsharded)."""
    n = axis_shards(SPATIAL_AXIS)
    if n == 1 or length % n or length // n < min_block:
        return 1
    return n


def split_volume(x: jax.Array) -> jax.Array:
    """`x (B, S0, ...)` constrained to B over `data` (when it splits) and S0 over `spatial`, so
    that XLA partitions what follows by blocks of S0 (a no-op without a `spatial` axis or when S0
    does not split). Flattened row-major, such a volume is a token sequence split in contiguous
    blocks, as `scan_over_tokens` wants."""
    n = axis_shards(SPATIAL_AXIS)
    if n == 1 or x.shape[1] % n:
        return x
    return lax.with_sharding_constraint(x, P(batch_axis(x.shape[0]), SPATIAL_AXIS))


def _gather(x, me, n: int):
    """Every device's `x` stacked (P, ...) on every device: a psum of one-hot slots (an all-gather
    that differentiates exactly under `check_vma=False`, which the Pallas custom calls need)."""
    return lax.psum(jnp.zeros((n, *x.shape), x.dtype).at[me].set(x), SPATIAL_AXIS)


def block_start_states(decay, final, h0, *, reverse: bool):
    """The state entering each block, and the state after the last one.

    decay, final: (P, B, D, N), block p acting as `h ↦ decay[p] ⊙ h + final[p]`; h0: (B, D, N),
    the state entering the first block (the last one with `reverse=True`). Returns
    `((P, B, D, N), (B, D, N))`. P is a small static number: a loop over it.
    """
    n = decay.shape[0]
    starts = [None] * n
    h = h0
    for p in (reversed(range(n)) if reverse else range(n)):
        starts[p] = h
        h = decay[p] * h + final[p]
    return jnp.stack(starts), h


def scan_over_tokens(fn: Callable, u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool,
                     *, reverse: bool, initial_state):
    """`fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse=, initial_state=)`, a
    local selective scan returning `(y, final state)`, on the token axis split over `spatial`.

    Call only when `token_shards(L) > 1`. Returns `(y (B, L, D), final state (B, D, N))`.
    """
    batch, _, dim = u.shape
    n_state, n_blocks = A.shape[1], axis_shards(SPATIAL_AXIS)
    dtype = compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    h0 = (jnp.zeros((batch, dim, n_state), dtype) if initial_state is None
          else initial_state.astype(dtype))
    data = batch_axis(batch)
    tokens, state, whole = P(data, SPATIAL_AXIS), P(data), P()

    def local(u, delta, A, B, C, D, z, delta_bias, h0):
        _, final = fn(u, delta, A, B, C, None, None, delta_bias, delta_softplus,
                      reverse=reverse, initial_state=None)
        total = discretize_delta(delta, delta_bias, delta_softplus, dtype).sum(1)  # (B, D)
        decay = jnp.exp(A.astype(dtype)[None] * total[..., None])  # (B, D, N)
        me = lax.axis_index(SPATIAL_AXIS)
        pairs = [_gather(x, me, n_blocks) for x in (decay, final.astype(dtype))]  # (P, B, D, N)
        starts, h_last = block_start_states(*pairs, h0, reverse=reverse)
        start = starts[me]
        y, _ = fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                  reverse=reverse, initial_state=start)
        return y, h_last

    in_specs = (tokens, tokens, whole, tokens, tokens, whole, tokens, whole, state)
    # every mesh axis manual (`data` too when the batch does not split): under a partly manual
    # shard_map JAX annotates every array-creating op with an open sharding, thousands in
    # MultiSegMamba's block, which XLA's partitioner then did not finish compiling (issue 17)
    mapped = jax.shard_map(local, in_specs=in_specs, out_specs=(tokens, state), check_vma=False)
    return mapped(u, delta, A, B, C, D, z, delta_bias, h0)


def conv_over_tokens(fn: Callable, x, weight, bias, *, activation, reverse: bool):
    """`fn(x, weight, bias, activation=, reverse=)`, a local causal conv of width W, on the token
    axis split over `spatial`, with a (W-1)-token halo from the neighbouring device.

    Call only when `token_shards(L, W - 1) > 1`.
    """
    n = axis_shards(SPATIAL_AXIS)
    halo = weight.shape[0] - 1
    tokens = P(batch_axis(x.shape[0]), SPATIAL_AXIS)
    if reverse:  # device i needs the first W-1 tokens of device i+1
        pairs = [(i + 1, i) for i in range(n - 1)]
    else:  # device i needs the last W-1 tokens of device i-1
        pairs = [(i, i + 1) for i in range(n - 1)]

    def local(x, weight, bias):
        length = x.shape[1]
        if halo == 0:
            return fn(x, weight, bias, activation=activation, reverse=reverse)
        if reverse:
            received = lax.ppermute(x[:, :halo], SPATIAL_AXIS, pairs)
            y = fn(jnp.concatenate([x, received], 1), weight, bias, activation=activation,
                   reverse=True)
            return y[:, :length]
        received = lax.ppermute(x[:, length - halo:], SPATIAL_AXIS, pairs)
        y = fn(jnp.concatenate([received, x], 1), weight, bias, activation=activation,
               reverse=False)
        return y[:, halo:]

    return jax.shard_map(local, in_specs=(tokens, P(), P()), out_specs=tokens)(x, weight, bias)
