"""Depthwise causal 1-D convolution over tokens, as mamba_ssm's `conv1d(padding=W-1)[..., :L]`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxmamba.ops.spatial import conv_over_tokens, token_shards


def causal_conv1d(
    x: jax.Array, weight: jax.Array, bias: jax.Array | None = None, *,
    activation: str | None = None, reverse: bool = False,
) -> jax.Array:
    """`y[t, d] = bias[d] + Σ_k weight[k, d] · x[t - (W-1) + k, d]`, zeros before the first token.

    Cross-correlation as PyTorch: `weight[W-1]` multiplies the current token
    (mamba_ssm `Mamba.forward`: `conv1d(x)[..., :L]`).
    With `reverse=True` the convolution looks at the current and *following* tokens, so that
    `causal_conv1d(x, reverse=True) == flip(causal_conv1d(flip(x)))` without copying flips.

    Products and sums are float32 for bf16/fp16 inputs (as mamba_ssm's `causal_conv1d` kernel
    computes in float32 whatever its input dtype); the output has x's dtype.

    Under a mesh with a `spatial` axis the token axis is split over it, with a (W-1)-token halo
    exchanged between neighbouring devices (`jaxmamba.ops.spatial.conv_over_tokens`).

    Args:
      x: (B, L, D). weight: (W, D) (PyTorch's `conv1d.weight (D, 1, W)` is `weight[:, 0, :].T`).
      bias: (D,) or None. activation: None or "silu".
    """
    if x.ndim != 3 or weight.ndim != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"causal_conv1d: x has shape {x.shape} and weight {weight.shape}; "
            f"expected x (batch, length, dim) and weight (width, dim={x.shape[-1]})"
        )
    if activation not in (None, "silu"):
        raise ValueError(f"causal_conv1d: activation={activation!r}, expected None or 'silu'")
    if token_shards(x.shape[1], weight.shape[0] - 1) > 1:
        return conv_over_tokens(_local_conv, x, weight, bias, activation=activation,
                                reverse=reverse)
    return _local_conv(x, weight, bias, activation=activation, reverse=reverse)


def _local_conv(x, weight, bias, *, activation, reverse):
    width, length = weight.shape[0], x.shape[1]
    dtype = jnp.promote_types(x.dtype, jnp.float32)  # float32 sums for bf16 / fp16 inputs
    w = weight.astype(dtype)
    pad = ((0, 0), (0, width - 1) if reverse else (width - 1, 0), (0, 0))
    xp = jnp.pad(x, pad)
    y = jnp.zeros(x.shape, dtype)
    for k in range(width):
        # Forward: tap k reads token t - (W-1) + k. Reverse: it reads token t + (W-1) - k.
        start = width - 1 - k if reverse else k
        y = y + xp[:, start:start + length].astype(dtype) * w[k][None, None, :]
    if bias is not None:
        y = y + bias.astype(dtype)[None, None, :]
    return (jax.nn.silu(y) if activation == "silu" else y).astype(x.dtype)
