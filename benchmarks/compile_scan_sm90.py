"""Compile the selective scan's Triton kernels for sm_90 on any machine (no GPU needed): every schedule (MODE),
with and without packed-sequence marks (VARLEN), bf16 inputs, dstate 16. A static check that a kernel change
still compiles for the GPU before device time is spent on it (the interpreter, which the CPU tests use, accepts
code the compiler rejects, e.g. branches whose variables differ in type); prints registers and spills a thread
(``ptxas -v`` on the PTX, with the ptxas Triton ships).

    python benchmarks/compile_scan_sm90.py
"""

from __future__ import annotations

import inspect
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mamba_state.kernels.selective_scan import triton_kernels as K  # noqa: E402
from mamba_state.kernels._launch import time_parallel_plan  # noqa: E402
from mamba_state.kernels.selective_scan import triton_time_parallel as TP  # noqa: E402

BF16_PTRS = {"u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "ypre_ptr", "gout_ptr", "yout_ptr", "du_ptr",
             "ddt_ptr", "dz_ptr"}
I32_PTRS = {"vs_ptr", "ve_ptr", "seg_ptr"}
U8_PTRS = {"reset_ptr"}
NOT_MULTIPLES_OF_16 = {"nchunks", "nbatch", "nsplit", "nseq", "num_seqs"}


def _jit(k):
    while not isinstance(k, triton.runtime.JITFunction):
        k = k.fn
    return k


def _signature(fn, consts: dict, absent: set) -> tuple[dict, dict]:
    """Types of every parameter: pointers by name, the rest i32; absent pointers and constexprs as constants."""
    sig, constexprs = {}, dict(consts)
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in absent:
            sig[name] = "constexpr"
            constexprs[name] = None
        elif name.endswith("_ptr"):
            sig[name] = ("*bf16" if name in BF16_PTRS else "*i32" if name in I32_PTRS
                         else "*u8" if name in U8_PTRS else "*fp32")
        else:
            sig[name] = "i32"
    return sig, constexprs


def _compile(label: str, kernel, consts: dict, absent: set, warps: int = 1) -> bool:
    fn = _jit(kernel)
    sig, constexprs = _signature(fn, consts, absent)
    # pointers 16-byte aligned, and integers divisible by 16 as Triton specialises them at the benchmarks' shapes
    # (dims, lengths and strides; not the counts of chunks, batch rows and splits): without it the compiler
    # cannot vectorise the tile loads, and the registers and spills it reports are not the GPU's
    aligned = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
               if t.startswith("*") or (t == "i32" and n not in NOT_MULTIPLES_OF_16)}
    t0 = time.time()
    try:
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as exc:  # noqa: BLE001
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[-1200:]}", flush=True)
        return False
    print(f"ok   {label} ({time.time() - t0:.0f} s){_ptxas_usage(out.asm.get('ptx'), warps)}", flush=True)
    return True


def _ptxas_usage(ptx: str | None, warps: int) -> str:
    """``, N registers, S bytes spilled`` from ``ptxas -v`` on the kernel's PTX (empty where ptxas fails)."""
    import re
    import subprocess
    import tempfile

    if not ptx:
        return ""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        found = get_ptxas(90)
        ptxas = found.path if hasattr(found, "path") else found[0]
        with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
            f.write(ptx)
            f.flush()
            res = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=600)
    except Exception:  # noqa: BLE001  (a diagnostic: the compile check above is what counts)
        return ""
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    return ((f", {regs.group(1)} registers" if regs else "")
            + (f", spills {spill.group(1)} B stored / {spill.group(2)} B loaded a thread" if spill else "")
            + f" ({warps} warp{'s' if warps > 1 else ''})")


def main() -> int:
    ok = True
    fwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_INIT=True, HAS_RESET=True, SOFTPLUS=True,
                     CHUNK=256, BD=16, BN=16, STORE_YPRE=False, HAS_FINAL=False)
    for varlen in (False, True):
        absent = {"ypre_ptr", "final_ptr"} | (set() if varlen else {"vs_ptr", "ve_ptr"})
        for mode in (0, 1, 2):
            absent_m = absent | ({"sum_ptr", "prod_ptr"} if mode != 1 else set())
            ok &= _compile(f"_scan_fwd_kernel MODE {mode} VARLEN {varlen}", K._scan_fwd_kernel,
                           {**fwd_flags, "MODE": mode, "VARLEN": varlen}, absent_m)
    ok &= _compile("_scan_fwd_segments_kernel", K._scan_fwd_segments_kernel,
                   dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_INIT=True, HAS_RESET=True, SOFTPLUS=True,
                        BD=8, BN=16), set())
    bwd_flags = dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_GLAST=True, HAS_RESET=True, SOFTPLUS=True,
                     CHUNK=256, BD=16, BN=16, STORE_Y=False)
    for varlen, half in ((False, 0), (False, 3), (True, 0)):
        absent = {"yout_ptr"} | (set() if varlen else {"vs_ptr", "ve_ptr", "vinit_ptr", "vlast_ptr"})
        for mode in (0, 1):
            ok &= _compile(f"_scan_bwd_kernel MODE {mode} VARLEN {varlen} HALF {half}", K._scan_bwd_kernel,
                           {**bwd_flags, "MODE": mode, "VARLEN": varlen, "HAS_VINIT": varlen,
                            "HAS_VLAST": varlen, "HALF": half}, absent | ({"hin_ptr"} if mode == 0 else set()))
        if half:
            continue
        ok &= _compile(f"_scan_bwd_local_kernel VARLEN {varlen}", K._scan_bwd_local_kernel,
                       dict(HAS_Z=True, HAS_BIAS=True, HAS_RESET=True, SOFTPLUS=True, CHUNK=256, BD=8, BN=16,
                            VARLEN=varlen, HAS_VLAST=varlen),
                       set() if varlen else {"vs_ptr", "ve_ptr", "vlast_ptr"})
    # the time-parallel gradient pass (MAMBA_STATE_SCAN_BWD=tp) at the chunks of seqlen 2,048 and 16,384
    for chunk in (128, 256):
        ok &= _compile(f"_scan_bwd_tp_kernel CHUNK {chunk}", TP._scan_bwd_tp_kernel,
                       dict(HAS_D=True, HAS_Z=True, HAS_BIAS=True, HAS_RESET=True, SOFTPLUS=True, STORE_Y=False,
                            CHUNK=chunk, BD=time_parallel_plan(chunk, 1536, 1536)[0]), {"yout_ptr"},
                       warps=time_parallel_plan(chunk, 1536, 1536)[1])
    print("all compiled" if ok else "some kernels failed to compile")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
