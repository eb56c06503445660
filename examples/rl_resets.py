"""Per-environment resets in the middle of a sequence, as recurrent RL needs at episode boundaries.

Four environments run 64 steps; each has episodes that end at different times. One call with ``reset[b, t] =
True`` at the first step of every new episode gives, for every row, exactly what a fresh run of that episode
alone gives (law 2): the conv window and the SSM state are both cleared at the boundary.

    python examples/rl_resets.py
"""

from __future__ import annotations

import argparse

import torch

import mamba_state as ms


def main() -> None:
    torch.manual_seed(0)
    layer = ms.StatefulMamba.from_config(d_model=16, d_state=8, d_conv=4, expand=2, layer_idx=0).eval()
    envs, steps = 4, 64
    x = torch.randn(envs, steps, 16)
    reset = torch.rand(envs, steps) < 0.05                      # episode starts
    reset[:, 0] = False
    carried = layer.new_state(envs)
    carried.ssm_state.normal_()                                 # a state left by earlier rollouts
    carried.conv_state.normal_()

    with torch.no_grad():
        y, _ = layer(x, state=carried, reset=reset)
        for b in range(envs):
            starts = reset[b].nonzero().flatten().tolist()
            if not starts:
                continue
            t = starts[-1]                                      # the last episode of row b, run on its own
            fresh, _ = layer(x[b:b + 1, t:])
            err = (y[b, t:] - fresh[0]).abs().max().item()
            assert err < 1e-4, (b, err)
    print(f"{int(reset.sum())} episode boundaries across {envs} environments; every episode after a reset "
          "matches a fresh run")


if __name__ == "__main__":
    # no options: --help prints what the example shows
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
