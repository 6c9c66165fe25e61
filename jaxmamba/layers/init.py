"""PyTorch default initialisers: fresh layers start from the reference's distributions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def uniform(bound: float):
    """`U(-bound, bound)`, the shape of PyTorch's `kaiming_uniform_(a=√5)` defaults."""

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_linear(in_features: int, out_features: int, *, use_bias: bool, rngs: nnx.Rngs,
                 weight_bound: float | None = None, dtype=None) -> nnx.Linear:
    """`nn.Linear`: weight and bias `U(-1/√in, 1/√in)`. Kernel is `(in, out)`, float32; `dtype`
    (None: the input's) is the computation dtype, to which input, kernel and bias are cast."""
    bound = 1.0 / math.sqrt(in_features)
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, rngs=rngs, param_dtype=jnp.float32,
        dtype=dtype,
        kernel_init=uniform(bound if weight_bound is None else weight_bound),
        bias_init=uniform(bound),
    )


def torch_layer_norm(dim: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    """`nn.LayerNorm(dim)`: eps 1e-5 (Flax defaults to 1e-6), weight 1, bias 0."""
    return nnx.LayerNorm(dim, epsilon=1e-5, rngs=rngs, param_dtype=jnp.float32)
