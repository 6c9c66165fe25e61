"""Convolutional building blocks of the nnU-Net residual U-Net.

As dynamic-network-architectures' `ConvDropoutNormReLU`, `BasicBlockD`, `StackedResidualBlocks`
(`building_blocks/{simple_conv_blocks,residual}.py`), initialised by `InitWeights_He(1e-2)` and
`init_last_bn_before_add_to_0` (`initialization/weight_init.py`).

Channels-last throughout: volumes are `(B, S0, S1, S2, C)`. Attribute names equal the PyTorch
module names of dynamic-network-architectures 0.3.1 (`conv`, `norm`, `conv1`, `conv2`, `skip`,
`blocks`, `convs`), so that a parameter path maps to its state-dict name by a rule
(`jaxmamba.interop`). Parameters are float32; `dtype` is the computation dtype of convolutions
and norms (the precision policy of `jaxmamba.models.precision`). The convolutions run as
`jaxmamba.ops.conv3d` chooses per backend (depth-folded 2D ones on a CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmamba.ops.conv3d import conv_general_dilated

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


def conv3d(cin: int, cout: int, kernel: Sequence[int], stride: Sequence[int] = (1, 1, 1), *,
           bias: bool, dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """Conv3d with PyTorch's symmetric padding `(k - 1) // 2` and nnU-Net's He init; on a CPU
    it runs as `jaxmamba.ops.conv3d.depth_folded_conv3d`."""
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
