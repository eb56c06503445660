"""Compile the causal conv's Triton kernels for sm_90 on any machine (no GPU needed) and count the global load
instructions of each kind in their PTX: vectorised (``ld.global.v4`` / ``.v2``) or 2-byte scalar (``b16``).
A static check of why the aligned kernels should be faster, before a GPU measures it (docs/kernel.md, the conv
section). bf16 inputs, width 4, silu and bias (the forwards without a state or resets, the aligned backward with
both), the pointers and strides marked 16-aligned as Triton's launcher specialises them in a real call.

    python benchmarks/inspect_conv_ptx.py
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # compile for real
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mamba_state.kernels.conv1d import triton_kernels as K  # noqa: E402

PTRS = dict(x_ptr="*bf16", w_ptr="*fp32", bias_ptr="*fp32", state_ptr="*fp32", reset_ptr="*u8")
FWD = {**PTRS, "out_ptr": "*bf16", "new_state_ptr": "*fp32"}
STRIDES = dict(dim="i32", L="i32", sxb="i32", sxd="i32", sob="i32", sod="i32")
FLAGS = dict(W=4, WP=4, HAS_BIAS=True, HAS_STATE=False, HAS_RESET=False, SILU=True)
KERNELS = {
    "_causal_conv_kernel (general forward)": (
        "_causal_conv_kernel", {**FWD, "cu_ptr": "*i32", **STRIDES, "nseq": "i32", "NITER": "i32"},
        {**FLAGS, "VARLEN": False, "BD": 16, "BL": 128, "BS": 16}),
    "_causal_conv_fwd4_kernel (aligned forward)": (
        "_causal_conv_fwd4_kernel", {**FWD, **STRIDES}, {**FLAGS, "BD": 16, "G": 16}),
    "_causal_conv_bwd4_aligned_kernel (aligned backward, state and resets)": (
        "_causal_conv_bwd4_aligned_kernel",
        {**PTRS, "dout_ptr": "*bf16", "dx_ptr": "*bf16", "dw_part_ptr": "*fp32", "dbias_part_ptr": "*fp32",
         "dstate_ptr": "*fp32", "dim": "i32", "L": "i32", "sxb": "i32", "sxd": "i32", "sgb": "i32", "sgd": "i32",
         "sdb": "i32", "sdd": "i32"},
        {**FLAGS, "HAS_STATE": True, "HAS_RESET": True, "STATE_GRAD": True, "BD": 4, "G": 32}),
}


def _jit(k):
    while not isinstance(k, triton.runtime.JITFunction):
        k = k.fn
    return k


def main() -> None:
    for label, (name, sig, consts) in KERNELS.items():
        fn = _jit(getattr(K, name))
        aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(sig) if n not in ("nseq", "NITER")}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in consts}}, constexprs=consts,
                        attrs=aligned)
        ptx = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm["ptx"]
        counts = {k: ptx.count(f"ld.global.{k}") for k in ("v4", "v2")}
        counts["b16"] = ptx.count("ld.global.b16") + ptx.count("ld.global.u16")
        print(f"{label}: {counts['v4']} ld.global.v4, {counts['v2']} ld.global.v2, {counts['b16']} 2-byte loads")


if __name__ == "__main__":
    main()
