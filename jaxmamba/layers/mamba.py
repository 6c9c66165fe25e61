"""The Mamba block of mamba_ssm (`Mamba`, v1.2–2.0), channels-last, Flax NNX.

Attribute names equal mamba_ssm's module names (`in_proj`, `conv1d`, `x_proj`, `dt_proj`, `A_log`,
`D`, `out_proj`), so a PyTorch parameter path maps to a jaxmamba one by a rule: Linear `weight` is
`kernel.T`; `conv1d.weight (E, 1, W)` is `conv1d.kernel (W, E)` transposed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxmamba.layers.init import torch_linear, uniform
from jaxmamba.layers.options import DEFAULT_OPTIONS, MambaOptions
from jaxmamba.layers.remat import SCAN_OUTPUT
from jaxmamba.ops import causal_conv1d, selective_scan


class DepthwiseConv1d(nnx.Module):
    """mamba_ssm's `conv1d` (`nn.Conv1d(E, E, W, groups=E, padding=W-1)`), causal, on (B, L, E)."""

    def __init__(self, channels: int, width: int, *, use_bias: bool = True, rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(width)  # PyTorch default: fan_in = (in/groups) * W = W
        init = uniform(bound)
        self.kernel = nnx.Param(init(rngs.params(), (width, channels)))
        self.bias = nnx.Param(init(rngs.params(), (channels,))) if use_bias else None

    def __call__(self, x: jax.Array, *, reverse: bool = False) -> jax.Array:
        bias = None if self.bias is None else self.bias[...]
        return causal_conv1d(x, self.kernel[...], bias, activation="silu", reverse=reverse)


def dt_bias_init(key, dim: int, dt_min: float, dt_max: float, dt_init_floor: float) -> jax.Array:
    """Inverse softplus of `dt ~ exp(U[ln dt_min, ln dt_max])`, floored (as `Mamba.__init__`)."""
    dt = jnp.exp(jax.random.uniform(key, (dim,)) * (math.log(dt_max) - math.log(dt_min))
                 + math.log(dt_min))
    dt = jnp.maximum(dt, dt_init_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


#: `MambaOptions.mamba_precision` -> computation dtype of the block's projections, causal conv
#: and scan inputs (None: the input's, float32 in the networks).
COMPUTE_DTYPES = {"float32": None, "bf16": jnp.bfloat16}


class Mamba(nnx.Module):
    """mamba_ssm `Mamba(d_model, d_state, d_conv, expand)` with its default initialisation.

    `__call__(x (B, L, C), reverse=False) -> (B, L, C)`; `options` (`MambaOptions`) chooses the
    scan's implementation and the computation dtype. With `reverse=True` the causal conv looks
    forward and the scan runs from the last token, so `m(x, reverse=True) == flip(m(flip(x)))`
    without copying flips (what a backward direction needs).

    `options.mamba_precision="bf16"` is the reference's MultiSegMamba under fp16 autocast
    (TamingMambas' `MultiSegMamba.py` has no `autocast(enabled=False)`; mamba_ssm's
    `mamba_inner_fn` casts its weights to the autocast dtype): the in-, x-, dt- and
    out-projections run on bf16 operands (float32 accumulation, bf16 results), the causal conv
    takes and returns bf16 (float32 sums), and the scan gets bf16 `u, delta, B, C, z` with float32
    `A, D, delta_bias`, keeping its state and sums in float32 and returning bf16; the output is
    bf16. Parameters stay float32; the LayerNorms, heads and residual sums around the block
    (`jaxmamba.layers.blocks`) stay float32.
    """

    def __init__(self, d_model: int, *, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 0.1,
                 dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 options: MambaOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        d_inner = expand * d_model
        self.d_inner, self.d_state = d_inner, d_state
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.options = options
        dtype = COMPUTE_DTYPES[options.mamba_precision]
        self.in_proj = torch_linear(d_model, 2 * d_inner, use_bias=bias, rngs=rngs, dtype=dtype)
        self.conv1d = DepthwiseConv1d(d_inner, d_conv, use_bias=conv_bias, rngs=rngs)
        self.x_proj = torch_linear(d_inner, self.dt_rank + 2 * d_state, use_bias=False, rngs=rngs,
                                   dtype=dtype)
        self.dt_proj = torch_linear(self.dt_rank, d_inner, use_bias=True, rngs=rngs,
                                    weight_bound=self.dt_rank**-0.5)
        self.dt_proj.bias = nnx.Param(
            dt_bias_init(rngs.params(), d_inner, dt_min, dt_max, dt_init_floor))
        a = jnp.arange(1, d_state + 1, dtype=jnp.float32)
        # S4D-real: A = -(1..N) for every channel
        self.A_log = nnx.Param(jnp.log(jnp.broadcast_to(a[None, :], (d_inner, d_state))))
        self.D = nnx.Param(jnp.ones((d_inner,), jnp.float32))
        self.out_proj = torch_linear(d_inner, d_model, use_bias=bias, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, *, reverse: bool = False) -> jax.Array:
        r, n = self.dt_rank, self.d_state
        xs, z = jnp.split(self.in_proj(x), 2, axis=-1)  # (B, L, E) each
        xc = self.conv1d(xs, reverse=reverse)  # SiLU(causal conv), (B, L, E)
        x_dbl = self.x_proj(xc)  # (B, L, R + 2N)
        dt, b, c = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
        # (B, L, E) in x_dbl's dtype; the bias enters the scan as delta_bias
        dt = dt @ self.dt_proj.kernel[...].astype(dt.dtype)
        a = -jnp.exp(self.A_log[...].astype(jnp.float32))  # (E, N)
        y = selective_scan(xc, dt, a, b, c, D=self.D[...], z=z,
                           delta_bias=self.dt_proj.bias[...], delta_softplus=True,
                           reverse=reverse, implementation=self.options.scan_implementation)
        return self.out_proj(checkpoint_name(y, SCAN_OUTPUT))  # what remat="scan" keeps
