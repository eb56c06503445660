"""Mamba-2's pure-PyTorch SSD scans, re-exported from :mod:`mamba_state.kernels.ssd` where they live since 0.2:
:func:`ssd_scan_ref` (the sequential oracle), :func:`ssd_scan_chunked` (the fast CPU path), :func:`check_ssd_inputs`.
"""

from mamba_state.kernels.ssd import SSDShape, check_ssd_inputs, ssd_scan_chunked, ssd_scan_ref

__all__ = ["ssd_scan_ref", "ssd_scan_chunked", "check_ssd_inputs", "SSDShape"]
