# The Mamba path's options as one value, taken by the network builder and every Mamba layer.
"""`MambaOptions`: how the Mamba layers compute (the config's `model.scan_implementation`,
`model.remat`, `model.mamba_precision`).

One frozen value travels from `jaxmamba.models.build_model` through `MambaLayer` /
`MultiMambaTrans`, `PanMambaTrans` and `MambaTrans` to `Mamba`, instead of one keyword per option
through each constructor; each layer reads the fields it needs. The choices of every field are
`jaxmamba.choices`' and are checked here, and the config's `model` section has a field of the
same name (`MambaOptions.of(cfg.model)`), so a new option is one `Literal` in `jaxmamba.choices`,
one field of `jaxmamba.config.ModelConfig` and one field here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxmamba import choices
from jaxmamba.choices import DEFAULT_REMAT, MambaPrecision, Remat, ScanImplementation


@dataclasses.dataclass(frozen=True)
class MambaOptions:
    """Options of the Mamba path (hashable: a static attribute of the layers)."""

    #: `selective_scan`'s implementation; None picks the fastest available
    scan_implementation: ScanImplementation | None = None
    #: what each Mamba layer keeps for the backward (`jaxmamba.layers.remat`)
    remat: Remat = DEFAULT_REMAT
    #: computation dtype of the Mamba block: "float32" throughout, or "bf16" projections, causal
    #: conv and scan inputs with float32 state and sums (`jaxmamba.layers.mamba.Mamba`)
    mamba_precision: MambaPrecision = "float32"

    def __post_init__(self):
        if self.scan_implementation is not None:
            choices.check(self.scan_implementation, choices.SCAN_IMPLEMENTATIONS,
                          "scan_implementation")
        choices.check(self.remat, choices.REMAT, "remat")
        choices.check(self.mamba_precision, choices.MAMBA_PRECISIONS, "mamba_precision")

    @classmethod
    def of(cls, section: Any) -> MambaOptions:
        """The options that `section` (the config's `model` section) holds under the fields'
        names."""
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})


#: The defaults (float32 Mamba path, fastest scan, `DEFAULT_REMAT`).
DEFAULT_OPTIONS = MambaOptions()
