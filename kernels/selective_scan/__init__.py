"""Mamba-1's selective scan: the float64 oracle (``naive``), the chunked CPU path (``chunked``), every state
at once (``all_states``), the Triton kernels (``triton_kernels``), their custom ops and autograd (``ops``) and the
public entry point (``launcher``)."""

from ..state_update import selective_state_update  # 0.1 exported it from this module's old path
from .all_states import selective_scan_all_states
from .chunked import selective_scan_chunked
from .launcher import selective_scan_fn
from .naive import selective_scan_ref

__all__ = ["selective_scan_fn", "selective_scan_ref", "selective_scan_chunked", "selective_scan_all_states",
           "selective_state_update"]
