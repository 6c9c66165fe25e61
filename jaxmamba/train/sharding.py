"""Data parallelism as one program for 1..N devices and hosts (README "Training"; no `pmap`).

A 1-D mesh with a `data` axis spans the devices; the global batch is sharded along it and the
parameters and optimizer state are replicated. The mesh axis is `Auto` (the compiler propagates
shardings through the network), not `jax.make_mesh`'s default `Explicit`, so the model code needs
no sharding annotations. On several hosts, call `jaxmamba.distributed.initialize()` first; each
process then feeds its local share of the batch (`global_batch`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmamba.ops.batch_parallel import BATCH_AXIS

DATA_AXIS = BATCH_AXIS  # the axis that ops split kernels' batches over


def make_mesh(num_devices: int = -1) -> Mesh:
    """A mesh `('data',)` over `num_devices` devices (-1: all devices of all processes)."""
    available = jax.device_count()
    n = available if num_devices == -1 else num_devices
    if not 1 <= n <= available:
        raise ValueError(f"mesh.data = {num_devices}: this machine has {available} device(s); "
                         f"use -1 for all of them or a number from 1 to {available}")
    if n != available and jax.process_count() > 1:
        raise ValueError(f"mesh.data = {num_devices}: with {jax.process_count()} processes the "
                         f"mesh must span all {available} devices (mesh.data=-1)")
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over the devices and the processes."""
    n = mesh.shape[DATA_AXIS]
    if batch_size % n:
        lo, hi = batch_size // n * n, (batch_size // n + 1) * n
        options = f"{lo} or {hi}" if lo else f"{hi}"
        raise ValueError(f"batch size {batch_size} is not divisible by the {n} devices of the "
                         f"data mesh: set data.plan_overrides.batch_size={options}, or use fewer "
                         f"devices (mesh.data=...)")
    if batch_size % jax.process_count():
        raise ValueError(f"batch size {batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")


def global_batch(local: dict, mesh: Mesh):
    """Assemble a sharded global batch from this process's numpy batch (any pytree of arrays
    whose leading axis is the local batch)."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def replicate(tree, mesh: Mesh):
    """Put a pytree on every device of the mesh (parameters, optimizer state, RNG)."""
    return jax.device_put(tree, replicated(mesh))
