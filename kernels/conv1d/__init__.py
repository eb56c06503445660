"""Causal depthwise conv1d with a carried window: reference (``naive``), Triton kernel and launcher."""

from .launcher import causal_conv1d
from .naive import causal_conv1d_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref"]
