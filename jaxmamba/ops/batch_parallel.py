"""Batch parallelism for opaque kernels: a Pallas call runs on each device's share of the batch.

A `pallas_call` lowers to a custom call that XLA's SPMD partitioner cannot split: under a data-
parallel `jit` it would gather the whole batch onto every device and scan all of it there. The
callers that shard a batch over a mesh axis named `data` (training steps, sliding-window
prediction) trace their functions with that mesh as the ambient abstract mesh (`traced_under`);
ops that call kernels wrap them in `map_over_batch`, a `shard_map` over `data` that is a no-op
when no such mesh is in context or the batch does not split evenly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

BATCH_AXIS = "data"


def batch_shards() -> int:
    """Size of the ambient mesh's `data` axis (1 when tracing without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names:
        return 1
    return mesh.shape[BATCH_AXIS]


def map_over_batch(fn: Callable, batched: Sequence[bool], batch_size: int) -> Callable:
    """`fn(*args)` with the arguments flagged in `batched` (and every output) split on axis 0
    over the ambient `data` axis; unflagged arguments are replicated. Returns `fn` itself when
    there is nothing to split."""
    n = batch_shards()
    if n == 1 or batch_size % n:
        return fn
    specs = tuple(P(BATCH_AXIS) if b else P() for b in batched)
    return jax.shard_map(fn, in_specs=specs, out_specs=P(BATCH_AXIS), check_vma=False)


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the ambient abstract mesh, so ops inside it see the mesh."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped
