"""Compile the fused collection step's Triton kernels (``mamba_state.kernels.rl_step``) for sm_90 on any machine
(no GPU needed), at the RL recipe's policies (Mamba and GRU) and the environment's options: the static check that
they compile for the GPU (the interpreter accepts code the compiler rejects), with registers and spills a thread
from ``ptxas -v``.

    python benchmarks/compile_rl_step_sm90.py
"""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compile_scan_sm90 as base  # noqa: E402  (clears TRITON_INTERPRET before triton is imported)
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mamba_state.kernels.rl_step import launcher  # noqa: E402
from mamba_state.kernels.rl_step import triton_kernels as K  # noqa: E402

POLICY_I64 = {"t_ptr", "action_buf"}
POLICY_U8 = {"reset_ptr", "reset_buf"}
ENV_I64 = {"action_buf", "t_ptr", "phase_ptr", "bits_ptr", "ep_steps_ptr", "age_ptr", "new_bits_ptr",
           "noise_bits_ptr", "successes_ptr", "episodes_ptr"}
ENV_U8 = {"reset_ptr", "done_buf"}
SCALARS = {"N": "i32", "horizon": "i32", "eps": "fp32", "noise_std": "fp32", "keep_weight": "fp32", "shaping": "fp32"}


def _compile(label: str, kernel, consts: dict, absent: set, i64: set, u8: set, f64: set = frozenset(),
             warps: int = 4) -> bool:
    fn = base._jit(kernel)
    sig, constexprs = {}, dict(consts)
    for name in inspect.signature(fn.fn).parameters:
        if name in consts or name in absent:
            sig[name] = "constexpr"
            constexprs.setdefault(name, None)
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        else:
            sig[name] = "*i64" if name in i64 else "*u8" if name in u8 else "*fp64" if name in f64 else "*fp32"
    aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    t0 = time.time()
    try:
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=aligned),
                             target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except Exception as exc:  # noqa: BLE001
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[-1500:]}", flush=True)
        return False
    print(f"ok   {label} ({time.time() - t0:.0f} s){base._ptxas_usage(out.asm.get('ptx'), warps)}", flush=True)
    return True


def main() -> int:
    ok = True
    for label, dm, layers, na, biases in (("small policy (d_model 32, 1 layer, 1 bit)", 32, 1, 2, False),
                                          ("default policy (d_model 64, 2 layers, 4 bits)", 64, 2, 16, False),
                                          ("small policy with projection biases", 32, 1, 2, True)):
        di = 2 * dm
        consts = dict(O=7, DM=dm, DI=di, NS=16, R=-(-dm // 16), K=4, NA=na, L=layers, HAS_IN_BIAS=biases,
                      HAS_CONV_BIAS=True, HAS_OUT_BIAS=biases, BN=16, OP=16, DMP=max(16, dm), NSP=16, RP=16,
                      AP=16, BD=launcher.POLICY_CHANNELS)
        ok &= _compile(f"_mamba_policy_step_kernel, {label}", K._mamba_policy_step_kernel, consts,
                       set() if biases else {"in_b", "out_b"}, POLICY_I64, POLICY_U8, warps=launcher.POLICY_WARPS)
    for label, hidden, layers, na in (("small GRU (hidden 32, embed 64, 1 bit)", 32, 1, 2),
                                      ("GRU hidden 64, embed 64, 2 layers, 4 bits", 64, 2, 16)):
        consts = dict(O=7, E=64, H=hidden, NA=na, L=layers, BN=16, OP=16, EP=64, HP=1 << (hidden - 1).bit_length(),
                      AP=16)
        ok &= _compile(f"_gru_policy_step_kernel, {label}", K._gru_policy_step_kernel, consts, set(), POLICY_I64,
                       POLICY_U8, warps=launcher.gru_warps({"H": hidden}))
    for shaping, distract, noise, age in ((False, False, True, False), (True, True, True, True)):
        consts = dict(KB=4, NC=4 if noise else 0, SHAPING=shaping, HAS_DISTRACT=distract, HAS_NOISE=noise,
                      HAS_AGE=age, BLOCK=128, KBP=4, NCP=4)
        absent = ({"noise_bits_ptr"} if not distract else set()) | ({"age_ptr"} if not age else set())
        ok &= _compile(f"_recall_env_step_kernel shaping {shaping} distractors {distract} ages {age}",
                       K._recall_env_step_kernel, consts, absent, ENV_I64, ENV_U8, {"return_sum_ptr"})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
