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
    (paper_spec §2.2 step 2).
    With `reverse=True` the convolution looks at the current and *following* tokens, so that
    `causal_conv1d(x, reverse=True) == flip(causal_conv1d(flip(x)))` without copying flips.

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
    w = weight.astype(x.dtype)
    pad = ((0, 0), (0, width - 1) if reverse else (width - 1, 0), (0, 0))
    xp = jnp.pad(x, pad)
    y = jnp.zeros_like(x)
    for k in range(width):
        # Forward: tap k reads token t - (W-1) + k. Reverse: it reads token t + (W-1) - k.
        start = width - 1 - k if reverse else k
        y = y + xp[:, start:start + length] * w[k][None, None, :]
    if bias is not None:
        y = y + bias.astype(x.dtype)[None, None, :]
    return jax.nn.silu(y) if activation == "silu" else y
