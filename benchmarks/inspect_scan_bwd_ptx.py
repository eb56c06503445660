"""Count the instructions a thread runs in the scan backward's gradient-pass loops, compiled for sm_90 on any
machine (no GPU needed): the step-by-step pass (``_scan_bwd_kernel``, chunk-parallel schedule, one 8-step tile a
loop iteration) against the time-parallel pass (``_scan_bwd_tp_kernel``, ``MAMBA_STATE_SCAN_BWD=tp``, one state
a loop iteration), both normalised to one (step, channel, state) of work: a static estimate, before a GPU
measures it, of which does less work (docs/kernel.md, "Time-parallel gradient pass"). bf16, dstate 16, D, z,
delta_bias, softplus and resets on; pointers and integer arguments marked 16-aligned as on the GPU.

    python benchmarks/inspect_scan_bwd_ptx.py
"""

from __future__ import annotations

import collections
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_scan_sm90 as base  # noqa: E402  (clears TRITON_INTERPRET before triton is imported)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mamba_state.kernels._launch import time_parallel_plan  # noqa: E402
from mamba_state.kernels.selective_scan import triton_kernels as K  # noqa: E402
from mamba_state.kernels.selective_scan import triton_time_parallel as TP  # noqa: E402


def _ptx(kernel, consts: dict, absent: set, warps: int) -> str:
    fn = base._jit(kernel)
    sig, constexprs = base._signature(fn, consts, absent)
    aligned = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
               if t.startswith("*") or (t == "i32" and n not in base.NOT_MULTIPLES_OF_16)}
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned),
                         target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    return out.asm["ptx"]


def _opcode(line: str) -> str:
    """``mul`` of ``mul.f32 ...`` and of a predicated ``@%p1 mul.f32 ...``."""
    words = line.split()
    word = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
    return word.split(".")[0]


def _largest_block(ptx: str) -> collections.Counter:
    """Opcode counts of the PTX basic block with the most instructions (the unrolled loop body)."""
    blocks = re.split(r"\n\$L__BB\d+_\d+:", ptx)
    best: collections.Counter = collections.Counter()
    for b in blocks:
        lines = [x.strip() for x in b.split("\n")]
        ops = collections.Counter(_opcode(line) for line in lines
                                  if line and not line.startswith(("//", ".", "$", "{", "}")))
        if sum(ops.values()) > sum(best.values()):
            best = ops
    return best


def _line(label: str, ops: collections.Counter, work: int) -> str:
    total = sum(ops.values())
    top = ", ".join(f"{k} {v / work:.1f}" for k, v in ops.most_common(6))
    return f"{label}: {total / work:.1f} instructions per (step, channel, state) ({top})"


def main() -> int:
    flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_RESET=True, SOFTPLUS=True, STORE_Y=False)
    bd, bn, warps = 16, 16, 1  # the step-by-step pass's plan at these shapes
    step = _largest_block(_ptx(K._scan_bwd_kernel, {**flags, "HAS_GLAST": False, "CHUNK": 256, "BD": bd, "BN": bn,
                                                     "MODE": 1, "VARLEN": False, "HAS_VINIT": False,
                                                     "HAS_VLAST": False, "HALF": 0},
                                    {"yout_ptr", "vs_ptr", "ve_ptr", "vinit_ptr", "vlast_ptr", "glast_ptr"}, warps))
    # one loop iteration: 8 steps of bd x bn (channel, state) pairs over 32 * warps threads
    print(_line(f"step-by-step pass (8-step tile, {bd} channels x {bn} states on {warps} warp)", step,
                8 * bd * bn // (32 * warps)))
    for chunk in (128, 256):
        tbd, twarps = time_parallel_plan(chunk, 1536, 1536)
        tp = _largest_block(_ptx(TP._scan_bwd_tp_kernel, {**flags, "CHUNK": chunk, "BD": tbd}, {"yout_ptr"},
                                 twarps))
        # one loop iteration: one state over a [tbd, chunk] tile on 32 * twarps threads
        print(_line(f"time-parallel pass (chunk {chunk}, {tbd} channels, {twarps} warps)", tp,
                    tbd * chunk // (32 * twarps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
