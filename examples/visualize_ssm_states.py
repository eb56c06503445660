"""Watch the state of a Mamba layer respond to synthetic inputs: a pulse, a sine wave and random noise.

Runs on CPU in a few seconds (a small randomly initialised layer, upstream's initialisation), traces the layer's
conv and SSM states after every token with ``mamba_state.trace_layer`` and writes, per input:

* ``heatmap_<input>.png``: SSM state values of the first channels over time;
* ``pca2d_<input>.png`` / ``pca3d_<input>.png``: the SSM state trajectory on its first principal components;

and ``norms.png``: conv and SSM state norms over time for the three inputs.

    python examples/visualize_ssm_states.py --out docs/img
"""

from __future__ import annotations

import argparse
import math
import os

import torch

from mamba_state import StatefulMamba
from mamba_state.trace import trace_layer
from mamba_state.viz import plot_ssm_heatmap, plot_state_norms, plot_state_pca, save_figure


def synthetic_inputs(length: int, d_model: int, seed: int) -> dict[str, torch.Tensor]:
    """``{name: x [1, length, d_model]}``: one pulse at token 16, per-channel sines (period 24), Gaussian noise."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.arange(length, dtype=torch.float32)[:, None]
    pulse = torch.zeros(length, d_model)
    pulse[16] = 3.0 * torch.randn(d_model, generator=gen)  # one token carries a signal; all others are silent
    phase = 2 * math.pi * torch.rand(d_model, generator=gen)
    sine = 1.5 * torch.sin(2 * math.pi * t / 24 + phase)
    noise = torch.randn(length, d_model, generator=gen)
    return {"pulse": pulse[None], "sine": sine[None], "random": noise[None]}


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="ssm_state_plots", help="output folder (default ssm_state_plots)")
    parser.add_argument("--length", type=int, default=96, help="tokens per input (default 96)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dpi", type=int, default=90)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    layer = StatefulMamba.from_config(d_model=16, d_state=16, d_conv=4, expand=2, layer_idx=0)
    written = []

    def save(fig, name):
        written.append(save_figure(fig, os.path.join(args.out, name), dpi=args.dpi))

    traces = {}
    for name, x in synthetic_inputs(args.length, layer.d_model, args.seed).items():
        tr = trace_layer(layer, x)  # states after 0..L tokens: [L + 1, 1, 32, 16] (SSM), [L + 1, 1, 32, 4] (conv)
        traces[name] = tr
        save(plot_ssm_heatmap(tr, channels=[0, 1, 2, 3], title=f"SSM state over time: {name} input"),
             f"heatmap_{name}.png")
        save(plot_state_pca(tr, 2, title=f"SSM state trajectory, 2-D PCA: {name} input"), f"pca2d_{name}.png")
        save(plot_state_pca(tr, 3, title=f"SSM state trajectory, 3-D PCA: {name} input"), f"pca3d_{name}.png")
    save(plot_state_norms(traces, title="State norms over time for three inputs (one layer)"), "norms.png")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
