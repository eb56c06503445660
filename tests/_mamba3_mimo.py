"""Test helpers for Mamba-3 MIMO layers on machines without TileLang (tests only; the library needs none of this).

* :func:`upstream_mimo_mamba3` builds upstream's own ``Mamba3(is_mimo=True)``. Its ``__init__`` asserts that the
  module-level ``mamba3_mimo_combined`` (the TileLang kernel) imported; where it did not, a stand-in that raises
  when called is put there for the construction only, and the module's value (None) is restored at once. The layer
  is upstream's, unchanged: only its forward would need TileLang (and would fail clearly), ``step()`` does not.
* :func:`upstream_step_references` gives upstream's own pure-PyTorch references of the pieces its ``Mamba3.step``
  runs as kernels: ``apply_rotary_qk_inference_reference`` (Triton rotary), ``selective_state_update_fused_ref_v2``
  (the CuTe-DSL ``mamba3_step_fn``; read out of its module's source with ``ast``, since that module imports
  ``cutlass`` first) and ``rms_norm_ref`` (the Triton gated RMSNorm). ``patch_upstream_step`` installs them with
  pytest's ``monkeypatch`` (undone after the test), so upstream's ``step()`` code itself runs on the CPU.
"""

from __future__ import annotations

import ast
import importlib
import pathlib
from typing import Any, Callable

import torch


def _no_tilelang(*args: Any, **kwargs: Any):
    raise RuntimeError("stand-in for upstream's TileLang mamba3_mimo (tests/_mamba3_mimo.py): TileLang is not "
                       "importable, so upstream's MIMO forward cannot run here")


def upstream_mimo_mamba3(*args: Any, **kwargs: Any) -> torch.nn.Module:
    """``mamba_ssm.modules.mamba3.Mamba3(*args, is_mimo=True, **kwargs)``, with TileLang or without it."""
    mod = importlib.import_module("mamba_ssm.modules.mamba3")
    if mod.mamba3_mimo_combined is not None:
        return mod.Mamba3(*args, is_mimo=True, **kwargs)
    mod.mamba3_mimo_combined = _no_tilelang
    try:
        return mod.Mamba3(*args, is_mimo=True, **kwargs)
    finally:
        mod.mamba3_mimo_combined = None


def _function_from_source(path: pathlib.Path, name: str, namespace: dict[str, Any]) -> Callable:
    tree = ast.parse(path.read_text())
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def upstream_step_references() -> dict[str, Callable]:
    """Upstream's references of its step kernels, wrapped to the kernels' calling conventions."""
    import mamba_ssm
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref
    from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_reference

    path = pathlib.Path(mamba_ssm.__file__).parent / "ops" / "cute" / "mamba3" / "mamba3_step_fn.py"
    ref_v2 = _function_from_source(path, "selective_state_update_fused_ref_v2", {"torch": torch})

    def rotary(q, k, angle_state, angle_proj, dt, bias_q=None, bias_k=None, inplace=False, conjugate=False,
               rotate_pairwise=True):
        return apply_rotary_qk_inference_reference(q, k, angle_state, angle_proj, dt, bias_q=bias_q,
                                                   bias_k=bias_k, conjugate=conjugate,
                                                   rotate_pairwise=rotate_pairwise)

    def step_fn(state, Bstate, Xstate, A, B, C, D, x, dt, trap, xproj, outproj=None, state_out=None, out=None,
                z=None, zproj=None, tile_D=64, num_warps=4):  # the kernel's in-place contract
        y, new = ref_v2(state, A, B, C, xproj, x, zproj, z, dt, Bstate, Xstate, trap, D, outproj,
                        compute_dtype=torch.float64)
        out.copy_(y)
        (state if state_out is None else state_out).copy_(new)

    def norm_forward(self, x, z=None):  # RMSNormGated.forward without Triton, in the input's dtype
        return rms_norm_ref(x, self.weight, self.bias, z=z, eps=self.eps, group_size=self.group_size,
                            norm_before_gate=self.norm_before_gate, upcast=False)

    return {"rotary": rotary, "step_fn": step_fn, "norm_forward": norm_forward}


def patch_upstream_step(monkeypatch) -> None:
    """Make upstream's ``Mamba3.step`` run on the CPU through its own references (see the module docstring)."""
    from mamba_ssm.ops.triton.layernorm_gated import RMSNorm

    refs = upstream_step_references()
    mod = importlib.import_module("mamba_ssm.modules.mamba3")
    monkeypatch.setattr(mod, "apply_rotary_qk_inference_fwd", refs["rotary"])
    monkeypatch.setattr(mod, "mamba3_step_fn", refs["step_fn"])
    monkeypatch.setattr(RMSNorm, "forward", refs["norm_forward"])
