"""Mamba-2's SSD scan with initial state, final state and resets, in pure PyTorch: the sequential oracle
(``naive``) and the chunked CPU path (``chunked``); packed variable-length sequences (``cu_seqlens``) in
``packed``. On CUDA the adapters use upstream's Triton chunk scan."""

from .chunked import ssd_scan_chunked
from .naive import SSDShape, check_ssd_inputs, ssd_scan_ref
from .packed import PackedLayout, ssd_scan_packed

__all__ = ["ssd_scan_ref", "ssd_scan_chunked", "ssd_scan_packed", "PackedLayout", "check_ssd_inputs", "SSDShape"]
