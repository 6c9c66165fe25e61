"""Flax NNX layers: the Mamba block and the TamingMambas blocks built on it."""

from jaxmamba.layers.blocks import (
    MULTI_AXIS_ORDERS,
    MambaLayer,
    MambaTrans,
    MultiMambaTrans,
    PanMambaTrans,
    d_state_for,
)
from jaxmamba.layers.mamba import DepthwiseConv1d, Mamba
from jaxmamba.layers.options import MambaOptions

__all__ = [
    "MULTI_AXIS_ORDERS", "DepthwiseConv1d", "Mamba", "MambaLayer", "MambaOptions", "MambaTrans",
    "MultiMambaTrans", "PanMambaTrans", "d_state_for",
]
