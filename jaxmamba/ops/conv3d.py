# The package's 3D convolution: XLA's on GPUs, depth-folded 2D on a CPU, and its compile options.
"""3D convolutions as each backend runs them fastest, and the compiler options of the programs
that hold them (a runtime concern of training, validation and prediction alike).

On a CPU the 3D convolutions run as 2D ones (`depth_folded_conv3d`): XLA:CPU's 3D convolution
is several times slower than its 2D one, and than PyTorch's oneDNN; and the jitted steps that
hold them compile with `cpu_compiler_options`, which keeps the 2D ones on XLA's own
multi-threaded code rather than YNNPACK's. `docs/benchmarks.md` has the numbers. Parameters,
checkpoints and results are the same on every backend; on GPUs XLA's own convolution runs.
`jaxmamba.layers.conv.conv3d` builds its `nnx.Conv`s with `conv_general_dilated`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib
from jax import lax
from jax.sharding import Mesh

from jaxmamba.ops.batch_parallel import axis_shards
from jaxmamba.ops.mesh import SPATIAL_AXIS

#: Dimension numbers of the package's 3D convolutions (channels-last), and of their 2D fold.
CONV3D_DIMS = ("NDHWC", "DHWIO", "NDHWC")
CONV2D_DIMS = ("NHWC", "HWIO", "NHWC")


def depth_folded_conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int],
                        padding: Sequence[tuple[int, int]], *, precision=None,
                        preferred_element_type=None) -> jax.Array:
    """A 3D convolution `(B, D, H, W, C) * (k0, k1, k2, C, O)` as one 2D convolution.

    The `k0` depth taps are stacked into the input channels: output slice `d` is the 2D
    convolution (`k1 × k2`, strides `s1, s2`) of `concat_i x_pad[:, d·s0 + i]` (channel
    `i·C + c`) with the kernel `(k1, k2, k0·C, O)`, all output slices in one call with depth
    folded into the batch. Equal to `lax.conv_general_dilated` with `CONV3D_DIMS`, these
    strides and this non-negative explicit padding, up to float rounding of the sums' order.
    """
    (b, d, _, _, c), (k0, k1, k2, _, o) = x.shape, kernel.shape
    (lo, hi), *plane_padding = padding
    x = jnp.pad(x, ((0, 0), (lo, hi), (0, 0), (0, 0), (0, 0)))
    depth = (d + lo + hi - k0) // strides[0] + 1
    taps = [lax.slice_in_dim(x, i, i + (depth - 1) * strides[0] + 1, strides[0], axis=1)
            for i in range(k0)]
    x = taps[0] if k0 == 1 else jnp.concatenate(taps, axis=-1)
    y = lax.conv_general_dilated(
        x.reshape(b * depth, *x.shape[2:]), jnp.moveaxis(kernel, 0, 2).reshape(k1, k2, k0 * c, o),
        tuple(strides[1:]), plane_padding, dimension_numbers=CONV2D_DIMS, precision=precision,
        preferred_element_type=preferred_element_type)
    return y.reshape(b, depth, *y.shape[1:])


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None, out_sharding=None):
    """`lax.conv_general_dilated`, but `depth_folded_conv3d` on a CPU for the package's 3D
    convolutions (`CONV3D_DIMS`, explicit non-negative padding, no dilation, no groups, not
    traced under a mesh with a `spatial` axis of more than one device).

    The backend is chosen when the computation is lowered (`lax.platform_dependent`): a
    function lowered for a GPU holds only XLA's convolution, one lowered for the CPU only the
    2D one. Passed to `nnx.Conv(conv_general_dilated=...)`; parameters do not change.
    """
    def xla(lhs, rhs):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision=precision,
            preferred_element_type=preferred_element_type, out_sharding=out_sharding)

    def cpu(lhs, rhs):
        return depth_folded_conv3d(lhs, rhs, window_strides, padding, precision=precision,
                                   preferred_element_type=preferred_element_type)

    foldable = (
        lhs.ndim == 5 and not isinstance(padding, str)
        and all(lo >= 0 and hi >= 0 for lo, hi in padding)
        and all(v is None or all(s == 1 for s in v) for v in (lhs_dilation, rhs_dilation))
        and feature_group_count == 1 and batch_group_count == 1 and out_sharding is None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        == lax.conv_dimension_numbers(lhs.shape, rhs.shape, CONV3D_DIMS)
        # on a `spatial` mesh the volume is split along S0: folding S0 into the batch would make
        # XLA gather it, where its own 3D convolution exchanges one-plane halos
        and axis_shards(SPATIAL_AXIS) == 1)
    if not foldable:
        return xla(lhs, rhs)
    # checkpointed: the backward keeps the operands (as XLA's conv does), not the stacked taps
    return jax.checkpoint(lambda lhs, rhs: lax.platform_dependent(
        lhs, rhs, cpu=cpu, default=xla))(lhs, rhs)


#: XLA compile option: XLA:CPU's YNNPACK fusion types without the convolutions. By default
#: XLA also hands YNNPACK 2D convolutions, so every `depth_folded_conv3d`, which it ran on about
#: one of two cores. (Adding `ELTWISE` fusions brings convolutions back in.)
NO_YNNPACK_CONVOLUTIONS = {"xla_cpu_experimental_ynn_fusion_type": ",".join(
    f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("INDIVIDUAL_DOT", "REDUCE"))}


#: From this jaxlib on, a forward pass alone (prediction, evaluation) is faster with XLA's defaults.
YNNPACK_FORWARD_FROM = (0, 12)


def cpu_compiler_options(mesh: Mesh, *, gradients: bool) -> dict[str, str] | None:
    """`jax.jit(compiler_options=...)` for a computation with this package's convolutions on
    `mesh`'s devices: `NO_YNNPACK_CONVOLUTIONS` on a CPU, None (XLA's defaults) elsewhere and,
    from `YNNPACK_FORWARD_FROM`, for a computation without `gradients`.

    Measured on 2 idle cores (Hippocampus PlainConvUNet, patch 40×56×40, float32,
    docs/benchmarks.md), XLA's defaults -> this: the gradient of 2 windows 14.1 -> 4.7 s with
    jaxlib 0.10.2 and 7.4 -> 4.0 s with 0.12.0; one window's forward 0.87 -> 0.62 s with 0.10.2,
    but 0.63 -> 0.73 s with 0.12.0.
    """
    if mesh.devices.flat[0].platform != "cpu":
        return None
    if not gradients and _jaxlib_version() >= YNNPACK_FORWARD_FROM:
        return None
    return dict(NO_YNNPACK_CONVOLUTIONS)


def _jaxlib_version() -> tuple[int, int]:
    return tuple(int(part) for part in jaxlib.__version__.split(".")[:2])
