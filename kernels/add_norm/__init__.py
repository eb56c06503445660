"""Residual add + RMSNorm in one pass: reference (``naive``), Triton kernel and launcher."""

from .launcher import add_rms_norm, add_rms_norm_triton
from .naive import add_rms_norm_ref

__all__ = ["add_rms_norm", "add_rms_norm_ref", "add_rms_norm_triton"]
