"""Pallas GPU kernels (README.md): the chunk-parallel selective scan, forward and backward."""
