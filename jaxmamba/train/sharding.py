"""Data and spatial parallelism as one program for 1..N devices and hosts (no `pmap`).

A 2-D mesh `(data, spatial)` spans the devices; the global batch is sharded along `data`, each
sample's volume along its slowest spatial axis S0 over `spatial` (default 1: data parallelism
only; see `jaxmamba.ops.spatial` and the README), and the parameters and
optimizer state are replicated. The mesh axis is `Auto` (the compiler propagates
shardings through the network), not `jax.make_mesh`'s default `Explicit`, so the model code needs
no sharding annotations. On several hosts, call `initialize_distributed()` first; each process
then feeds its local share of the batch (`global_batch`).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmamba.ops.batch_parallel import BATCH_AXIS, SPATIAL_AXIS

DATA_AXIS = BATCH_AXIS  # the axis that ops split kernels' batches over


def initialize_distributed() -> None:
    """`jax.distributed.initialize()` when launched as several processes; a no-op otherwise.

    Under SLURM (`srun`, `SLURM_NTASKS` > 1) JAX finds the coordinator itself. Elsewhere set
    `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID` per process.
    """
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        try:
            n, i = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
        except (KeyError, ValueError) as err:
            raise ValueError("JAX_COORDINATOR_ADDRESS is set: set JAX_NUM_PROCESSES and "
                             "JAX_PROCESS_ID (integers) for every process too") from err
        jax.distributed.initialize(num_processes=n, process_id=i)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()


def make_mesh(num_devices: int = -1, spatial: int = 1) -> Mesh:
    """A mesh `('data', 'spatial')` of `num_devices` x `spatial` devices (`num_devices=-1`: all
    devices of all processes, divided by `spatial`). Neighbouring devices share a sample."""
    available = jax.device_count()
    if spatial < 1 or available % spatial:
        divisors = [d for d in range(1, available + 1) if available % d == 0]
        raise ValueError(f"mesh.spatial = {spatial}: must divide the {available} device(s) of "
                         f"this machine; use one of {divisors}")
    n = available // spatial if num_devices == -1 else num_devices
    if not 1 <= n * spatial <= available:
        raise ValueError(f"mesh.data = {num_devices}: this machine has {available} device(s) "
                         f"and mesh.spatial = {spatial}; use -1 for all of them or a number "
                         f"from 1 to {available // spatial}")
    if n * spatial != available and jax.process_count() > 1:
        raise ValueError(f"mesh.data = {num_devices}: with {jax.process_count()} processes the "
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


def local_batch_size(batch_size: int) -> int:
    """The share of the global batch that this process loads."""
    return batch_size // jax.process_count()


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
