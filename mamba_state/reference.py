"""Pure-PyTorch references of the kernels, re-exported from where they live since 0.2 (one folder per op in
:mod:`mamba_state.kernels`, each reference beside its fast paths):

* :func:`selective_scan_ref` — the sequential oracle of Mamba-1's selective scan with ``initial_state``,
  ``return_last_state`` and per-step ``reset``; any float dtype (float64 for tests), differentiable
  (``mamba_state.kernels.selective_scan.naive``).
* :func:`selective_scan_chunked` — the same function, parallel within chunks, with a hand-written chunked
  backward; the fast CPU path (``mamba_state.kernels.selective_scan.chunked``).
* :func:`causal_conv1d_ref` — causal depthwise conv1d with a conv state in and out and resets
  (``mamba_state.kernels.conv1d.naive``).
* :func:`selective_state_update_ref` — one decoding step with resets (``mamba_state.kernels.state_update.naive``).
"""

from mamba_state.kernels.conv1d.naive import causal_conv1d_ref
from mamba_state.kernels.selective_scan.chunked import selective_scan_chunked
from mamba_state.kernels.selective_scan.naive import selective_scan_ref
from mamba_state.kernels.state_update.naive import selective_state_update_ref

__all__ = ["selective_scan_ref", "selective_scan_chunked", "causal_conv1d_ref", "selective_state_update_ref"]
