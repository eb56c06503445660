"""``StatefulMamba3``: an upstream ``mamba_ssm.modules.mamba3.Mamba3`` layer (SISO or MIMO) with its recurrent state in
and out.

The adapter registers the upstream layer's own parameters and submodules under upstream's names (``dt_bias``,
``B_bias``, ``C_bias``, ``mimo_x``, ``mimo_z``, ``mimo_o`` when ``is_mimo``, ``D``, ``in_proj``, ``B_norm``,
``C_norm``, ``norm`` when ``is_outproj_norm``, ``out_proj``): ``state_dict()`` keys equal upstream's, nothing is copied or patched, and the upstream module itself
is not registered as a child.

Per token, as upstream computes it (no causal conv; ``G`` = ngroups, ``S`` = num_rope_angles)::

    z, x, B, C, dd_dt, dd_A, trap, angles = split(in_proj(u), [d_inner, d_inner, G*N, G*N, H, H, H, S])
    dt = softplus(dd_dt + dt_bias);  A = min(-softplus(dd_A), -A_floor);  B, C = B_norm(B), C_norm(C)
    y = Mamba-3 scan(q=C, k=B, v=x, A*dt, dt, trap, C_bias, B_bias, angles, D, z unless is_outproj_norm)
    y = norm(y, z) if is_outproj_norm;   out = out_proj(y)

(the scan: :mod:`mamba_state.kernels.mamba3`). The state is upstream's four tensors: ``angle_dt_state``
``[B, H, S]``, ``ssm_state`` ``[B, H, headdim, N]``, ``k_state`` ``[B, 1, H, N]``, ``v_state`` ``[B, H, headdim]``.

Compute paths (``backend``, see :mod:`mamba_state.kernels.backend`): on CUDA, upstream's Triton
``mamba3_siso_combined`` with ``Input_States`` and ``return_final_states`` (resets inside a chunk become
variable-length segments through its ``cu_seqlens``: each row is cut at its resets, the segments packed into one
sequence, the first segment of a row starts from the row's state and the others from zeros); one token through
upstream's Triton ``mamba3_siso_step`` when no gradient is needed. Elsewhere, or when upstream's kernels are
missing or do not take the shapes (head sizes and chunk size powers of two >= 16, an even number of angles), our pure-PyTorch
:func:`~mamba_state.kernels.mamba3.mamba3_scan_chunked` and :func:`~mamba_state.kernels.mamba3.mamba3_step_ref`.
Upstream's kernels compute in bfloat16 with float32 states, whatever the layer's dtype.

MIMO layers (``is_mimo``, rank ``R``; B and C are ``R`` per token, ``k_state`` is ``[B, R, H, N]``): chunks run our
:func:`~mamba_state.kernels.mamba3.mamba3_mimo_scan_chunked` on every device, because upstream's TileLang
``mamba3_mimo`` takes no initial state and returns its final state without gradients. Only a prefill from zero
(``state=None``, no resets, no positions) that needs no gradient runs upstream's TileLang kernel, on CUDA where
TileLang is importable. One token runs upstream's decode (``apply_rotary_qk_inference_fwd`` then the CuTe-DSL
``mamba3_step_fn``) on CUDA when it is importable and no gradient is needed, else
:func:`~mamba_state.kernels.mamba3.mamba3_mimo_step_ref`. MIMO needs an even ``d_state`` (its rotary turns the
pairs ``(i, N/2 + i)``); an odd one is refused with :class:`~mamba_state.errors.StateCompatibilityError`.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_state.kernels.backend import resolve_backend
from mamba_state.kernels.mamba3 import (Mamba3States, mamba3_mimo_scan_chunked, mamba3_mimo_step_ref,
                                        mamba3_scan_chunked, mamba3_step_ref)
from mamba_state.kernels.scan_positions import check_positions, segment_bounds

from ..errors import StateCompatibilityError, StateError, StateShapeError
from ..state import MambaInferenceState
from ._state_checks import check_layer_state, check_reset
from .mamba2 import GatedRMSNorm, _upstream_rmsnorm_fn, gated_rms_norm

__all__ = ["StatefulMamba3"]


def _upstream_siso_scan():
    """Upstream's Triton ``mamba3_siso_combined``, or None when mamba_ssm (or Triton) is missing."""
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined
    except Exception:  # ImportError, or upstream failing on its compiled extension
        return None
    return mamba3_siso_combined


def _upstream_siso_step():
    try:
        from mamba_ssm.ops.triton.mamba3.mamba3_siso_step import mamba3_siso_step
    except Exception:
        return None
    return mamba3_siso_step


def _upstream_mimo_scan():
    """Upstream's TileLang ``mamba3_mimo`` (a prefill from zero only), or None when TileLang is not importable."""
    try:
        from mamba_ssm.ops.tilelang.mamba3.mamba3_mimo import mamba3_mimo
    except Exception:  # no tilelang (the usual case), or upstream failing on its compiled extension
        return None
    return mamba3_mimo


