"""Triton kernels of the selective scan and their PyTorch wrappers (imported as ``mamba_state.kernels``).

* :func:`selective_scan_fn` — drop-in superset of upstream's ``selective_scan_fn`` (initial state, final state,
  per-step resets; differentiable in every input).
* :func:`selective_state_update` — one decoding step, state updated in place.
* :func:`add_rms_norm` — residual add and RMSNorm in one pass (upstream's fused add-norm), differentiable.
* :func:`causal_conv1d` — causal depthwise conv1d continuing a carried window, with resets (Triton forward for
  inference; the differentiable reference where gradients are needed).

Importing this package registers the custom ops ``torch.ops.mamba_state.{scan_fwd, scan_bwd, state_update}``.

Layout: one folder per op (``selective_scan/``, ``state_update/``, ``conv1d/``, ``add_norm/``, ``ssd/``,
``decode_step/``, ``mamba3/``, ``rl_step/``), each with its float64-capable reference in ``naive.py`` beside its fast paths (``chunked.py``
on the CPU, ``triton_kernels.py``) and its entry point (``launcher.py``); shared pieces at this level
(``backend``, ``scan_inputs``, ``scan_positions``, ``_launch``, ``_jit``, ``_device``). This package imports
nothing from ``mamba_state`` but ``mamba_state.errors`` (docs/architecture.md).
"""

from .add_norm import add_rms_norm
from .conv1d import causal_conv1d
from .selective_scan import selective_scan_fn
from .state_update import selective_state_update

__all__ = ["selective_scan_fn", "selective_state_update", "causal_conv1d", "add_rms_norm"]
