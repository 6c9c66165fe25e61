"""A network as the `apply_fn` of sliding-window prediction (no data or NIfTI imports, so GPU
benchmarks can use it without nibabel)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from jaxmamba.infer.sliding_window import ApplyFn
from jaxmamba.ops.batch_parallel import traced_under
from jaxmamba.ops.conv3d import cpu_compiler_options
from jaxmamba.ops.mesh import local_mesh, replicated
from jaxmamba.ops.spatial import split_volume


def network_apply_fn(model: nnx.Module, mesh: Mesh | None = None) -> ApplyFn:
    """A jitted `windows (n, *patch, C) -> logits (n, *patch, K)` of an NNX U-Net.

    Deep supervision is switched off (the full-resolution head only, as the reference predicts,
    `nnUNetPredictor`) and the network's state is replicated over `mesh` (default: this process's
    devices) so that windows sharded over its `data` axis run in parallel; with a `spatial` axis
    each window is split along S0 over it as well.
    """
    if hasattr(model, "set_deep_supervision"):
        model.set_deep_supervision(False)
    graphdef, state = nnx.split(model)
    mesh = local_mesh() if mesh is None else mesh
    state = jax.device_put(state, replicated(mesh))

    def forward(state, windows):
        out = nnx.merge(graphdef, state)(split_volume(windows))
        return out[0] if isinstance(out, tuple | list) else out

    forward = jax.jit(traced_under(mesh, forward),
                      compiler_options=cpu_compiler_options(mesh, gradients=False))

    return lambda windows: forward(state, windows)
