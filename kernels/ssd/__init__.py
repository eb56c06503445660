"""Mamba-2's SSD scan with initial state, final state and resets, in pure PyTorch: the sequential oracle
(``naive``) and the chunked CPU path (``chunked``). On CUDA the adapters use upstream's Triton chunk scan."""

from .chunked import ssd_scan_chunked
from .naive import SSDShape, check_ssd_inputs, ssd_scan_ref

__all__ = ["ssd_scan_ref", "ssd_scan_chunked", "check_ssd_inputs", "SSDShape"]
