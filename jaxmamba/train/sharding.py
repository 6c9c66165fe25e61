"""Training's arrays on the mesh (`jaxmamba.ops.mesh`, spanning every process's devices): the
global batch sharded along `data` (and each sample's volume along S0 over `spatial`), assembled
from each process's local share (`global_batch`), and the train state replicated. On several
hosts, call `jaxmamba.distributed.initialize()` first.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmamba.ops.mesh import DATA_AXIS, replicated, volume_sharding


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
