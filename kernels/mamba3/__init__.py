"""Mamba-3's SISO and MIMO scans (trapezoidal discretisation, data-dependent rotary angles) with initial states,
final states and resets, in pure PyTorch: the sequential oracles (``naive``, ``mimo_naive``) and the chunked paths
(``chunked``, ``mimo_chunked``).

On CUDA the Mamba-3 adapter uses upstream's Triton ``mamba3_siso_combined`` (with ``Input_States``) for SISO; the
SISO functions are its reference and its CPU path. MIMO chunks run ``mamba3_mimo_scan_chunked`` on every device
(upstream's TileLang MIMO kernel takes no initial state).
"""

from .chunked import mamba3_scan_chunked
from .mimo_chunked import mamba3_mimo_scan_chunked
from .mimo_naive import mamba3_mimo_scan_ref, mamba3_mimo_step_ref, rotate_halves
from .naive import Mamba3Shape, Mamba3States, check_mamba3_inputs, mamba3_scan_ref, mamba3_step_ref, rotate_pairs

__all__ = ["mamba3_scan_ref", "mamba3_scan_chunked", "mamba3_step_ref", "check_mamba3_inputs", "Mamba3States",
           "Mamba3Shape", "rotate_pairs", "mamba3_mimo_scan_ref", "mamba3_mimo_scan_chunked", "mamba3_mimo_step_ref",
           "rotate_halves"]
