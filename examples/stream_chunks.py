"""Stream a long input through a Mamba layer in fixed-size chunks, carrying the state between chunks.

Memory stays bounded by the chunk size (the state itself is [B, d_inner, d_conv] + [B, d_inner, d_state] whatever
the length), and the outputs equal one pass over the whole input. The same loop works for a whole language model
(``lm(chunk, state=state)``).

    python examples/stream_chunks.py [--length N] [--chunk N]
"""

from __future__ import annotations

import argparse

import torch

import mamba_state as ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens in the whole input")
    parser.add_argument("--chunk", type=int, default=256, help="tokens per chunk")
    args = parser.parse_args()

    torch.manual_seed(0)
    layer = ms.StatefulMamba.from_config(d_model=32, d_state=16, d_conv=4, expand=2, layer_idx=0).eval()
    x = torch.randn(2, args.length, 32)

    with torch.no_grad():
        whole, final = layer(x)
        state = layer.new_state(batch_size=2)                   # zeros: same as state=None
        outputs = []
        for chunk in x.split(args.chunk, dim=1):
            y, state = layer(chunk, state=state)
            outputs.append(y)
    streamed = torch.cat(outputs, dim=1)
    err = (streamed - whole).abs().max().item()
    print(f"{args.length} tokens in chunks of {args.chunk}: state {state.nbytes} bytes, "
          f"max |chunked - one pass| = {err:.2e}")
    assert err < 1e-4 and state.allclose(final, rtol=1e-4, atol=1e-5)


if __name__ == "__main__":
    main()
