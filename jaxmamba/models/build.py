"""`build_model(variant, plan)`: the networks from an nnU-Net plan.

Reference classes are in TamingMambas' `tamingmambas/nnunetv2/nets/<class>.py` (built by its
`get_*_from_plans`); DNA is dynamic-network-architectures (`architectures/unet.py`).

| variant         | reference class                 | Mamba module per stage            | decoder  |
|-----------------|---------------------------------|-----------------------------------|----------|
| `plainconvunet` | DNA `PlainConvUNet` (nnU-Net's default; plain conv encoder) | none | plain |
| `resencunet`    | DNA `ResidualEncoderUNet`       | none                              | plain    |
| `segmamba`      | `SegMamba`                      | MambaLayer(MambaTrans), d ≤ 256   | residual |
| `bisegmamba`    | `PanSegMamba`                   | MambaLayer(PanMambaTrans), d ≤ 256| residual |
| `segmambaskip`  | `SegMambaSkip` (skips only)     | MambaLayer(PanMambaTrans), d ≤ 256| residual |
| `multisegmamba` | `MultiSegMamba`                 | MultiMambaTrans, d ≤ 64           | residual |
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from flax import nnx

from jaxmamba import choices
from jaxmamba.layers import MambaLayer, MultiMambaTrans, d_state_for
from jaxmamba.layers.options import DEFAULT_OPTIONS, MambaOptions
from jaxmamba.models.precision import compute_dtype
from jaxmamba.models.unet import PlainConvEncoder, ResidualEncoder, UNet, UNetDecoder
from jaxmamba.plans import Plan


@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes the networks."""

    reference_name: str  # class name in TamingMambas / dynamic-network-architectures
    mamba: str | None  # None, "uni", "bi" or "multi"
    d_state_cap: int = 256
    mamba_on_skips_only: bool = False
    residual_decoder: bool = True
    residual_encoder: bool = True  # False: DNA's PlainConvEncoder (plan n_conv_per_stage_encoder)


_SPECS = {
    "plainconvunet": Variant("PlainConvUNet", None, residual_decoder=False,
                             residual_encoder=False),
    "resencunet": Variant("ResEncUNet", None, residual_decoder=False),
    "segmamba": Variant("SegMamba", "uni"),
    "bisegmamba": Variant("PanSegMamba", "bi"),
    "segmambaskip": Variant("SegMambaSkip", "bi", mamba_on_skips_only=True),
    "multisegmamba": Variant("MultiSegMamba", "multi", d_state_cap=64),
}
#: Each of `jaxmamba.choices.VARIANTS` with what distinguishes it.
VARIANTS: dict[str, Variant] = {name: _SPECS[name] for name in choices.VARIANTS}

#: Other spellings accepted for a variant (the reference's class names).
ALIASES = {"pansegmamba": "bisegmamba", "residualencoderunet": "resencunet"}


def canonical_variant(variant: str) -> str:
    """The variant's name in `VARIANTS`; accepts the reference's class names, any case."""
    name = variant.lower().replace("-", "").replace("_", "")
    name = ALIASES.get(name, name)
    if name not in VARIANTS:
        choices.check(variant, choices.VARIANTS, "variant")  # raises, naming the value given
    return name


class KeyStream:
    """Parameter-init keys `fold_in(key, 0), fold_in(key, 1), ...`; stands in for `nnx.Rngs`.

    `nnx.Rngs` updates a counter Variable at every draw, which under tracing (`nnx.eval_shape`,
    `jit`) costs time quadratic in the number of draws (flax 0.12): 15 s for MultiSegMamba's
    shapes. A Python counter costs nothing. The key is "rbg": its samplers compile ~3x faster
    than threefry's, which dominates initialising a network, eagerly (one compile per shape) and
    as training does it, in one jitted program (`jaxmamba.train.step.init_on_mesh`: SegMamba,
    Synapse plan, CPU, 55 s against 151 s; docs/benchmarks.md "Initialising a network").
    """

    def __init__(self, seed: int):
        self._key = jax.random.key(seed, impl="rbg")
        self._count = 0

    def params(self) -> jax.Array:
        self._count += 1
        return jax.random.fold_in(self._key, self._count - 1)


def _mamba_module(kind: str, cap: int, options: MambaOptions, rngs: KeyStream,
                  channels: int) -> nnx.Module:
    kw = dict(d_state=d_state_for(channels, cap), options=options, rngs=rngs)
    if kind == "multi":
        return MultiMambaTrans(channels, **kw)
    return MambaLayer(channels, bidirectional=kind == "bi", **kw)


def build_model(variant: str, plan: Plan, *, precision: str = "float32",
                deep_supervision: bool = True, mamba: MambaOptions = DEFAULT_OPTIONS,
                rngs: nnx.Rngs | KeyStream | int = 0) -> UNet:
    """The network `variant` for `plan`, initialised as the reference's `get_*_from_plans`.

    `precision` ("float32" or "bf16") is the computation dtype of convolutions and norms;
    parameters stay float32, the Mamba path too unless `mamba.mamba_precision` says "bf16". `mamba`
    is how every Mamba layer computes (the scan's implementation, what the backward keeps, the
    Mamba blocks' precision: `jaxmamba.layers.options.MambaOptions`).
    Use `nnx.eval_shape(lambda: build_model(...))` for shapes only.
    """
    name = canonical_variant(variant)
    spec = VARIANTS[name]
    dtype = compute_dtype(precision)
    rngs = KeyStream(rngs) if isinstance(rngs, int) else rngs
    features = plan.features_per_stage
    mamba_module = None
    if spec.mamba is not None:
        mamba_module = functools.partial(_mamba_module, spec.mamba, spec.d_state_cap, mamba, rngs)
    if spec.residual_encoder:
        encoder = ResidualEncoder(plan.num_input_channels, features, plan.kernel_sizes,
                                  plan.strides, plan.n_blocks_encoder, mamba=mamba_module,
                                  mamba_on_skips_only=spec.mamba_on_skips_only, dtype=dtype,
                                  rngs=rngs)
    else:
        encoder = PlainConvEncoder(plan.num_input_channels, features, plan.kernel_sizes,
                                   plan.strides, plan.n_blocks_encoder, dtype=dtype, rngs=rngs)
    decoder = UNetDecoder(features, plan.kernel_sizes, plan.strides, plan.n_blocks_decoder,
                          plan.num_classes, residual=spec.residual_decoder,
                          deep_supervision=deep_supervision, dtype=dtype, rngs=rngs)
    return UNet(encoder, decoder, variant=name, precision=precision,
                mamba_precision=mamba.mamba_precision)


def count_parameters(model: nnx.Module) -> int:
    """Number of parameter scalars (works on `nnx.eval_shape` models too)."""
    return sum(v.size for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
