"""Run in a subprocess by tests/test_adapters_mamba2.py: transformers' ``Mamba2Mixer`` forward as an oracle.

transformers picks mamba_ssm's Triton kernels whenever ``import mamba_ssm`` works, which conftest's placeholder
makes true; in a fresh process without that placeholder (and without a GPU) it falls back to its own PyTorch
references, which run on a CPU. Prints one JSON line of relative differences; exits 1 when one exceeds 1e-4 (1e-3 on a GPU, where mamba_ssm's kernels may serve).
"""

from __future__ import annotations

import json
import sys
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> int:
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

    from mamba_state.adapters.mamba2 import StatefulMamba2

    cfg = transformers.Mamba2Config(hidden_size=16, state_size=8, head_dim=4, num_heads=8, n_groups=2, expand=2,
                                    conv_kernel=4, chunk_size=8, vocab_size=10, num_hidden_layers=1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # with mamba_ssm present, transformers uses its kernels
    torch.manual_seed(0)
    mix = Mamba2Mixer(cfg, layer_idx=0).eval().to(device)
    with torch.no_grad():
        for p in mix.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = StatefulMamba2(mix)
    x = torch.randn(2, 13, 16, device=device)
    with torch.no_grad():
        y_hf = mix(x)
        y, _ = m(x)
    diffs = {"y_rel": ((y - y_hf).abs().max() / y_hf.abs().max()).item()}
    print(json.dumps(diffs))
    tol = 1e-4 if device == "cpu" else 1e-3
    return 0 if all(v < tol for v in diffs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
