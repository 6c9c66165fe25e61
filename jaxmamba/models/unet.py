"""The two encoders, the two decoders and the U-Net that joins them.

As TamingMambas' `ResidualMambaEncoder` and `UNetResDecoder` (`tamingmambas/nnunetv2/nets/`) and
dynamic-network-architectures' `ResidualEncoderUNet` (plain-conv decoder).

Channels-last: input `(B, S0, S1, S2, C_in)`, outputs `(B, *S / scale, num_classes)` logits in
float32. Attribute names follow the PyTorch state dict (`encoder.stem.convs.0`,
`encoder.stages.s.blocks.b`, `encoder.mamba_layers.s`, `decoder.stages.j`,
`decoder.transpconvs.j`, `decoder.seg_layers.j`; the plain encoder's `encoder.stages.s.0.convs.i`);
the reference's `decoder.encoder` is the same module as `encoder`, so it has no attribute here
(`jaxmamba.interop` writes the copy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmamba.layers.conv import (
    StackedConvBlocks,
    StackedResidualBlocks,
    TransposedConv,
    conv3d,
)

#: Builds the Mamba module of one encoder stage from its channel count (or None: no module).
MambaFactory = Callable[[int], nnx.Module]


class ResidualEncoder(nnx.Module):
    """Stem, then per stage `StackedResidualBlocks` and (Mamba variants) its Mamba module.

    `__call__(x) -> skips`, one per stage, the bottleneck last. With `mamba_on_skips_only`
    (SegMambaSkip) the Mamba output goes to the skip only and the next stage gets the conv
    output; otherwise the Mamba output replaces the stage features (TamingMambas `nets/`).
    """

    def __init__(self, in_channels: int, features: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_blocks: Sequence[int], *, mamba: MambaFactory | None = None,
                 mamba_on_skips_only: bool = False, dtype=None, rngs: nnx.Rngs):
        self.stem = StackedConvBlocks(1, in_channels, features[0], kernel_sizes[0], dtype=dtype,
                                      rngs=rngs)
        cin, stages = features[0], []
        for c, k, s, n in zip(features, kernel_sizes, strides, n_blocks, strict=True):
            stages.append(StackedResidualBlocks(n, cin, c, k, s, dtype=dtype, rngs=rngs))
            cin = c
        self.stages = nnx.List(stages)
        self.mamba_layers = nnx.List([mamba(c) for c in features]) if mamba else None
        self.mamba_on_skips_only = mamba_on_skips_only

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        x = self.stem(x)
        skips = []
        for s, stage in enumerate(self.stages):
            x = stage(x)
            if self.mamba_layers is None:
                skips.append(x)
                continue
            y = self.mamba_layers[s](x)
            skips.append(y)
            if not self.mamba_on_skips_only:
                x = y
        return skips


class PlainConvEncoder(nnx.Module):
    """dynamic-network-architectures' `PlainConvEncoder` (pool="conv"), the encoder of
    `PlainConvUNet`: per stage `StackedConvBlocks`, the first conv strided; no stem.

    `stages[s]` is a one-element list, as DNA wraps each stage in an `nn.Sequential` (hence the
    state-dict names `encoder.stages.s.0.convs.i`). `__call__(x) -> skips`, the bottleneck last.
    """

    def __init__(self, in_channels: int, features: Sequence[int],
                 kernel_sizes: Sequence[Sequence[int]], strides: Sequence[Sequence[int]],
                 n_convs: Sequence[int], *, dtype=None, rngs: nnx.Rngs):
        cin, stages = in_channels, []
        for c, k, s, n in zip(features, kernel_sizes, strides, n_convs, strict=True):
            stages.append(nnx.List([StackedConvBlocks(n, cin, c, k, s, dtype=dtype, rngs=rngs)]))
            cin = c
        self.stages = nnx.List(stages)

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        skips = []
        for (stage,) in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nnx.Module):
    """From the bottleneck up: `up = transpconv(below)`, `stage(concat[up, skip])`, 1×1×1 head.

    Stages are `StackedResidualBlocks` (the Mamba U-Nets' `UNetResDecoder`) or, with
    `residual=False`, `StackedConvBlocks` (dynamic-network-architectures' `UNetDecoder`, used by
    `ResidualEncoderUNet` and `PlainConvUNet`). Heads exist for every stage; with
    `deep_supervision` all outputs are returned, full resolution first, otherwise only the
    full-resolution one.
    """

    def __init__(self, features: Sequence[int], kernel_sizes: Sequence[Sequence[int]],
                 strides: Sequence[Sequence[int]], n_blocks: Sequence[int], num_classes: int, *,
                 residual: bool, deep_supervision: bool = True, dtype=None, rngs: nnx.Rngs):
        stages, transpconvs, seg_layers = [], [], []
        for j, n in enumerate(n_blocks):
            below, skip = features[-(j + 1)], features[-(j + 2)]
            kernel = kernel_sizes[-(j + 2)]
            transpconvs.append(TransposedConv(below, skip, strides[-(j + 1)], dtype=dtype,
                                              rngs=rngs))
            if residual:
                stages.append(StackedResidualBlocks(n, 2 * skip, skip, kernel, (1, 1, 1),
                                                    dtype=dtype, rngs=rngs))
            else:
                stages.append(StackedConvBlocks(n, 2 * skip, skip, kernel, dtype=dtype, rngs=rngs))
            seg_layers.append(conv3d(skip, num_classes, (1, 1, 1), bias=True, dtype=dtype,
                                     rngs=rngs))
        self.stages = nnx.List(stages)
        self.transpconvs = nnx.List(transpconvs)
        self.seg_layers = nnx.List(seg_layers)
        self.deep_supervision = deep_supervision

    def __call__(self, skips: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        x, outputs, last = skips[-1], [], len(self.stages) - 1
        for j, (up, stage, head) in enumerate(zip(self.transpconvs, self.stages, self.seg_layers,
                                                  strict=True)):
            u = up(x)
            x = stage(jnp.concatenate([u, skips[-(j + 2)].astype(u.dtype)], axis=-1))
            if self.deep_supervision or j == last:
                outputs.append(head(x).astype(jnp.float32))
        return tuple(outputs[::-1])


class UNet(nnx.Module):
    """`encoder` + `decoder`; `__call__(x (B, S0, S1, S2, C_in))` -> tuple of logits, full
    resolution first (one entry unless `deep_supervision`)."""

    def __init__(self, encoder: ResidualEncoder | PlainConvEncoder, decoder: UNetDecoder, *,
                 variant: str, precision: str, mamba_precision: str = "float32"):
        self.encoder = encoder
        self.decoder = decoder
        self.variant = variant
        self.precision = precision  # convolutions and norms
        self.mamba_precision = mamba_precision  # the Mamba blocks (MambaOptions)

    @property
    def deep_supervision(self) -> bool:
        return self.decoder.deep_supervision

    def set_deep_supervision(self, enabled: bool) -> None:
        """Off for inference: only the full-resolution head runs (the reference's switch)."""
        self.decoder.deep_supervision = enabled

    def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
        return self.decoder(self.encoder(x))
