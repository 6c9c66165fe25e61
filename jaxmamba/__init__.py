"""jaxmamba: Mamba U-Nets for voxel-level 3D medical image segmentation in JAX/Flax."""

__version__ = "0.1.0"
