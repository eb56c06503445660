"""`mamba-state demo`: a small end-to-end state round trip (build, save, load in a fresh process, verify)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from .reference import selective_scan_chunked
from .state import MambaInferenceState, MambaModelState


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="device for the states (default: cpu)")
    parser.add_argument("--seed", type=int, default=0)


_CHILD = """
import sys, torch, mamba_state as ms
s = ms.MambaModelState.load(sys.argv[1], device='cpu')
ref = torch.load(sys.argv[2], weights_only=True)
ok = all(torch.equal(s[i].conv_state, ref[i].conv_state) and torch.equal(s[i].ssm_state, ref[i].ssm_state)
         and s[i].ssm_state.dtype == ref[i].ssm_state.dtype for i in ref.layer_indices)
print('bit-identical' if ok else 'MISMATCH')
sys.exit(0 if ok else 1)
"""


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    b, d, L, n, layers = 2, 32, 256, 8, 3
    A = -torch.rand(d, n, device=dev) - 0.1
    states = {}
    t0 = time.perf_counter()
    for i in range(layers):
        u, dt = torch.randn(b, d, L, device=dev), torch.rand(b, d, L, device=dev)
        B, C = torch.randn(b, n, L, device=dev), torch.randn(b, n, L, device=dev)
        _, ssm = selective_scan_chunked(u, dt, A, B, C, return_last_state=True)
        states[i] = MambaInferenceState(u[:, :, -4:].contiguous(), ssm)
    state = MambaModelState(states, seqlen_offset=L, metadata={"demo": True})
    with tempfile.TemporaryDirectory() as tmp:
        path, ref = os.path.join(tmp, "state.safetensors"), os.path.join(tmp, "state.pt")
        state.save(path)
        torch.save(state.to("cpu"), ref)
        proc = subprocess.run([sys.executable, "-c", _CHILD, path, ref], capture_output=True, text=True)
        size = os.path.getsize(path)
    print(f"built {layers} layer states (batch {b}, d_inner {d}, d_state {n}) from a {L}-token scan "
          f"in {time.perf_counter() - t0:.3f} s")
    print(f"saved {size} bytes; loaded in a fresh process: {proc.stdout.strip() or proc.stderr.strip()}")
    return proc.returncode
