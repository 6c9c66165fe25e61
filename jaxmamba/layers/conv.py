"""Convolutional building blocks of the nnU-Net residual U-Net.

As dynamic-network-architectures' `ConvDropoutNormReLU`, `BasicBlockD`, `StackedResidualBlocks`
(`building_blocks/{simple_conv_blocks,residual}.py`), initialised by `InitWeights_He(1e-2)` and
`init_last_bn_before_add_to_0` (`initialization/weight_init.py`).

Channels-last throughout: volumes are `(B, S0, S1, S2, C)`. Attribute names equal the PyTorch
module names of dynamic-network-architectures 0.3.1 (`conv`, `norm`, `conv1`, `conv2`, `skip`,
`blocks`, `convs`), so that a parameter path maps to its state-dict name by a rule
(`jaxmamba.interop`). Parameters are float32; `dtype` is the computation dtype of convolutions
and norms (the precision policy of `jaxmamba.models.precision`).

On a CPU the 3D convolutions run as 2D ones (`depth_folded_conv3d`): XLA:CPU's 3D convolution
is several times slower than its 2D one, and than PyTorch's oneDNN; and the jitted steps that
hold them compile with `cpu_compiler_options`, which keeps the 2D ones on XLA's own
multi-threaded code rather than YNNPACK's. `docs/benchmarks.md` has
the numbers. Parameters, checkpoints and results are the same on every backend; on GPUs XLA's
own convolution runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib
from flax import nnx
from jax import lax
from jax.sharding import Mesh

from jaxmamba.ops.batch_parallel import SPATIAL_AXIS, axis_shards

#: Negative slope of nnU-Net's LeakyReLU and the `a` of its He initialisation (`InitWeights_He`).
LEAKY_SLOPE = 1e-2
#: InstanceNorm3d epsilon of PyTorch (Flax's norms default to 1e-6).
NORM_EPS = 1e-5


def he_normal(fan_in: int) -> nnx.Initializer:
    """kaiming_normal_(a=1e-2, mode="fan_in"): N(0, 2 / ((1 + a²) · fan_in)), untruncated."""
    std = math.sqrt(2.0 / (1.0 + LEAKY_SLOPE**2)) / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return std * jax.random.normal(key, shape, dtype)

    return init


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


def conv3d(cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1), *,
           bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Conv3d with PyTorch's symmetric padding `(k - 1) // 2` and nnU-Net's He init; on a CPU
    it runs as `depth_folded_conv3d`."""
    kernel, stride = tuple(kernel), tuple(stride)
    padding = [((k - 1) // 2, (k - 1) // 2) for k in kernel]
    return nnx.Conv(cin, cout, kernel, stride, padding=padding, use_bias=bias, dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=he_normal(cin * math.prod(kernel)),
                    bias_init=nnx.initializers.zeros, conv_general_dilated=conv_general_dilated,
                    rngs=rngs)


class InstanceNorm(nnx.Module):
    """InstanceNorm3d(eps=1e-5, affine=True): per sample and channel over the spatial axes.

    Statistics are computed in float32 whatever the input dtype; the output has `dtype`.
    `zero_init` starts weight and bias at 0 (nnU-Net's `init_last_bn_before_add_to_0`).
    """

    def __init__(self, channels: int, *, dtype=None, zero_init: bool = False):
        self.scale = nnx.Param(jnp.full((channels,), 0.0 if zero_init else 1.0, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        axes = tuple(range(1, x.ndim - 1))
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axes, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
        per_channel = (1,) * (x.ndim - 1) + (-1,)
        y = ((x32 - mean) * jax.lax.rsqrt(var + NORM_EPS) * self.scale[...].reshape(per_channel)
             + self.bias[...].reshape(per_channel))
        return y.astype(self.dtype or x.dtype)


class ConvNormAct(nnx.Module):
    """ConvDropoutNormReLU: Conv3d → InstanceNorm → LeakyReLU(0.01) (no dropout, no act if
    `act=False`). `(B, *S, cin) → (B, *S / stride, cout)`."""

    def __init__(self, cin: int, cout: int, kernel: Sequence[int],
                 stride: Sequence[int] = (1, 1, 1), *, act: bool = True, bias: bool = True,
                 zero_norm: bool = False, dtype=None, rngs: nnx.Rngs):
        self.conv = conv3d(cin, cout, kernel, stride, bias=bias, dtype=dtype, rngs=rngs)
        self.norm = InstanceNorm(cout, dtype=dtype, zero_init=zero_norm)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.remat(ConvNormAct._norm_act, prevent_cse=True)(self, self.conv(x))

    def _norm_act(self, x: jax.Array) -> jax.Array:
        """Norm and activation, rematerialised: the backward keeps only the conv output and
        recomputes the statistics and the float32 intermediates (3 float32 copies otherwise)."""
        x = self.norm(x)
        return jax.nn.leaky_relu(x, LEAKY_SLOPE) if self.act else x


class AvgPool(nnx.Module):
    """AvgPool3d(kernel=stride, stride=stride), the pooling of ResNet-D skips; no parameters."""

    def __init__(self, stride: Sequence[int]):
        self.stride = tuple(stride)

    def __call__(self, x: jax.Array) -> jax.Array:
        (b, *spatial, c), (s0, s1, s2) = x.shape, self.stride
        x = x.reshape(b, spatial[0] // s0, s0, spatial[1] // s1, s1, spatial[2] // s2, s2, c)
        return jnp.mean(x, axis=(2, 4, 6))


class BasicBlockD(nnx.Module):
    """`LReLU(IN(conv2(LReLU(IN(conv1_stride(x))))) + skip(x))` with a ResNet-D skip.

    `skip` is the PyTorch `nn.Sequential`: `[AvgPool]` if strided, then `[1×1×1 conv (no bias) +
    IN]` if the channels change; absent (identity) otherwise. conv2's norm starts at zero.
    """

    def __init__(self, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int], *,
                 dtype=None, rngs: nnx.Rngs):
        self.conv1 = ConvNormAct(cin, cout, kernel, stride, dtype=dtype, rngs=rngs)
        self.conv2 = ConvNormAct(cout, cout, kernel, act=False, zero_norm=True, dtype=dtype,
                                 rngs=rngs)
        skip: list[nnx.Module] = []
        if any(s != 1 for s in stride):
            skip.append(AvgPool(stride))
        if cin != cout:
            skip.append(ConvNormAct(cin, cout, (1, 1, 1), act=False, bias=False, dtype=dtype,
                                    rngs=rngs))
        self.skip = nnx.List(skip) if skip else None

    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        if self.skip is not None:
            for op in self.skip:
                residual = op(residual)
        out = self.conv2(self.conv1(x))
        return jax.nn.leaky_relu(out + residual.astype(out.dtype), LEAKY_SLOPE)


class StackedResidualBlocks(nnx.Module):
    """`n` BasicBlockD: the first `cin → cout` with the stride, the rest `cout → cout`."""

    def __init__(self, n: int, cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int],
                 *, dtype=None, rngs: nnx.Rngs):
        self.blocks = nnx.List([
            BasicBlockD(cin if i == 0 else cout, cout, kernel, stride if i == 0 else (1, 1, 1),
                        dtype=dtype, rngs=rngs) for i in range(n)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return x


class StackedConvBlocks(nnx.Module):
    """`n` ConvNormAct: the first `cin → cout` with the stride, the rest `cout → cout`."""

    def __init__(self, n: int, cin: int, cout: int, kernel: Sequence[int],
                 stride: Sequence[int] = (1, 1, 1), *, dtype=None, rngs: nnx.Rngs):
        self.convs = nnx.List([
            ConvNormAct(cin if i == 0 else cout, cout, kernel, stride if i == 0 else (1, 1, 1),
                        dtype=dtype, rngs=rngs) for i in range(n)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = conv(x)
        return x


class TransposedConv(nnx.Module):
    """ConvTranspose3d with kernel = stride, as an exact non-overlapping "pixel shuffle" einsum.

    `out[b, i·s + p, o] = Σ_c x[b, i, c] · kernel[p, c, o] + bias[o]` per axis.
    `kernel` is `(s0, s1, s2, cin, cout)`; PyTorch's weight is `(cin, cout, s0, s1, s2)`. He init
    uses PyTorch's fan-in of a transposed conv, `cout · prod(s)` (as `InitWeights_He`).
    """

    def __init__(self, cin: int, cout: int, stride: Sequence[int], *, dtype=None,
                 rngs: nnx.Rngs):
        self.stride = tuple(stride)
        init = he_normal(cout * math.prod(self.stride))
        self.kernel = nnx.Param(init(rngs.params(), (*self.stride, cin, cout)))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        b, d, h, w, _ = x.shape
        s0, s1, s2 = self.stride
        y = jnp.einsum("bdhwc,pqrco->bdphqwro", x.astype(dtype), self.kernel[...].astype(dtype))
        y = y.reshape(b, d * s0, h * s1, w * s2, -1)
        return y + self.bias[...].astype(dtype).reshape(1, 1, 1, 1, -1)
