"""Run in a subprocess by tests/test_adapters_mamba2.py: upstream's Triton SSD path under TRITON_INTERPRET=1.

Upstream's SSD kernels are autotuned, and Triton's autotuner needs a GPU driver to benchmark; with
``MAMBA_DETERMINISTIC=1`` set *before* mamba_ssm is imported, upstream keeps a single config per kernel, which the
interpreter can run. conftest imports mamba_ssm at collection time, hence a fresh process. Upstream's launchers
also enter ``torch.cuda.device(t.device.index)``, which fails for CPU tensors (index None); this script (test-only)
makes that a no-op for ``None``.

Checks, in float32 with tiny sizes:
1. upstream ``Mamba2.forward`` (non-fused path: its conv, Triton ``mamba_chunk_scan_combined``, Triton gated norm)
   with ``inference_params`` -> output and cached (conv_state, ssm_state) == ours with ``backend="triton"`` and
   ``backend="reference"``.
2. ours with ``backend="triton"`` (upstream kernel, initial state, resets as ``seq_idx``) == ours with
   ``backend="reference"`` from a random state with resets (row 0 at its first token, row 1 on a chunk boundary
   and later, so row 1 carries its initial state across a chunk boundary before the reset); again for a layer
   without the gated norm (z gating inside upstream's kernel), with ``D_has_hdim`` and ``d_ssm < d_inner``.
Prints one JSON line of max abs differences and exits 1 when any exceeds its tolerance.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types

os.environ["MAMBA_DETERMINISTIC"] = "1"
os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

try:
    import selective_scan_cuda  # noqa: F401
except ImportError:
    sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")

_cuda_device = torch.cuda.device
torch.cuda.device = lambda d: contextlib.nullcontext() if d is None else _cuda_device(d)  # CPU tensors: no-op

import warnings  # noqa: E402

warnings.filterwarnings("ignore")
from mamba_ssm import Mamba2  # noqa: E402
from mamba_ssm.utils.generation import InferenceParams  # noqa: E402

from mamba_state import MambaInferenceState  # noqa: E402
from mamba_state.adapters.mamba2 import StatefulMamba2  # noqa: E402


def main() -> int:
    torch.manual_seed(0)
    up = Mamba2(16, d_state=8, headdim=4, ngroups=2, chunk_size=16, use_mem_eff_path=False, layer_idx=0)
    with torch.no_grad():
        for p in up.parameters():
            p.add_(0.2 * torch.randn_like(p))
    b, L = 2, 37
    x = torch.randn(b, L, 16)
    diffs = {}
    with torch.no_grad():
        ip = InferenceParams(max_seqlen=64, max_batch_size=b)
        y_up = up(x, inference_params=ip)
        conv_up, ssm_up = ip.key_value_memory_dict[0]
        for backend in ("triton", "reference"):
            m = StatefulMamba2(up, backend=backend)
            assert m.resolved_backend(x.device)[0] == backend
            y, s = m(x)
            diffs[f"{backend}_vs_upstream_y"] = (y - y_up).abs().max().item()
            diffs[f"{backend}_vs_upstream_ssm"] = (s.ssm_state - ssm_up).abs().max().item()
            diffs[f"{backend}_vs_upstream_conv"] = (s.conv_state - conv_up).abs().max().item()

        tri, ref = StatefulMamba2(up, backend="triton"), StatefulMamba2(up, backend="reference")
        state = MambaInferenceState(torch.randn(b, tri.conv_channels, tri.d_conv), torch.randn(b, 8, 4, 8) * 0.5)
        reset = torch.zeros(b, L, dtype=torch.bool)
        reset[0, 0] = True  # drops the initial state at once
        reset[0, 20] = True  # inside the second chunk
        reset[1, 16] = True  # exactly on a chunk boundary
        reset[1, 30] = True
        y_t, s_t = tri(x, state, reset)
        y_r, s_r = ref(x, state, reset)
        diffs["triton_vs_reference_reset_y"] = (y_t - y_r).abs().max().item()
        diffs["triton_vs_reference_reset_ssm"] = (s_t.ssm_state - s_r.ssm_state).abs().max().item()
        # no norm (z gates inside upstream's kernel), D per channel, the gated-MLP part of in_proj
        torch.manual_seed(1)
        tri2 = StatefulMamba2.from_config(16, d_state=4, headdim=8, d_ssm=16, rmsnorm=False, D_has_hdim=True,
                                          chunk_size=16, layer_idx=0, backend="triton")
        with torch.no_grad():
            for p in tri2.parameters():
                p.add_(0.2 * torch.randn_like(p))
        state2 = MambaInferenceState(torch.randn(b, tri2.conv_channels, tri2.d_conv), torch.randn(b, 2, 8, 4) * 0.5)
        y_t, s_t = tri2(x, state2, reset)
        tri2.backend = "reference"
        y_r, s_r = tri2(x, state2, reset)
        diffs["nonorm_hdimD_triton_vs_reference_y"] = (y_t - y_r).abs().max().item()
        diffs["nonorm_hdimD_triton_vs_reference_ssm"] = (s_t.ssm_state - s_r.ssm_state).abs().max().item()
    print(json.dumps(diffs))
    return 0 if all(v < 2e-4 for v in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
