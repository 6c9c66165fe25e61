"""The Mamba blocks of TamingMambas, on tokens or channels-last volumes.

Mirrors `tamingmambas/nnunetv2/nets/{SegMamba,PanSegMamba,MultiSegMamba}.py`: `MambaTrans`,
`PanMambaTrans` (the paper's bidirectional block), `MultiMambaTrans` and `MambaLayer`. Attribute
names equal the reference's module names so parameter paths map one to one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmamba.layers.init import torch_layer_norm, torch_linear
from jaxmamba.layers.mamba import Mamba
from jaxmamba.layers.options import DEFAULT_OPTIONS, MambaOptions
from jaxmamba.layers.remat import rematerialised
from jaxmamba.ops.spatial import split_volume

#: MultiSegMamba's axis orders: `itertools.permutations([2, 3, 4])` items 0, 1, 2, 4 of the
#: reference's NCDHW tensor, written here for the spatial axes 1, 2, 3 of (B, S0, S1, S2, C).
MULTI_AXIS_ORDERS = ((1, 2, 3), (1, 3, 2), (2, 1, 3), (3, 1, 2))


def d_state_for(channels: int, cap: int) -> int:
    """The reference's `d_state = min(C, cap)`: cap 256 for Seg/Bi/Skip, 64 for MultiSegMamba."""
    return min(channels, cap)


class MambaTrans(nnx.Module):
    """Pre-LN block: `x += Mamba(LN1(x)); x += head(LN2(x))`, on tokens (B, L, C)."""

    def __init__(self, dim: int, *, d_state: int | None = None,
                 options: MambaOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.norm1 = torch_layer_norm(dim, rngs=rngs)
        self.mamba = Mamba(dim, d_state=d_state or d_state_for(dim, 256), d_conv=4, expand=2,
                           options=options, rngs=rngs)
        self.norm2 = torch_layer_norm(dim, rngs=rngs)
        self.head = torch_linear(dim, dim, use_bias=True, rngs=rngs)

    def __call__(self, x: jax.Array, *, reverse: bool = False) -> jax.Array:
        x = self.mamba(self.norm1(x), reverse=reverse) + x
        return self.head(self.norm2(x)) + x


class PanMambaTrans(nnx.Module):
    """Bidirectional block (BiSegMamba): `LN(fwd(x) + flip(bwd(flip(x))))` with independent weights.

    The backward branch runs with `reverse=True` instead of flipping copies of the sequence.
    """

    def __init__(self, dim: int, *, d_state: int | None = None,
                 options: MambaOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        kw = dict(d_state=d_state, options=options, rngs=rngs)
        self.fwd_mamba = MambaTrans(dim, **kw)
        self.bwd_mamba = MambaTrans(dim, **kw)
        self.norm = torch_layer_norm(dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.fwd_mamba(x) + self.bwd_mamba(x, reverse=True))


def _tokens(x: jax.Array) -> jax.Array:
    """(B, S0, S1, S2, C) -> (B, S0·S1·S2, C), row-major (S2 fastest) as the reference's reshape."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class MultiMambaTrans(nnx.Module):
    """MultiSegMamba's block: the mean over 4 axis orders of a `PanMambaTrans` scan each.

    Input and output (B, S0, S1, S2, C); runs in float32, its Mamba blocks in
    `options.mamba_precision` (the reference runs them under fp16 autocast: "bf16" is the
    closest, `jaxmamba.layers.mamba.Mamba`). No outer LayerNorm (TamingMambas' MultiSegMamba.py).
    `options.remat` is what the backward keeps (`jaxmamba.layers.remat`); the transposed volumes are
    recomputed from the input, one per axis order, shared by its forward and reverse scans.
    Under a `spatial` mesh axis each permuted volume is resharded (an all-to-all) along its new
    slowest axis, so that every order's tokens are contiguous blocks per device, and back.
    """

    def __init__(self, dim: int, *, d_state: int | None = None,
                 options: MambaOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.options = options
        self.mambas = nnx.List([
            PanMambaTrans(dim, d_state=d_state or d_state_for(dim, 64), options=options,
                          rngs=rngs)
            for _ in MULTI_AXIS_ORDERS
        ])

    def __call__(self, x: jax.Array) -> jax.Array:
        return rematerialised(MultiMambaTrans._forward, self.options.remat)(self, x)

    def _forward(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        outs = []
        for order, block in zip(MULTI_AXIS_ORDERS, self.mambas, strict=True):
            perm = (0, *order, 4)
            xp = split_volume(jnp.transpose(xf, perm))  # axes in scan order, (B, Sa, Sb, Sc, C)
            y = block(_tokens(xp)).reshape(xp.shape)
            outs.append(split_volume(jnp.transpose(y, tuple(int(i) for i in np.argsort(perm)))))
        return (sum(outs) / len(outs)).astype(x.dtype)


class MambaLayer(nnx.Module):
    """`Block(LN(tokens))` on a volume (B, S0, S1, S2, C), no residual (SegMamba.py `MambaLayer`).

    The block is `MambaTrans` (SegMamba) or `PanMambaTrans` (`bidirectional=True`: BiSegMamba,
    SegMambaSkip). It computes in float32 whatever the input dtype, as the reference's
    `autocast(enabled=False)` (its Mamba blocks in `options.mamba_precision`, "float32" by
    default as the reference), and returns the input's dtype. `options.remat` is what the
    backward keeps (`jaxmamba.layers.remat`).
    """

    def __init__(self, dim: int, *, bidirectional: bool, d_state: int | None = None,
                 options: MambaOptions = DEFAULT_OPTIONS, rngs: nnx.Rngs):
        self.options = options
        self.norm = torch_layer_norm(dim, rngs=rngs)
        block = PanMambaTrans if bidirectional else MambaTrans
        self.mamba = block(dim, d_state=d_state, options=options, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return rematerialised(MambaLayer._forward, self.options.remat)(self, x)

    def _forward(self, x: jax.Array) -> jax.Array:
        y = self.mamba(self.norm(_tokens(x.astype(jnp.float32))))
        return y.reshape(x.shape).astype(x.dtype)
