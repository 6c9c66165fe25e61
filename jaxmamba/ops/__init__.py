"""Operators: the selective scan (reference, XLA and Pallas paths) and the causal depthwise conv."""

from jaxmamba.ops.causal_conv1d import causal_conv1d
from jaxmamba.ops.selective_scan import IMPLEMENTATIONS, default_implementation, selective_scan

__all__ = ["IMPLEMENTATIONS", "causal_conv1d", "default_implementation", "selective_scan"]
