"""Batch parallelism for opaque kernels: a Pallas call runs on each device's share of the batch.

A `pallas_call` lowers to a custom call that XLA's SPMD partitioner cannot split: under a data-
parallel `jit` it would gather the whole batch onto every device and scan all of it there. The
callers that shard a batch over a mesh axis named `data` (training steps, sliding-window
prediction) trace their functions with that mesh as the ambient abstract mesh (`traced_under`);
ops that call kernels wrap them in `map_over_batch`, a `shard_map` over `data` that is a no-op
when no such mesh is in context or the batch does not split evenly. A second axis named
`spatial` splits the token axis instead (`jaxmamba.ops.spatial`); `batch_axis` is what those
ops put on the batch axis of their specs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxmamba.ops.mesh import DATA_AXIS


def axis_shards(name: str) -> int:
    """Size of the ambient mesh's axis `name` (1 when tracing without a mesh or that axis)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]


def batch_shards() -> int:
    """Size of the ambient mesh's `data` axis (1 when tracing without one)."""
    return axis_shards(DATA_AXIS)


def batch_axis(batch_size: int) -> str | None:
    """`"data"` when a batch of `batch_size` splits evenly over the ambient `data` axis (of more
    than one device), else None (the batch is replicated)."""
    n = batch_shards()
    return DATA_AXIS if n > 1 and batch_size % n == 0 else None


def map_over_batch(fn: Callable, batched: Sequence[bool], batch_size: int) -> Callable:
    """`fn(*args)` with the arguments flagged in `batched` (and every output) split on axis 0
    over the ambient `data` axis; unflagged arguments are replicated. Returns `fn` itself when
    there is nothing to split."""
    if batch_axis(batch_size) is None:
        return fn
    specs = tuple(P(DATA_AXIS) if b else P() for b in batched)
    return jax.shard_map(fn, in_specs=specs, out_specs=P(DATA_AXIS), check_vma=False)


def traced_under(mesh: Mesh, fn: Callable) -> Callable:
    """`fn` traced with `mesh` as the ambient abstract mesh, so ops inside it see the mesh."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)

    return wrapped
