"""Save a language model's state after a prompt, restore it later and continue from it.

A small Mamba language model reads a prompt; its state (every layer's conv window and SSM state, a few KB here and
independent of the prompt's length) is written to a safetensors file together with the model's fingerprint.
Restoring it and running the next tokens gives the same logits as running prompt + continuation in one pass.

    python examples/save_restore.py [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import mamba_state as ms
from mamba_state.io import read_metadata


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="directory for the state file (default: a temp dir)")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="mamba-state-"))
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    # a small fresh model with upstream's MambaLMHeadModel layout; a checkpoint directory works the same way:
    # lm = ms.StatefulMambaLM.from_pretrained("path/to/mamba-130m")
    lm = ms.StatefulMambaLM.from_config(dict(d_model=64, n_layer=2, vocab_size=256)).eval()
    prompt = torch.randint(0, 256, (2, 96))
    continuation = torch.randint(0, 256, (2, 32))

    with torch.no_grad():
        _, state = lm(prompt)                                   # state: MambaModelState after 96 tokens
        state.metadata["note"] = "after the prompt"
        path = out / "prompt.safetensors"
        state.save(path, model=lm)                              # atomic write, with the model's fingerprint
        print(f"saved {state.nbytes} bytes of state for {state.seqlen_offset} tokens to {path}")
        meta = read_metadata(path)
        print(f"format {meta['format']} v{meta['format_version']}, {len(meta['layers'])} layers, "
              f"user metadata {meta['user_metadata']}")

        restored = ms.MambaModelState.load(path, model=lm)      # checked against the model before use
        assert restored.allclose(state, rtol=0, atol=0), "load(save(s)) must be bit-identical"
        logits, _ = lm(continuation, state=restored)            # the whole continuation in one call
        full, _ = lm(torch.cat([prompt, continuation], dim=1))
    err = (logits - full[:, -continuation.shape[1]:]).abs().max().item()
    print(f"continuation from the restored state vs one pass: max |difference| = {err:.2e}")
    assert err < 1e-4, err


if __name__ == "__main__":
    main()
