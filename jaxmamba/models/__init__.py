"""The networks (nnU-Net's plain and ResEnc U-Nets, the four Mamba U-Nets) built from an nnU-Net
plan."""

from jaxmamba.models.build import VARIANTS, build_model, canonical_variant, count_parameters
from jaxmamba.models.precision import PRECISIONS, compute_dtype
from jaxmamba.models.unet import PlainConvEncoder, ResidualEncoder, UNet, UNetDecoder

__all__ = [
    "PRECISIONS", "VARIANTS", "PlainConvEncoder", "ResidualEncoder", "UNet", "UNetDecoder",
    "build_model", "canonical_variant", "compute_dtype", "count_parameters",
]
