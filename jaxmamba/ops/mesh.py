# The device mesh: its axis names, the one builder, its checks and the shardings placed on it.
"""One program for 1..N devices and hosts (README "Training"; no `pmap`): the mesh it runs on.

A 2-D mesh `(data, spatial)` spans the devices: a batch is split along `data`, each sample's
volume along its slowest spatial axis S0 over `spatial` (default 1: data parallelism only; see
`jaxmamba.ops.spatial` and the README), and parameters are replicated. The axes are `Auto` (the
compiler propagates shardings through the network), not `jax.make_mesh`'s default `Explicit`, so
the model code needs no sharding annotations. Training spans every device of every process
(`make_mesh`); prediction spans this process's devices (`local_mesh`: with several processes
each predicts its own cases). `MeshError`s are raised before anything compiles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmamba.errors import UserError

#: The batch axis (training batches, prediction windows); ops split kernels' batches over it.
DATA_AXIS = "data"
#: The axis over which each sample's volume (its token sequence) is split.
SPATIAL_AXIS = "spatial"


class MeshError(UserError, ValueError):
    """A `spatial` size that does not divide the devices or the patch (raised before compiling)."""


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_spatial_divides(n: int, devices: int, name: str) -> None:
    """`n` devices per sample (`name`: the option that set it) must divide the `devices`."""
    if n < 1 or devices % n:
        raise MeshError(f"{name} = {n}: must divide the {devices} device(s); use one of "
                        f"{_divisors(devices)}")


def check_patch_splits(patch_size, strides, n: int, *, devices: int, name: str = "mesh.spatial",
                       patch_key: str | None = "data.plan_overrides.patch_size") -> None:
    """With `n` devices per sample (`name`: the option that set it), every stage's S0 must split
    evenly over them: the patch's S0 over the network's total stride on S0 (`strides`: the plan's,
    one per stage) must be a multiple of `n`. Otherwise raises `MeshError` naming the nearest
    valid patch S0 (settable through `patch_key`, None when the patch is fixed, as a trained
    run's) and the valid `n` among the divisors of `devices`."""
    s0 = int(patch_size[0])
    stride = math.prod(int(s[0]) for s in strides)
    if n == 1 or s0 % (stride * n) == 0:
        return
    options = [d for d in _divisors(devices) if s0 % (stride * d) == 0]
    message = (f"{name} = {n} does not split the patch {[int(p) for p in patch_size]}: its S0 "
               f"over the network's total stride {stride} on S0 is {s0 / stride:g} at the "
               f"deepest stage, not a multiple of {n}. Use {name} = one of {options}")
    if patch_key is not None:
        step = stride * n
        lo, hi = s0 // step * step, (s0 // step + 1) * step
        nearest = hi if not lo or hi - s0 <= s0 - lo else lo
        rest = ", ".join(str(int(p)) for p in patch_size[1:])
        message += (f", or a patch S0 of {f'{lo} or {hi}' if lo else hi} (e.g. "
                    f"{patch_key}=[{nearest}, {rest}])")
    raise MeshError(message)


def make_mesh(data: int = -1, spatial: int = 1, *,
              devices: Sequence[jax.Device] | None = None,
              spatial_option: str = "mesh.spatial") -> Mesh:
    """A mesh `(data, spatial)` of `data` x `spatial` devices, the first of `devices` (default:
    every device of every process; `data=-1`: all of them, divided by `spatial`).
    `spatial_option` is the option an error names (`mesh.spatial`, `--spatial`).

    Neighbouring devices share a sample, and across processes they belong to one process
    (`jax.devices()` lists them process by process), whose batch share therefore holds whole
    samples."""
    spanning = devices is None  # every process's devices: one program over all processes
    devices = list(jax.devices() if devices is None else devices)
    available = len(devices)
    check_spatial_divides(spatial, available, spatial_option)
    if spanning and jax.process_count() > 1 and jax.local_device_count() % spatial:
        raise MeshError(f"{spatial_option} = {spatial}: a sample's devices must belong to one "
                        f"process, and each process has {jax.local_device_count()} device(s); "
                        f"use a divisor of {jax.local_device_count()}")
    n = available // spatial if data == -1 else data
    if not 1 <= n * spatial <= available:
        raise MeshError(f"mesh.data = {data}: this machine has {available} device(s) "
                        f"and {spatial_option} = {spatial}; use -1 for all of them or a number "
                        f"from 1 to {available // spatial}")
    if spanning and n * spatial != available and jax.process_count() > 1:
        raise MeshError(f"mesh.data = {data}: with {jax.process_count()} processes the "
                        f"mesh must span all {available} devices (mesh.data=-1)")
    return jax.make_mesh((n, spatial), (DATA_AXIS, SPATIAL_AXIS), axis_types=(AxisType.Auto,) * 2,
                         devices=devices[:n * spatial])


def local_mesh(spatial: int = 1) -> Mesh:
    """This process's devices as a mesh (`--spatial`: devices per window): where prediction
    runs, each process on its own cases."""
    return make_mesh(-1, spatial, devices=jax.local_devices(), spatial_option="--spatial")


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state)."""
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