def _upstream_mimo_step():
    """``(apply_rotary_qk_inference_fwd, mamba3_step_fn)``: upstream's MIMO decode (Triton rotary, CuTe-DSL step),
    or None when either is not importable (the CuTe step needs nvidia-cutlass-dsl and quack-kernels)."""
    try:
        from mamba_ssm.ops.cute.mamba3.mamba3_step_fn import mamba3_step_fn
        from mamba_ssm.ops.triton.mamba3.mamba3_mimo_rotary_step import apply_rotary_qk_inference_fwd
    except Exception:
        return None
    return apply_rotary_qk_inference_fwd, mamba3_step_fn


def _check_mimo(d_state: int, mimo_rank: int) -> None:
    if isinstance(mimo_rank, bool) or not isinstance(mimo_rank, int) or mimo_rank < 1:
        raise StateError(f"mimo_rank: expected a positive int, found {mimo_rank!r}")
    if d_state % 2:
        raise StateCompatibilityError(
            f"layer: expected an even d_state for a MIMO Mamba3 (its rotary pairs dimension i with d_state/2 + i, "
            f"as upstream's TileLang and step kernels, which assert it), found d_state={d_state}")


def _rope_angles(d_state: int, rope_fraction: float) -> int:
    """Upstream's number of rotary angles: ``int(d_state * rope_fraction)`` rounded down to even, halved."""
    split = int(d_state * rope_fraction)
    return (split - split % 2) // 2


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class StatefulMamba3(nn.Module):
    """A Mamba-3 layer (SISO or MIMO) whose recurrent state is an explicit input and output.

    Args:
        layer: a ``mamba_ssm.modules.mamba3.Mamba3`` (``is_mimo`` either way; MIMO needs an even ``d_state``).
        state_dtype: dtype of states made by :meth:`new_state` (float32 by default); a state passed in keeps its
            dtypes.
        backend: ``None`` / ``"auto"``, ``"reference"`` or ``"triton"`` (see :mod:`mamba_state.kernels.backend`).

    Shapes: ``x`` ``[B, L, d_model]``; the state as in the module docstring (``k_state`` ``[B, mimo_rank, nheads,
    d_state]``, ``mimo_rank`` 1 for SISO).
    """

    dt_bias: nn.Parameter
    B_bias: nn.Parameter
    C_bias: nn.Parameter
    mimo_x: nn.Parameter
    mimo_z: nn.Parameter
    mimo_o: nn.Parameter
    D: nn.Parameter
    in_proj: nn.Linear
    B_norm: nn.Module
    C_norm: nn.Module
    norm: nn.Module
    out_proj: nn.Linear

    _NEEDED = ("d_model", "d_state", "headdim", "nheads", "d_inner", "num_bc_heads", "mimo_rank", "is_mimo",
               "num_rope_angles", "A_floor", "is_outproj_norm", "chunk_size", "in_proj", "dt_bias", "B_bias",
               "C_bias", "B_norm", "C_norm", "D", "out_proj")

    def __init__(self, layer: nn.Module, state_dtype: torch.dtype = torch.float32, backend: str | None = None):
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise StateCompatibilityError(f"layer: expected a mamba_ssm Mamba3 module, found {type(layer).__name__}")
        src: Any = layer  # duck-typed: the attributes below are checked before use
        missing = [a for a in self._NEEDED if not hasattr(src, a)]
        if missing:
            raise StateCompatibilityError(
                f"layer: expected a mamba_ssm Mamba3 module, found {type(src).__name__} without {missing}")
        is_mimo = bool(src.is_mimo)
        if is_mimo:
            _check_mimo(int(src.d_state), int(src.mimo_rank))
            absent = [a for a in ("mimo_x", "mimo_z", "mimo_o") if not hasattr(src, a)]
            if absent:
                raise StateCompatibilityError(f"layer: expected a MIMO Mamba3 (is_mimo=True), found no {absent}")
        if bool(src.is_outproj_norm) and not hasattr(src, "norm"):
            raise StateCompatibilityError("layer: expected a `norm` submodule (is_outproj_norm=True), found none")
        self._setup(d_model=int(src.d_model), d_state=int(src.d_state), headdim=int(src.headdim),
                    nheads=int(src.nheads), ngroups=int(src.num_bc_heads), nangles=int(src.num_rope_angles),
                    A_floor=float(src.A_floor), is_outproj_norm=bool(src.is_outproj_norm),
                    chunk_size=int(src.chunk_size), layer_idx=getattr(src, "layer_idx", None),
                    state_dtype=state_dtype, backend=backend, is_mimo=is_mimo,
                    mimo_rank=int(src.mimo_rank) if is_mimo else 1)
        # registered in upstream's order, so state_dict() keys come in upstream's order
        self.dt_bias, self.B_bias, self.C_bias = src.dt_bias, src.B_bias, src.C_bias
        if is_mimo:
            self.mimo_x, self.mimo_z, self.mimo_o = src.mimo_x, src.mimo_z, src.mimo_o
        self.D = src.D
        self.in_proj = src.in_proj
        self.B_norm, self.C_norm = src.B_norm, src.C_norm
        if self.is_outproj_norm:
            self.norm = src.norm
        self.out_proj = src.out_proj

    def _setup(self, *, d_model, d_state, headdim, nheads, ngroups, nangles, A_floor, is_outproj_norm, chunk_size,
               layer_idx, state_dtype, backend, is_mimo=False, mimo_rank=1) -> None:
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise StateError(f"state_dtype: expected a floating torch.dtype, found {state_dtype!r}")
        if backend is not None:
            from mamba_state.kernels.backend import requested_backend

            requested_backend(backend)
        self.d_model, self.d_state, self.headdim, self.nheads = d_model, d_state, headdim, nheads
        self.d_inner = nheads * headdim
        self.ngroups, self.num_rope_angles = ngroups, nangles
        self.A_floor, self.is_outproj_norm, self.chunk_size = A_floor, is_outproj_norm, chunk_size
        self.layer_idx, self.state_dtype, self.backend = layer_idx, state_dtype, backend
        self.is_mimo, self.mimo_rank = is_mimo, mimo_rank

    @classmethod
    def from_config(cls, d_model: int, d_state: int = 128, expand: int = 2, headdim: int = 64, ngroups: int = 1,
                    rope_fraction: float = 0.5, dt_min: float = 0.001, dt_max: float = 0.1,
                    dt_init_floor: float = 1e-4, A_floor: float = 1e-4, is_outproj_norm: bool = False,
                    is_mimo: bool = False, mimo_rank: int = 4, chunk_size: int = 64, layer_idx: int | None = None,
                    device=None, dtype=None, state_dtype: torch.dtype = torch.float32,
                    backend: str | None = None) -> "StatefulMamba3":
        """A fresh layer with upstream ``Mamba3``'s parameters: names, shapes, dtypes and initialisation.

        Random draws happen in upstream's order (``in_proj``, ``dt_bias``, ``out_proj``), so under one seed the
        parameters equal upstream's. mamba_ssm is not imported (so a MIMO layer needs no TileLang here).
        """
        if is_mimo:
            _check_mimo(d_state, mimo_rank)
        R = mimo_rank if is_mimo else 1
        if rope_fraction not in (0.5, 1.0):
            raise StateError(f"rope_fraction: expected 0.5 or 1.0 (as upstream), found {rope_fraction!r}")
        d_inner = int(expand * d_model)
        if d_inner % headdim != 0:
            raise StateShapeError(f"headdim: expected a divisor of d_inner = expand * d_model = {d_inner}, "
                                  f"found {headdim}")
        nangles = _rope_angles(d_state, rope_fraction)
        if nangles < 1:
            raise StateShapeError(f"d_state: expected at least {4 if rope_fraction == 0.5 else 2} for one rotary "
                                  f"angle, found {d_state}")
        nheads = d_inner // headdim
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(d_model=d_model, d_state=d_state, headdim=headdim, nheads=nheads, ngroups=ngroups,
                    nangles=nangles, A_floor=A_floor, is_outproj_norm=is_outproj_norm, chunk_size=chunk_size,
                    layer_idx=layer_idx, state_dtype=state_dtype, backend=backend, is_mimo=is_mimo, mimo_rank=R)
        fk = {"device": device, "dtype": dtype}
        # [z, x, B, C, dd_dt, dd_A, trap, angles]; B and C hold R rank vectors per group
        d_in = 2 * d_inner + 2 * d_state * ngroups * R + 3 * nheads + nangles
        in_proj = nn.Linear(d_model, d_in, bias=False, **fk)
        dt = torch.exp(torch.rand(nheads, device=device, dtype=torch.float32) * (math.log(dt_max) - math.log(dt_min))
                       + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^{-1}(dt), float32 as upstream
        self.dt_bias._no_weight_decay = True  # type: ignore[attr-defined]  # upstream's optimizer flag
        self.B_bias = nn.Parameter(torch.ones(nheads, R, d_state, dtype=torch.float32, device=device))
        self.C_bias = nn.Parameter(torch.ones(nheads, R, d_state, dtype=torch.float32, device=device))
        if is_mimo:  # upstream's init: x and the output averaged over ranks, z copied to each
            self.mimo_x = nn.Parameter(torch.ones(nheads, R, headdim, device=device) / R)
            self.mimo_z = nn.Parameter(torch.ones(nheads, R, headdim, device=device))
            self.mimo_o = nn.Parameter(torch.ones(nheads, R, headdim, device=device) / R)
        self.D = nn.Parameter(torch.ones(nheads, device=device))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.in_proj = in_proj
        self.B_norm = GatedRMSNorm(d_state, eps=1e-5, **fk)
        self.C_norm = GatedRMSNorm(d_state, eps=1e-5, **fk)
        if is_outproj_norm:
            self.norm = GatedRMSNorm(d_inner, eps=1e-5, norm_before_gate=True, group_size=headdim, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **fk)
        return self

    # ------------------------------------------------------------------ description and states
    def config(self) -> dict[str, Any]:
        """The :meth:`from_config` arguments that rebuild this layer's shapes and forward (not its initialisation
        ranges): ``d_state``, ``expand``, ``headdim``, ``ngroups``, ``rope_fraction``, ``A_floor``,
        ``is_outproj_norm``, ``chunk_size``, and ``is_mimo`` / ``mimo_rank`` for a MIMO layer; JSON-ready (``ssm_cfg``
        of a checkpoint's ``config.json``)."""
        fractions = [f for f in (0.5, 1.0) if _rope_angles(self.d_state, f) == self.num_rope_angles]
        if not fractions:
            raise StateCompatibilityError(
                f"layer: expected num_rope_angles of rope_fraction 0.5 or 1.0 ({_rope_angles(self.d_state, 0.5)} or "
                f"{_rope_angles(self.d_state, 1.0)} at d_state {self.d_state}), found {self.num_rope_angles}")
        expand: float = self.d_inner / self.d_model
        cfg = {"d_state": self.d_state, "expand": int(expand) if expand.is_integer() else expand,
               "headdim": self.headdim, "ngroups": self.ngroups, "rope_fraction": fractions[0],
               "A_floor": self.A_floor, "is_outproj_norm": self.is_outproj_norm, "chunk_size": self.chunk_size}
        if self.is_mimo:
            cfg.update(is_mimo=True, mimo_rank=self.mimo_rank)
        return cfg

    def state_layout(self) -> dict[str, Any]:
        return {"kind": "mamba3", "angle_shape": [self.nheads, self.num_rope_angles],
                "ssm_shape": [self.nheads, self.headdim, self.d_state],
                "k_shape": [self.mimo_rank, self.nheads, self.d_state],
                "v_shape": [self.nheads, self.headdim]}

    def new_state(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> MambaInferenceState:
        """A zero state (``state_dtype`` and the parameters' device unless given)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StateError(f"batch_size: expected a positive int, found {batch_size!r}")
        device = self.in_proj.weight.device if device is None else device
        dtype = self.state_dtype if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise StateError(f"dtype: expected a floating torch.dtype, found {dtype!r}")
        b, h, p, n = batch_size, self.nheads, self.headdim, self.d_state
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=dtype)

        return MambaInferenceState(ssm_state=zeros(b, h, p, n), angle_dt_state=zeros(b, h, self.num_rope_angles),
                                   k_state=zeros(b, self.mimo_rank, h, n), v_state=zeros(b, h, p))

    def resolved_backend(self, device: torch.device | str) -> tuple[str, str]:
        """``("triton" | "reference", why)`` for inputs on ``device`` (Triton also needs upstream's kernels and
        shapes they take)."""
        name, why = resolve_backend(device, self.backend)
        if name == "triton":
            if _upstream_siso_scan() is None:
                return "reference", "mamba_ssm's Triton Mamba-3 kernels are not importable: PyTorch reference path"
            if self.is_mimo:
                step = "upstream's CuTe-DSL step" if _upstream_mimo_step() is not None else (
                    "our PyTorch step (upstream's CuTe-DSL mamba3_step_fn is not importable)")
                pre = "upstream's TileLang kernel" if _upstream_mimo_scan() is not None else (
                    "the same (TileLang is not importable)")
                return "triton", (f"MIMO: chunks from a state through our PyTorch path, a prefill from zero without "
                                  f"gradients through {pre}, one token through {step}; Triton RMSNorms")
            # its kernels load [chunk, headdim] tiles by TMA and multiply them with tl.dot (every side >= 16)
            if not (all(_pow2(v) and v >= 16 for v in (self.headdim, self.d_state, self.chunk_size))
                    and self.num_rope_angles % 2 == 0):
                return "reference", ("upstream's Mamba-3 kernels need headdim, d_state and chunk_size powers of two "
                                     ">= 16 and an even number of rotary angles: PyTorch reference path")
        return name, why

    def check_state(self, state: Any, batch_size: int, device: torch.device | str) -> MambaInferenceState:
        """``state`` when it fits this layer (its layout, ``batch_size`` rows, on ``device``), a zero state for
        None; else a :class:`~mamba_state.errors.StateError` subclass naming what was expected and found."""
        device = torch.device(device)
        if state is None:
            return self.new_state(batch_size, device=device)
        return check_layer_state(state, self.state_layout(), self.layer_idx, batch_size, device)

    # ------------------------------------------------------------------ pieces shared by forward and step
    def _rms(self, norm: nn.Module, t: torch.Tensor, use_triton: bool) -> torch.Tensor:
        weight = cast(torch.Tensor, norm.weight)
        eps = float(getattr(norm, "eps", 1e-5))
        fn = _upstream_rmsnorm_fn() if use_triton and t.is_cuda else None
        if fn is not None:
            return fn(t, weight, None, z=None, eps=eps, group_size=None, norm_before_gate=True)
        return gated_rms_norm(t, weight, None, eps)

    def _project(self, u: torch.Tensor, use_triton: bool):
        """``u`` ``[..., d_model]`` -> the scan's inputs with upstream's activations, time/batch leading."""
        G, N, H, S, R = self.ngroups, self.d_state, self.nheads, self.num_rope_angles, self.mimo_rank
        z, x, B, C, dd_dt, dd_A, trap, angles = torch.split(
            self.in_proj(u), [self.d_inner, self.d_inner, R * G * N, R * G * N, H, H, H, S], dim=-1)
        lead = u.shape[:-1]
        ct = torch.promote_types(u.dtype, torch.float32)
        A = torch.clamp(-F.softplus(dd_A.to(ct)), max=-self.A_floor)
        dt = F.softplus(dd_dt.to(ct) + self.dt_bias.to(ct))
        rank = (R,) if self.is_mimo else ()  # upstream's "(r g n)" order; MIMO keeps the rank axis
        B = self._rms(self.B_norm, B.reshape(*lead, *rank, G, N), use_triton)
        C = self._rms(self.C_norm, C.reshape(*lead, *rank, G, N), use_triton)
        angles = angles.to(ct).unsqueeze(-2).expand(*lead, H, S)
        return (z.reshape(*lead, H, self.headdim), x.reshape(*lead, H, self.headdim), B, C, A * dt, dt, trap,
                angles)

    def _output(self, y: torch.Tensor, z: torch.Tensor, dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
        """``y`` ``[..., H, P]`` (MIMO with ``is_outproj_norm``: per rank, ``[..., R, H, P]``) -> ``out_proj``."""
        if self.is_mimo and self.is_outproj_norm:  # upstream: norm(y_r, z * mimo_z[r]) per rank, then sum_r mimo_o[r] *
            ct = torch.promote_types(y.dtype, torch.float32)  # upstream upcasts to float32; float64 stays
            zr = z.to(ct).unsqueeze(-3) * self.mimo_z.to(ct).transpose(0, 1)
            yr = self._gated_norm(y.to(ct).flatten(-2), zr.flatten(-2), use_triton).unflatten(-1, y.shape[-2:])
            return self.out_proj((yr * self.mimo_o.transpose(0, 1)).sum(-3).flatten(-2).to(dtype))
        y = y.reshape(*y.shape[:-2], self.d_inner)
        if self.is_outproj_norm:
            y = self._gated_norm(y, z.reshape(*z.shape[:-2], self.d_inner), use_triton)
        return self.out_proj(y.to(dtype))

    def _gated_norm(self, y: torch.Tensor, z: torch.Tensor, use_triton: bool) -> torch.Tensor:
        """Upstream's outproj norm, ``norm(y) * silu(z)`` per head, on ``[..., d_inner]``."""
        weight = cast(torch.Tensor, self.norm.weight)
        eps = float(getattr(self.norm, "eps", 1e-5))
        fn = _upstream_rmsnorm_fn() if use_triton and y.is_cuda else None
        if fn is not None:
            return fn(y, weight, None, z=z, eps=eps, group_size=self.headdim, norm_before_gate=True)
        return gated_rms_norm(y, weight, z, eps, self.headdim, True)

    def _states_of(self, state: MambaInferenceState) -> Mamba3States:
        """The container's tensors as the kernels take them (SISO drops ``k_state``'s rank axis of 1)."""
        k = state.k_state if self.is_mimo else state.k_state[:, 0]
        return Mamba3States(state.angle_dt_state, state.ssm_state, k, state.v_state)

    def _container(self, st: Mamba3States, like: MambaInferenceState) -> MambaInferenceState:
        k = st.k if self.is_mimo else st.k[:, None]
        return MambaInferenceState(ssm_state=st.ssm.to(like.ssm_state.dtype),
                                   angle_dt_state=st.angle.to(like.angle_dt_state.dtype),
                                   k_state=k.to(like.k_state.dtype), v_state=st.v.to(like.v_state.dtype))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, state: MambaInferenceState | None = None,
                reset: torch.Tensor | None = None, return_states_at: Any = None):
        """Run ``x`` ``[B, L, d_model]`` from ``state`` (zeros when None); returns ``(y [B, L, d_model], new state)``.

        ``reset``: bool ``[B, L]``; True at ``(b, t)`` clears all four of row ``b``'s state tensors before token
        ``t``. The new state has the input state's dtypes (``state_dtype`` when no state is given).

        ``return_states_at``: None, or non-decreasing ints in ``[0, L]``; then ``(y, new_state, states)`` with
        ``states`` the states after ``p`` tokens for each ``p`` (0: the incoming state; a reset at token ``p`` not
        applied yet), from a scan run in segments cut at these positions.
        """
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"x: expected a floating tensor, found {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise StateShapeError(f"x: expected [batch, seqlen, {self.d_model}], found {list(x.shape)}")
        bsz, L, _ = x.shape
        state = None if state is None else self.check_state(state, bsz, x.device)  # None: a prefill from zero
        check_reset(reset, [bsz, L])
        positions = None if return_states_at is None else check_positions(return_states_at, L)
        return self._forward(x, state, reset, positions)

    def _forward(self, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
                 positions: list[int] | None):
        """:meth:`forward` on checked arguments."""
        bsz, L, _ = x.shape
        fresh = state is None
        if state is None:
            state = self.new_state(bsz, device=x.device)
        if reset is not None:
            reset = reset.to(x.device)
        if L == 0:
            empty = x.new_zeros(bsz, 0, self.d_model)
            return (empty, state) if positions is None else (empty, state, [state for _ in positions])
        backend, _ = self.resolved_backend(x.device)
        use_triton = backend == "triton"
        z, xs, B, C, adt, dt, trap, angles = self._project(x, use_triton)
        zg = None if self.is_outproj_norm else z
        if (self.is_mimo and use_triton and fresh and reset is None and positions is None
                and not self._needs_grad(x)):
            y_up = self._mimo_prefill_upstream(C, B, xs, adt, dt, trap, angles, zg)
            if y_up is not None:
                y, st_up = y_up
                return self._output(y, z, x.dtype, use_triton), self._container(st_up, state)

        def scan(a: int, b: int, st: Mamba3States) -> tuple[torch.Tensor, Mamba3States]:
            r = None if reset is None else reset[:, a:b]
            zs = None if zg is None else zg[:, a:b]
            args = (C[:, a:b], B[:, a:b], xs[:, a:b], adt[:, a:b], dt[:, a:b], trap[:, a:b], angles[:, a:b], zs)
            if self.is_mimo:  # our chunked path on every device (upstream's MIMO kernel takes no initial state)
                q, k, v, adt_, dt_, trap_, ang_, z_ = args
                return mamba3_mimo_scan_chunked(
                    q, k, v, adt_, dt_, trap_, self.C_bias, self.B_bias, ang_, self.mimo_x, self.mimo_z,
                    None if self.is_outproj_norm else self.mimo_o, self.D, z_, initial_state=st, reset=r,
                    return_final_state=True, chunk_size=self.chunk_size)
            if use_triton:
                return self._scan_upstream(*args, st, r)
            q, k, v, adt_, dt_, trap_, ang_, z_ = args
            return mamba3_scan_chunked(q, k, v, adt_, dt_, trap_, self.C_bias[:, 0], self.B_bias[:, 0], ang_,
                                       self.D, z_, initial_state=st, reset=r, return_final_state=True,
                                       chunk_size=self.chunk_size)

        st = self._states_of(state)
        if positions is None:
            y, st = scan(0, L, st)
            return self._output(y, z, x.dtype, use_triton), self._container(st, state)
        at = {0: state}
        ys = []
        for a, b in segment_bounds(positions, L):
            y_part, st = scan(a, b, st)
            ys.append(y_part)
            at[b] = self._container(st, state)
        y = torch.cat(ys, dim=1)
        return self._output(y, z, x.dtype, use_triton), at[L], [at[p].clone() for p in positions]

    def _needs_grad(self, u: torch.Tensor, st: Mamba3States | None = None) -> bool:
        return torch.is_grad_enabled() and (u.requires_grad or any(p.requires_grad for p in self.parameters())
                                            or (st is not None and any(t.requires_grad for t in st)))

    def _rotary_divisor(self) -> int | None:
        """Upstream's ``rotary_dim_divisor`` (4 for rope_fraction 0.5, 2 for 1.0) when the TileLang kernel's
        ``d_state // divisor`` angles are this layer's, else None."""
        for div in (4, 2):
            if self.d_state // div == self.num_rope_angles:
                return div
        return None

    def _mimo_prefill_upstream(self, q, k, v, adt, dt, trap, angles, z):
        """A MIMO prefill from zero through upstream's TileLang ``mamba3_mimo`` (as ``Mamba3.forward`` calls it,
        ``return_state=True``): ``(y, final states)``, or None when TileLang or the shapes are missing. Used only
        when no gradient is needed: its final states are not differentiable."""
        fn = _upstream_mimo_scan()
        div = self._rotary_divisor()
        if fn is None or div is None:
            return None
        d = lambda t: t.detach()  # noqa: E731
        out = fn(Q=q, K=k, V=v, ADT=adt.transpose(1, 2), DT=dt.transpose(1, 2), Trap=trap.transpose(1, 2),
                 Q_bias=d(self.C_bias), K_bias=d(self.B_bias), MIMO_V=d(self.mimo_x), MIMO_Z=d(self.mimo_z),
                 MIMO_Out=None if self.is_outproj_norm else d(self.mimo_o), Angles=angles, D=d(self.D), Z=z,
                 chunk_size=self.chunk_size, rotary_dim_divisor=div, dtype=v.dtype, return_state=True)
        y, angle, ssm, kk, vv = out[:5]
        return y, Mamba3States(angle, ssm, kk, vv)

    def _step_upstream_mimo(self, fns, q, k, v, z, adt, dt, trap, angles, st: Mamba3States):
        """One MIMO token through upstream's decode kernels, as ``Mamba3.step`` calls them: the halved rotary
        (``rotate_pairwise=False``) then ``mamba3_step_fn`` (in place on a float32 copy of the SSM state). Returns
        ``(y [b, H, P]``, or ``[b, R, H, P]`` with ``is_outproj_norm``, new states)."""
        rotary, step_fn = fns
        H = self.nheads
        q, k = (t if t.shape[2] == H else t.repeat_interleave(H // t.shape[2], dim=2) for t in (q, k))
        bias_q, bias_k = (t.detach().transpose(0, 1).contiguous() for t in (self.C_bias, self.B_bias))
        qr, kr, angle = rotary(q=q.contiguous(), k=k.contiguous(), angle_state=st.angle.float().contiguous(),
                               angle_proj=angles.contiguous(), dt=dt.contiguous(), bias_q=bias_q, bias_k=bias_k,
                               conjugate=False, inplace=False, rotate_pairwise=False)
        ssm = st.ssm.detach().float().clone().contiguous()
        k_prev, v_prev = st.k.detach().to(kr.dtype).contiguous(), st.v.detach().to(v.dtype).contiguous()
        proj = [t.detach().transpose(0, 1).contiguous() for t in (self.mimo_x, self.mimo_z, self.mimo_o)]
        A = (adt / dt).contiguous()  # the kernel takes A and dt apart (alpha = exp(A dt))
        common = (ssm, k_prev, v_prev, A, kr, qr, self.D.detach(), v.contiguous(), dt.contiguous(),
                  torch.sigmoid(trap).contiguous(), proj[0])
        if self.is_outproj_norm:
            y = v.new_empty(v.shape[0], self.mimo_rank, H, self.headdim)
            step_fn(*common, outproj=None, state_out=None, out=y, z=None, zproj=None, tile_D=64, num_warps=4)
        else:
            y = torch.empty_like(v)
            step_fn(*common, outproj=proj[2], state_out=None, out=y, z=z.contiguous(), zproj=proj[1], tile_D=64,
                    num_warps=4)
        return y, Mamba3States(torch.remainder(angle, 2 * math.pi), ssm, kr, v)

    def _scan_upstream(self, q, k, v, adt, dt, trap, angles, z, st: Mamba3States, reset):
        """Upstream's fused SISO scan from ``st``; resets inside the chunk become varlen segments (module doc)."""
        fn = _upstream_siso_scan()
        bsz, L, h, p = v.shape
        q_bias, k_bias, D = self.C_bias[:, 0], self.B_bias[:, 0], cast(torch.Tensor, self.D)
        # upstream's state layout: float32 (its kernels load the states as float32 anyway)
        st = Mamba3States(*(t.float() for t in st))
        if not torch.is_grad_enabled():
            # upstream's autograd Function saves its chunk states for a backward whenever an input requires grad,
            # grad mode or not (ctx.needs_input_grad): detached inputs give its inference-only forward
            q_bias, k_bias, D = q_bias.detach(), k_bias.detach(), D.detach()
            st = Mamba3States(*(t.detach() for t in st))
        kw = dict(Q_bias=q_bias, K_bias=k_bias, D=D, chunk_size=self.chunk_size, return_final_states=True)
        if reset is not None and reset[:, 0].any():
            keep = (~reset[:, 0]).float()
            st = Mamba3States(*(t * keep.view(-1, *([1] * (t.dim() - 1))) for t in st))
        if reset is None or not bool(reset[:, 1:].any()):
            y, a, s, kk, vv = fn(q, k, v, adt.transpose(1, 2), dt.transpose(1, 2), trap.transpose(1, 2),
                                 Angles=angles, Z=z, Input_States=tuple(st), **kw)
            return y, Mamba3States(a, s, kk, vv)
        # rows cut at their resets, packed into one sequence of segments (batch 1, cu_seqlens)
        starts_mask = reset.clone()
        starts_mask[:, 0] = True
        flat = starts_mask.reshape(-1)
        starts = flat.nonzero().flatten()
        nseg = starts.numel()
        cu = torch.cat([starts, starts.new_tensor([bsz * L])]).to(torch.int32)
        seg_of_token = torch.cumsum(flat.long(), 0) - 1
        row_first = seg_of_token[torch.arange(bsz, device=v.device) * L]
        row_last = seg_of_token[torch.arange(bsz, device=v.device) * L + (L - 1)]
        init = []
        for t in st:
            full = t.new_zeros((nseg, *t.shape[1:]))
            init.append(full.index_copy(0, row_first, t))

        def pack(t):
            return t.reshape(1, bsz * L, *t.shape[2:])

        y, a, s, kk, vv = fn(pack(q), pack(k), pack(v), pack(adt).transpose(1, 2), pack(dt).transpose(1, 2),
                             pack(trap).transpose(1, 2), Angles=pack(angles), Z=None if z is None else pack(z),
                             Input_States=tuple(init), cu_seqlens=cu, **kw)
        return y.reshape(bsz, L, h, p), Mamba3States(a[row_last], s[row_last], kk[row_last], vv[row_last])

    # ------------------------------------------------------------------ one token
    def step(self, x_t: torch.Tensor, state: MambaInferenceState | None = None,
             reset: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaInferenceState]:
        """One token: ``x_t`` ``[B, 1, d_model]`` or ``[B, d_model]`` -> ``(y_t`` shaped like ``x_t``, new state).

        Pure function of its inputs (the given state is not modified). ``reset``: optional bool ``[B]``, clears
        those rows' state before the token.
        """
        if not isinstance(x_t, torch.Tensor) or not x_t.is_floating_point():
            raise StateError(f"x_t: expected a floating tensor, found {type(x_t).__name__}")
        squeeze = x_t.dim() == 3
        if squeeze and (x_t.shape[1] != 1 or x_t.shape[2] != self.d_model) or (
                not squeeze and (x_t.dim() != 2 or x_t.shape[-1] != self.d_model)):
            raise StateShapeError(
                f"x_t: expected [batch, 1, {self.d_model}] or [batch, {self.d_model}], found {list(x_t.shape)}")
        u = x_t[:, 0] if squeeze else x_t
        state = self.check_state(state, u.shape[0], u.device)
        check_reset(reset, [u.shape[0]])
        return self._step(x_t, state, reset)

    def _step(self, x_t: torch.Tensor, state: MambaInferenceState,
              reset: torch.Tensor | None) -> tuple[torch.Tensor, MambaInferenceState]:
        """:meth:`step` on checked arguments (``state`` not None)."""
        squeeze = x_t.dim() == 3
        u = x_t[:, 0] if squeeze else x_t
        st = self._states_of(state)
        if reset is not None:
            keep = ~reset.to(u.device)
            st = Mamba3States(*(t * keep.view(-1, *([1] * (t.dim() - 1))).to(t.dtype) for t in st))
        backend, _ = self.resolved_backend(u.device)
        use_triton = backend == "triton"
        z, xs, B, C, adt, dt, trap, angles = self._project(u, use_triton)
        zg = None if self.is_outproj_norm else z
        needs_grad = self._needs_grad(u, st)
        if self.is_mimo:
            fns = _upstream_mimo_step() if use_triton and not needs_grad else None
            if fns is not None:
                y, new = self._step_upstream_mimo(fns, C, B, xs, z, adt, dt, trap, angles, st)
            else:
                ct = torch.promote_types(torch.promote_types(u.dtype, torch.float32), st.ssm.dtype)
                c = lambda t: None if t is None else t.to(ct)  # noqa: E731
                y, new = mamba3_mimo_step_ref(
                    c(C), c(B), c(xs), c(adt), c(dt), c(trap), c(self.C_bias), c(self.B_bias), c(angles),
                    c(self.mimo_x), c(self.mimo_z), None if self.is_outproj_norm else c(self.mimo_o), c(self.D),
                    c(zg), Mamba3States(*(t.to(ct) for t in st)))
            out = self._output(y, z, u.dtype, use_triton)
            return (out[:, None] if squeeze else out), self._container(new, state)
        step_fn = _upstream_siso_step() if use_triton else None
        if step_fn is not None and not needs_grad:
            y, (a, s, kk, vv) = step_fn(C, B, xs, adt, dt, trap, self.C_bias[:, 0], self.B_bias[:, 0], angles,
                                        D=self.D, Z=zg, Input_States=tuple(t.float().contiguous() for t in st))
            new = Mamba3States(a, s, kk, vv)
        else:
            ct = torch.promote_types(torch.promote_types(u.dtype, torch.float32), st.ssm.dtype)
            y, new = mamba3_step_ref(C.to(ct), B.to(ct), xs.to(ct), adt.to(ct), dt.to(ct), trap.to(ct),
                                     self.C_bias[:, 0].to(ct), self.B_bias[:, 0].to(ct), angles.to(ct),
                                     self.D.to(ct), None if zg is None else zg.to(ct),
                                     Mamba3States(*(t.to(ct) for t in st)))
        out = self._output(y, z, u.dtype, use_triton)
        return (out[:, None] if squeeze else out), self._container(new, state)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, nheads={self.nheads}, headdim={self.headdim}, "
                f"d_state={self.d_state}, ngroups={self.ngroups}, num_rope_angles={self.num_rope_angles}, "
                + (f"mimo_rank={self.mimo_rank}, " if self.is_mimo else "") + f"layer_idx={self.layer_idx}")
