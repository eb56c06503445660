"""Residual add + RMSNorm in one pass each way: reference (``naive``), Triton kernels and launcher."""

from .launcher import AddRMSNormFn, add_rms_norm, add_rms_norm_autograd, add_rms_norm_triton
from .naive import add_rms_norm_ref

__all__ = ["add_rms_norm", "add_rms_norm_ref", "add_rms_norm_triton", "add_rms_norm_autograd", "AddRMSNormFn"]
