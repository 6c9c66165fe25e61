"""Data and spatial parallelism as one program for 1..N devices and hosts (README "Training"; no
`pmap`).

A 2-D mesh `(data, spatial)` spans the devices; the global batch is sharded along `data`, each
sample's volume along its slowest spatial axis S0 over `spatial` (default 1: data parallelism
only; see `jaxmamba.ops.spatial` and the README), and the parameters and
optimizer state are replicated. The mesh axis is `Auto` (the compiler propagates
shardings through the network), not `jax.make_mesh`'s default `Explicit`, so the model code needs
no sharding annotations. On several hosts, call `jaxmamba.distributed.initialize()` first; each
process then feeds its local share of the batch (`global_batch`).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmamba.ops.batch_parallel import BATCH_AXIS, SPATIAL_AXIS
from jaxmamba.ops.spatial import MeshError, check_spatial_divides

DATA_AXIS = BATCH_AXIS  # the axis that ops split kernels' batches over


def make_mesh(num_devices: int = -1, spatial: int = 1) -> Mesh:
    """A mesh `('data', 'spatial')` of `num_devices` x `spatial` devices (`num_devices=-1`: all
    devices of all processes, divided by `spatial`). Neighbouring devices share a sample, and
    with several processes they belong to one process (`jax.devices()` lists them process by
    process), whose batch share therefore holds whole samples."""
    available = jax.device_count()
    check_spatial_divides(spatial, available, "mesh.spatial")
    if jax.process_count() > 1 and jax.local_device_count() % spatial:
        raise MeshError(f"mesh.spatial = {spatial}: a sample's devices must belong to one "
                        f"process, and each process has {jax.local_device_count()} device(s); "
                        f"use a divisor of {jax.local_device_count()}")
    n = available // spatial if num_devices == -1 else num_devices
    if not 1 <= n * spatial <= available:
        raise MeshError(f"mesh.data = {num_devices}: this machine has {available} device(s) "
                        f"and mesh.spatial = {spatial}; use -1 for all of them or a number "
                        f"from 1 to {available // spatial}")
    if n * spatial != available and jax.process_count() > 1:
        raise MeshError(f"mesh.data = {num_devices}: with {jax.process_count()} processes the "
                        f"mesh must span all {available} devices (mesh.data=-1)")
    return jax.make_mesh((n, spatial), (DATA_AXIS, SPATIAL_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=jax.devices()[:n * spatial])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, the rest replicated."""
    return NamedSharding(mesh, P(DATA_AXIS))


def volume_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """A batch of volumes `(B, S0, ...)`: B over `data`, S0 over `spatial` when it splits evenly
    (`batch_sharding` otherwise)."""
    n = mesh.shape.get(SPATIAL_AXIS, 1)
    if n > 1 and len(shape) > 1 and shape[1] % n == 0:
        return NamedSharding(mesh, P(DATA_AXIS, SPATIAL_AXIS))
    return batch_sharding(mesh)


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
    whose leading axis is the local batch); volumes are split along S0 over `spatial` too."""
    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(volume_sharding(mesh, x.shape), x)
    return jax.tree.map(put, local)


def replicate(tree, mesh: Mesh):
    """Put a pytree on every device of the mesh (parameters, optimizer state, RNG)."""
    return jax.device_put(tree, replicated(mesh))
