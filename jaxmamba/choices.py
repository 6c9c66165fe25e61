# Every named choice of jaxmamba, spelled once: the config's schema and the library both read it.
"""The values a user chooses among (config keys, command-line options), in one JAX-free module.

Each choice is a `Literal` type and the tuple of its values. `jaxmamba.config` types its fields
with the `Literal`s (so its errors and `--print-config` list the values), the command line offers
the tuples, and the library checks what it is given against the same tuples (`check`); no second
list exists to drift. A new option of the Mamba path is one `Literal` here, one field of
`ModelConfig` and the field of the same name in `jaxmamba.layers.options.MambaOptions`.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

#: The networks (`jaxmamba.models.VARIANTS`; the reference's class names are accepted too).
Variant = Literal["plainconvunet", "resencunet", "segmamba", "bisegmamba", "segmambaskip",
                  "multisegmamba"]
#: Computation dtype of convolutions and norms (`jaxmamba.models.precision`).
Precision = Literal["float32", "bf16"]
#: Computation dtype of the Mamba block (`jaxmamba.layers.mamba.Mamba`): "float32" throughout (the
#: reference's SegMamba, BiSegMamba, SegMambaSkip), or "bf16" projections, causal conv and scan
#: inputs with float32 state and sums (the reference's MultiSegMamba under fp16 autocast).
MambaPrecision = Literal["float32", "bf16"]
#: Implementations of the selective scan (`jaxmamba.ops.selective_scan`).
ScanImplementation = Literal["reference", "xla", "pallas"]
#: What a Mamba layer keeps for the backward (`jaxmamba.layers.remat`).
Remat = Literal["none", "scan", "states"]
#: Optimizer recipes (`jaxmamba.train.optim`).
Recipe = Literal["nnunet", "radam_cosine", "radam_onecycle"]
#: Bundled datasets (`jaxmamba.datasets`).
BundledDataset = Literal["demo", "phantom"]
#: Where sliding-window prediction sums the logits (`jaxmamba.infer.sliding_window`).
Accumulate = Literal["auto", "device", "host"]

VARIANTS: tuple[str, ...] = get_args(Variant)
PRECISIONS: tuple[str, ...] = get_args(Precision)
MAMBA_PRECISIONS: tuple[str, ...] = get_args(MambaPrecision)
SCAN_IMPLEMENTATIONS: tuple[str, ...] = get_args(ScanImplementation)
REMAT: tuple[str, ...] = get_args(Remat)
RECIPES: tuple[str, ...] = get_args(Recipe)
BUNDLED_DATASETS: tuple[str, ...] = get_args(BundledDataset)
ACCUMULATE: tuple[str, ...] = get_args(Accumulate)

#: `model.remat`'s default, the measured best (benchmarks/memory.py, docs/benchmarks.md).
DEFAULT_REMAT: Remat = "states"


def check(value: Any, choices: tuple[str, ...], name: str) -> Any:
    """`value` if it is one of `choices`, else a `ValueError` saying `name={value!r}: expected
    one of ...`."""
    if value not in choices:
        raise ValueError(f"{name}={value!r}: expected one of "
                         f"{', '.join(repr(c) for c in choices)}")
    return value
