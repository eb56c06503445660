"""Mamba-3's SISO scan (trapezoidal discretisation, data-dependent rotary angles) with initial states, final
states and resets, in pure PyTorch: the sequential oracle (``naive``) and the chunked CPU path (``chunked``).

On CUDA the Mamba-3 adapter uses upstream's Triton ``mamba3_siso_combined`` (with ``Input_States``); these
functions are its reference and its CPU path.
"""

from .chunked import mamba3_scan_chunked
from .naive import Mamba3Shape, Mamba3States, check_mamba3_inputs, mamba3_scan_ref, mamba3_step_ref, rotate_pairs

__all__ = ["mamba3_scan_ref", "mamba3_scan_chunked", "mamba3_step_ref", "check_mamba3_inputs", "Mamba3States",
           "Mamba3Shape", "rotate_pairs"]
