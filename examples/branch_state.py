"""Branch one state into several continuations without re-reading the shared prefix.

A prompt is read once; its state is repeated along the batch (``select`` with a repeated index) and each row
continues with different tokens. Each branch equals prompt + its continuation run from scratch. ``split`` takes
the branches apart again and ``cat`` joins them (the identity, law 3).

    python examples/branch_state.py
"""

from __future__ import annotations

import argparse

import torch

import mamba_state as ms


def main() -> None:
    torch.manual_seed(0)
    lm = ms.StatefulMambaLM.from_config(dict(d_model=64, n_layer=2, vocab_size=256)).eval()
    prompt = torch.randint(0, 256, (1, 64))
    k = 4
    continuations = torch.randint(0, 256, (k, 16))

    with torch.no_grad():
        _, prefix_state = lm(prompt)                            # batch 1
        branches = prefix_state.select(torch.zeros(k, dtype=torch.long))   # batch k, copies of row 0
        logits, branched = lm(continuations, state=branches)
        for i in range(k):
            ref, ref_state = lm(torch.cat([prompt, continuations[i:i + 1]], dim=1))
            assert torch.allclose(logits[i], ref[0, -16:], atol=1e-4), i
            assert branched.select(i).allclose(ref_state, rtol=1e-4, atol=1e-5), i
    parts = branched.split(1)
    assert ms.MambaModelState.cat(parts).allclose(branched, rtol=0, atol=0)
    print(f"{k} branches from one {prompt.shape[1]}-token prefix agree with running each from scratch")


if __name__ == "__main__":
    # no options: --help prints what the example shows
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()
