"""``StatefulMamba2``: an upstream ``mamba_ssm.Mamba2`` layer with its recurrent state in and out.

The adapter registers the upstream layer's own submodules and parameters under upstream's names (``in_proj``,
``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm``, ``out_proj``): ``state_dict()`` keys equal upstream's, nothing
is copied, nothing of upstream is patched, and the upstream module itself is not registered as a child.

Per token, as upstream computes it (``d_mlp = d_inner - d_ssm``)::

    z0, x0, z, xBC, dt = split(in_proj(u), [d_mlp, d_mlp, d_ssm, d_ssm + 2*ngroups*d_state, nheads])
    xBC = silu(causal depthwise conv(xBC))            # window of d_conv inputs, carried in conv_state
    x, B, C = split(xBC, [d_ssm, ngroups*d_state, ngroups*d_state])
    y = SSD(x, dt, A=-exp(A_log), B, C, D, dt_bias, softplus, dt_limit)   # carried in ssm_state
    y = gated_rmsnorm(y, z) if rmsnorm else (y already gated by silu(z) in the scan)
    out = out_proj(cat([silu(z0) * x0, y]) if d_mlp > 0 else y)

Compute paths (``backend``, see :mod:`mamba_state.backend`): on CUDA upstream's Triton
``mamba_chunk_scan_combined`` with ``initial_states``, ``return_final_states`` and resets passed as ``seq_idx``
(segment ids, the initial state belonging to segment 0); elsewhere, or when mamba_ssm is absent, our pure-PyTorch
:func:`mamba_state.ssd.ssd_scan_chunked`. The conv always runs through
:func:`mamba_state.reference.causal_conv1d_ref` (state in and out, resets), except on the Triton path without
resets, where the ``causal_conv1d`` package's CUDA conv (with its ``initial_states``) serves when installed.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_state.kernels._host import host_tensor
from mamba_state.kernels.backend import resolve_backend
from mamba_state.kernels.conv1d.naive import causal_conv1d_ref
from mamba_state.kernels.scan_positions import check_positions, conv_windows_at, run_segments, use_dense_states
from mamba_state.kernels.selective_scan.all_states import selective_scan_all_states
from mamba_state.kernels.ssd import ssd_scan_chunked, ssd_scan_packed
from mamba_state.kernels.varlen import check_cu_seqlens

from ..errors import StateCompatibilityError, StateError, StateShapeError
from ..state import MambaInferenceState
from ._state_checks import check_layer_state, check_reset

__all__ = ["StatefulMamba2", "GatedRMSNorm", "gated_rms_norm"]

_NO_LIMIT = (0.0, float("inf"))


def gated_rms_norm(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None, eps: float = 1e-5,
                   group_size: int | None = None, norm_before_gate: bool = False,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Upstream's gated RMSNorm in PyTorch: ``norm(x * silu(z))`` or ``norm(x) * silu(z)``, per group.

    ``x``, ``z``: ``[..., N]``; ``weight``, ``bias``: ``[N]``; groups of ``group_size`` channels (one group when
    None). Computed in float32 (float64 for float64 inputs); returns ``x.dtype``.
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(ct)
    gate = F.silu(z.to(ct)) if z is not None else None
    if gate is not None and not norm_before_gate:
        h = h * gate
    N = h.shape[-1]
    gs = N if group_size is None else int(group_size)
    hg = h.view(*h.shape[:-1], N // gs, gs)
    hg = hg * torch.rsqrt(hg.square().mean(dim=-1, keepdim=True) + eps)
    out = hg.view(h.shape) * weight.to(ct)
    if bias is not None:
        out = out + bias.to(ct)
    if gate is not None and norm_before_gate:
        out = out * gate
    return out.to(x.dtype)


class GatedRMSNorm(nn.Module):
    """Our mirror of upstream's ``RMSNormGated`` (same parameter ``weight``, initialised to ones; no bias)."""

    bias: torch.Tensor | None  # registered as a None parameter (declared for typing)

    def __init__(self, hidden_size: int, eps: float = 1e-5, group_size: int | None = None,
                 norm_before_gate: bool = True, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        self.register_parameter("bias", None)
        self.group_size = group_size
        self.norm_before_gate = norm_before_gate

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return gated_rms_norm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate, self.bias)


def _upstream_chunk_scan():
    """Upstream's Triton ``mamba_chunk_scan_combined``, or None when mamba_ssm (or Triton) is missing."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or upstream failing on its compiled extension
        return None
    return mamba_chunk_scan_combined


def _causal_conv1d_fn():
    """The ``causal_conv1d`` package's CUDA conv (takes an initial window), or None when it is not installed."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def _upstream_rmsnorm_fn():
    try:
        from mamba_ssm.ops.triton.layernorm_gated import rmsnorm_fn
    except Exception:
        return None
    return rmsnorm_fn


def _is_hf_mixer(layer: Any) -> bool:
    """A transformers ``Mamba2Mixer`` (same parameter names as upstream, other attribute names)."""
    return all(hasattr(layer, a) for a in ("num_heads", "head_dim", "n_groups", "ssm_state_size", "hidden_size",
                                           "intermediate_size", "conv_kernel_size", "in_proj", "norm"))


def _hf_config(layer: Any) -> dict[str, Any]:
    """Our layer description of a transformers ``Mamba2Mixer``: gated norm after the gate (``norm(y * silu(z))``),
    ``D`` per head, no gated-MLP part (its in_proj splits into z, xBC, dt only)."""
    act = getattr(layer, "activation", "silu")
    if act not in ("silu", "swish"):
        raise StateCompatibilityError(f"layer.activation: expected 'silu', found {act!r}")
    nheads, headdim, d_inner = int(layer.num_heads), int(layer.head_dim), int(layer.intermediate_size)
    if nheads * headdim != d_inner:
        raise StateCompatibilityError(
            f"Mamba2Mixer: expected num_heads * head_dim == intermediate_size, found {nheads} * {headdim} != {d_inner}"
        )
    limit = tuple(getattr(layer, "time_step_limit", _NO_LIMIT))
    return dict(d_model=int(layer.hidden_size), d_inner=d_inner, d_ssm=d_inner, d_state=int(layer.ssm_state_size),
                d_conv=int(layer.conv_kernel_size), headdim=headdim, nheads=nheads, ngroups=int(layer.n_groups),
                rmsnorm=True, norm_before_gate=False, D_has_hdim=False, dt_limit=limit,
                chunk_size=int(layer.chunk_size), layer_idx=layer.layer_idx)


def _norm_params(norm: nn.Module, d_ssm: int) -> tuple[float, int | None, bool]:
    """(eps, group_size, norm_before_gate) of upstream's RMSNormGated, ours, or transformers' MambaRMSNormGated."""
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-5))
    return float(eps), getattr(norm, "group_size", None), bool(getattr(norm, "norm_before_gate", False))


class StatefulMamba2(nn.Module):
    """A Mamba-2 layer whose recurrent state is an explicit input and output.

    Args:
        layer: a ``mamba_ssm.Mamba2`` (single process group; ``activation == "silu"``), or a
            transformers ``Mamba2Mixer`` (same parameter names; its attribute names are mapped).
        state_dtype: dtype of states made by :meth:`new_state` (float32 by default); a state passed in keeps its dtype.
        backend: ``None`` / ``"auto"``, ``"reference"`` or ``"triton"`` (see :mod:`mamba_state.backend`).

    Shapes: ``x`` ``[B, L, d_model]``; ``conv_state`` ``[B, d_ssm + 2*ngroups*d_state, d_conv]`` (the last
    ``d_conv`` conv inputs, oldest first); ``ssm_state`` ``[B, nheads, headdim, d_state]``.
    """

    # the wrapped layer's own parameters and submodules, registered in __init__ / from_config (declared for typing;
    # ``norm`` exists only with rmsnorm: upstream's RMSNormGated, transformers' gated norm or GatedRMSNorm)
    dt_bias: nn.Parameter
    A_log: nn.Parameter
    D: nn.Parameter
    in_proj: nn.Linear
    conv1d: nn.Conv1d
    norm: nn.Module
    out_proj: nn.Linear

    def __init__(self, layer: nn.Module, state_dtype: torch.dtype = torch.float32,
                 backend: str | None = None):
        super().__init__()
        # duck-typed: mamba_ssm's Mamba2 or transformers' Mamba2Mixer, both checked before use
        src: Any = layer
        if _is_hf_mixer(src):
            self._setup(**_hf_config(src), state_dtype=state_dtype, backend=backend)
        else:
            self._check_upstream(src)
            self._setup(
                d_model=int(src.d_model), d_inner=int(src.d_inner), d_ssm=int(src.d_ssm),
                d_state=int(src.d_state), d_conv=int(src.d_conv), headdim=int(src.headdim),
                nheads=int(src.nheads), ngroups=int(src.ngroups), rmsnorm=bool(src.rmsnorm),
                norm_before_gate=bool(src.norm_before_gate), D_has_hdim=bool(src.D_has_hdim),
                dt_limit=tuple(src.dt_limit), chunk_size=int(src.chunk_size), layer_idx=src.layer_idx,
                state_dtype=state_dtype, backend=backend,
            )
        # Same objects under upstream's names, registered in upstream's order (parameters first).
        self.dt_bias = src.dt_bias
        self.A_log = src.A_log
        self.D = src.D
        self.in_proj = src.in_proj
        self.conv1d = src.conv1d
        if self.rmsnorm:
            self.norm = src.norm
        self.out_proj = src.out_proj

    # ------------------------------------------------------------------ construction
    @staticmethod
    def _check_upstream(layer: Any) -> None:
        if not isinstance(layer, nn.Module):
            raise StateCompatibilityError(f"layer: expected a mamba_ssm Mamba2 module, found {type(layer).__name__}")
        needed = ["in_proj", "conv1d", "dt_bias", "A_log", "D", "out_proj", "d_model", "d_inner", "d_ssm",
                  "d_state", "d_conv", "headdim", "nheads", "ngroups", "rmsnorm", "norm_before_gate",
                  "D_has_hdim", "dt_limit", "chunk_size"]
        missing = [a for a in needed if not hasattr(layer, a)]
        if missing:
            raise StateCompatibilityError(
                f"layer: expected a mamba_ssm Mamba2 module, found {type(layer).__name__} without {missing}"
            )
        if getattr(layer, "rmsnorm", False) and not hasattr(layer, "norm"):
            raise StateCompatibilityError("layer: expected a `norm` submodule (rmsnorm=True), found none")
        if getattr(layer, "process_group", None) is not None:
            raise StateCompatibilityError(
                "layer: expected a Mamba2 without a process_group (tensor parallel layers are not supported), "
                f"found process_group={layer.process_group!r}"
            )
        act = getattr(layer, "activation", "silu")
        if act not in ("silu", "swish"):
            raise StateCompatibilityError(f"layer.activation: expected 'silu', found {act!r}")

    def _setup(self, *, d_model, d_inner, d_ssm, d_state, d_conv, headdim, nheads, ngroups, rmsnorm,
               norm_before_gate, D_has_hdim, dt_limit, chunk_size, layer_idx, state_dtype, backend) -> None:
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise StateError(f"state_dtype: expected a floating torch.dtype, found {state_dtype!r}")
        if backend is not None:
            from mamba_state.kernels.backend import requested_backend

            requested_backend(backend)  # validates the name now rather than at the first forward
        self.d_model, self.d_inner, self.d_ssm = d_model, d_inner, d_ssm
        self.d_state, self.d_conv, self.headdim = d_state, d_conv, headdim
        self.nheads, self.ngroups = nheads, ngroups
        self.rmsnorm, self.norm_before_gate, self.D_has_hdim = rmsnorm, norm_before_gate, D_has_hdim
        self.dt_limit = (float(dt_limit[0]), float(dt_limit[1]))
        self.chunk_size = chunk_size
        self.layer_idx = layer_idx
        self.state_dtype = state_dtype
        self.backend = backend
        self.activation = "silu"
        self.d_mlp = d_inner - d_ssm
        self.conv_channels = d_ssm + 2 * ngroups * d_state

    @classmethod
    def from_config(cls, d_model: int, d_state: int = 128, d_conv: int = 4, conv_init: float | None = None,
                    expand: int = 2, headdim: int = 64, d_ssm: int | None = None, ngroups: int = 1,
                    A_init_range: tuple[float, float] = (1, 16), D_has_hdim: bool = False, rmsnorm: bool = True,
                    norm_before_gate: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                    dt_init_floor: float = 1e-4, dt_limit: tuple[float, float] = _NO_LIMIT, bias: bool = False,
                    conv_bias: bool = True, chunk_size: int = 256, use_mem_eff_path: bool = True,
                    layer_idx: int | None = None, process_group: Any = None, sequence_parallel: bool = True,
                    device=None, dtype=None, state_dtype: torch.dtype = torch.float32,
                    backend: str | None = None) -> "StatefulMamba2":
        """A fresh layer with upstream ``Mamba2``'s parameters: names, shapes, dtypes and initialisation.

        Random draws happen in upstream's order, so under one seed the parameters equal upstream's.
        Does not import mamba_ssm. ``use_mem_eff_path`` and ``sequence_parallel`` are accepted (so an upstream
        ``ssm_cfg`` can be passed as is) and change nothing; ``process_group`` must be None.
        """
        if process_group is not None:
            raise StateCompatibilityError(
                f"process_group: expected None (tensor parallel layers are not supported), found {process_group!r}"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        fk = {"device": device, "dtype": dtype}
        d_inner = expand * d_model
        d_ssm_ = d_inner if d_ssm is None else int(d_ssm)
        if d_ssm_ % headdim != 0 or not 0 < d_ssm_ <= d_inner:
            raise StateError(f"d_ssm: expected a multiple of headdim={headdim} in (0, {d_inner}], found {d_ssm_}")
        nheads = d_ssm_ // headdim
        if ngroups < 1 or nheads % ngroups != 0:
            raise StateError(f"ngroups: expected a divisor of nheads={nheads}, found {ngroups}")
        if not (A_init_range[0] > 0 and A_init_range[1] >= A_init_range[0]):
            raise StateError(f"A_init_range: expected 0 < low <= high, found {A_init_range}")
        self._setup(d_model=d_model, d_inner=d_inner, d_ssm=d_ssm_, d_state=d_state, d_conv=d_conv,
                    headdim=headdim, nheads=nheads, ngroups=ngroups, rmsnorm=rmsnorm,
                    norm_before_gate=norm_before_gate, D_has_hdim=D_has_hdim, dt_limit=dt_limit,
                    chunk_size=chunk_size, layer_idx=layer_idx, state_dtype=state_dtype, backend=backend)
        in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **fk)
        conv_dim = self.conv_channels
        conv1d = nn.Conv1d(conv_dim, conv_dim, kernel_size=d_conv, groups=conv_dim, padding=d_conv - 1,
                           bias=conv_bias, **fk)
        if conv_init is not None:
            nn.init.uniform_(conv1d.weight, -conv_init, conv_init)
        # dt = exp(U(log dt_min, log dt_max)) floored, stored as softplus^{-1}(dt)
        dt = torch.exp(torch.rand(nheads, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = torch.clamp(dt, min=dt_init_floor)
        dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(nheads, dtype=torch.float32, device=device).uniform_(*A_init_range)
        A_log = nn.Parameter(torch.log(A).to(dtype=dtype))
        D = nn.Parameter(torch.ones(d_ssm_ if D_has_hdim else nheads, device=device))  # fp32, as upstream
        for p in (dt_bias, A_log, D):
            p._no_weight_decay = True  # type: ignore[attr-defined]  # upstream's ad-hoc optimizer flag
        self.dt_bias, self.A_log, self.D = dt_bias, A_log, D
        self.in_proj = in_proj
        self.conv1d = conv1d
        if rmsnorm:
            self.norm = GatedRMSNorm(d_ssm_, eps=1e-5, group_size=d_ssm_ // ngroups,
                                     norm_before_gate=norm_before_gate, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **fk)
        return self

    # ------------------------------------------------------------------ description and states
    def state_layout(self) -> dict[str, Any]:
        return {"kind": "mamba2", "conv_shape": [self.conv_channels, self.d_conv],
                "ssm_shape": [self.nheads, self.headdim, self.d_state]}

    def new_state(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> MambaInferenceState:
        """A zero state: conv ``[B, conv_channels, d_conv]``, ssm ``[B, nheads, headdim, d_state]``
        (``state_dtype`` and the parameters' device unless given)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise StateError(f"batch_size: expected a positive int, found {batch_size!r}")
        device = self.in_proj.weight.device if device is None else device
        dtype = self.state_dtype if dtype is None else dtype
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise StateError(f"dtype: expected a floating torch.dtype, found {dtype!r}")
        return MambaInferenceState(
            torch.zeros(batch_size, self.conv_channels, self.d_conv, device=device, dtype=dtype),
            torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device, dtype=dtype),
        )

    def resolved_backend(self, device: torch.device | str) -> tuple[str, str]:
        """``("triton" | "reference", why)`` for inputs on ``device`` (Triton also needs mamba_ssm here)."""
        name, why = resolve_backend(device, self.backend)
        if name == "triton" and _upstream_chunk_scan() is None:
            return "reference", "mamba_ssm's Triton SSD kernels are not importable: PyTorch reference path"
        return name, why

    def check_state(self, state: Any, batch_size: int, device: torch.device | str) -> MambaInferenceState:
        """``state`` when it fits this layer (its layout, ``batch_size`` rows, on ``device``), a zero state for
        None; else a :class:`~mamba_state.errors.StateError` subclass naming what was expected and found (the
        one check of a layer state, as ``StatefulMamba.check_state``)."""
        device = torch.device(device)
        if state is None:
            return self.new_state(batch_size, device=device)
        return check_layer_state(state, self.state_layout(), self.layer_idx, batch_size, device)

    def _check_x(self, x: Any, what: str) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise StateError(f"{what}: expected a floating tensor, found {type(x).__name__}")

    # ------------------------------------------------------------------ pieces shared by forward and step
    def _A(self) -> torch.Tensor:
        # [nheads]; at least float32 so a half A_log cannot give -inf (float64 stays float64)
        return -torch.exp(self.A_log.to(torch.promote_types(self.A_log.dtype, torch.float32)))

    def _D(self) -> torch.Tensor:
        return self.D.view(self.nheads, self.headdim) if self.D_has_hdim else self.D

    def _split_in(self, zxbcdt: torch.Tensor):
        g_n = self.ngroups * self.d_state
        return torch.split(zxbcdt, [self.d_mlp, self.d_mlp, self.d_ssm, self.d_ssm + 2 * g_n, self.nheads], dim=-1)

    def _output(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor,
                use_triton: bool) -> torch.Tensor:
        """``y`` ``[..., d_ssm]`` (already gated when not rmsnorm) -> out_proj output ``[..., d_model]``."""
        if self.rmsnorm:
            eps, group_size, before = _norm_params(self.norm, self.d_ssm)
            bias = getattr(self.norm, "bias", None)
            weight = cast(torch.Tensor, self.norm.weight)  # every supported gated norm has a weight parameter
            fn = _upstream_rmsnorm_fn() if use_triton and y.is_cuda else None
            if fn is not None:  # upstream's fused Triton gated norm (same function as its RMSNormGated)
                y = fn(y, weight, bias, z=z, eps=eps, group_size=group_size, norm_before_gate=before)
            else:
                y = gated_rms_norm(y, weight, z, eps, group_size, before, bias)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, state: MambaInferenceState | None = None,
                reset: torch.Tensor | None = None, return_states_at: Any = None,
                cu_seqlens: torch.Tensor | None = None):
        """Run ``x`` ``[B, L, d_model]`` from ``state`` (zeros when None); returns ``(y [B, L, d_model], new state)``.

        ``cu_seqlens``: None, or int32/int64 ``[num_seqs + 1]``: packed sequences (batch 1), one state row per
        sequence in and out; see :meth:`forward_packed`.

        ``reset``: bool ``[B, L]``; True at ``(b, t)`` clears row ``b``'s conv window and SSM state before token
        ``t``. The new state has the input state's dtype (``state_dtype`` when no state is given).

        ``return_states_at``: None, or non-decreasing ints in ``[0, L]``; then ``(y, new_state, states)`` with
        ``states`` a list of :class:`MambaInferenceState`, the state after ``p`` tokens for each ``p`` (0: the
        incoming state; a reset at token ``p`` not applied yet). The SSD scan runs in segments cut at these
        positions, each continuing from the previous segment's final state (no token is processed twice).
        """
        if cu_seqlens is not None:
            return self.forward_packed(x, cu_seqlens, state, reset, return_states_at)
        state, positions = self._check_chunk(x, state, reset, return_states_at)
        return self._forward(x, state, reset, positions)

    def _forward_stacked_states(self, x: torch.Tensor, state: MambaInferenceState | None,
                                reset: torch.Tensor | None, positions: Any):
        """:meth:`forward` with ``return_states_at=positions`` (a non-empty list), the states returned stacked by
        tensor name (``[P, ...]`` each), as traces keep them, without one state object per position."""
        state, checked = self._check_chunk(x, state, reset, positions)
        return self._forward(x, state, reset, checked, stacked=True)

    def _check_chunk(self, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
                     positions: Any) -> tuple[MambaInferenceState | None, list[int] | None]:
        """The checks of an unpacked :meth:`forward`: ``(checked state, checked positions or None)``."""
        self._check_x(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise StateShapeError(f"x: expected [batch, seqlen, {self.d_model}], found {list(x.shape)}")
        bsz, L, _ = x.shape
        state = self.check_state(state, bsz, x.device)
        check_reset(reset, [bsz, L])
        return state, None if positions is None else check_positions(positions, L)

    def _forward(self, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
                 positions: list[int] | None, stacked: bool = False):
        """:meth:`forward` on checked arguments (its caller checked them: forward, or the LM after its
        ``check_state``); ``positions`` a checked list or None; ``stacked``: the states at positions as stacked
        tensors by name (:meth:`_forward_stacked_states`)."""
        bsz, L, _ = x.shape
        if state is None:
            state = self.new_state(bsz, device=x.device)
        if reset is not None:
            reset = reset.to(x.device)
        if L == 0:
            if positions is not None:
                if stacked:
                    at = {k: torch.stack([t] * len(positions)) for k, t in state.tensors.items()}
                    return x.new_zeros(bsz, 0, self.d_model), state, at
                return x.new_zeros(bsz, 0, self.d_model), state, [state for _ in positions]
            return x.new_zeros(bsz, 0, self.d_model), state
        backend, _ = self.resolved_backend(x.device)
        z0, x0, z, xBC, dt = self._split_in(self.in_proj(x))
        conv_in = xBC.transpose(1, 2)
        xBC, conv_state = self._conv(conv_in, state.conv_state, reset, backend == "triton")
        xBC = xBC.transpose(1, 2)
        g_n = self.ngroups * self.d_state
        xs, B, C = torch.split(xBC, [self.d_ssm, g_n, g_n], dim=-1)
        xs = xs.reshape(bsz, L, self.nheads, self.headdim)
        B = B.reshape(bsz, L, self.ngroups, self.d_state)
        C = C.reshape(bsz, L, self.ngroups, self.d_state)
        zh = None if self.rmsnorm else z.reshape(bsz, L, self.nheads, self.headdim)
        def scan(a: int, b: int, h: torch.Tensor):  # tokens a:b from SSM state h
            r = None if reset is None else reset[:, a:b]
            zs = None if zh is None else zh[:, a:b]
            if backend == "triton":
                return self._scan_triton(xs[:, a:b], dt[:, a:b], B[:, a:b], C[:, a:b], zs, h, r)
            return ssd_scan_chunked(xs[:, a:b], dt[:, a:b], self._A(), B[:, a:b], C[:, a:b], D=self._D(), z=zs,
                                    initial_state=h, reset=r, dt_bias=self.dt_bias, dt_softplus=True,
                                    dt_limit=self.dt_limit, return_final_state=True)

        if positions is None:
            y, ssm_state = scan(0, L, state.ssm_state)
        elif use_dense_states(positions, L):  # many positions (full traces): one pass keeping every state
            y, every = self._scan_all_states(xs, dt, B, C, zh, state.ssm_state, reset)
            ssm_state, ssm_at = every[-1], every[positions]
        else:
            y, ssm_state, ssm_at = run_segments(scan, L, positions, state.ssm_state, time_dim=1)
        y = y.reshape(bsz, L, self.d_ssm)
        out = self._output(y, z, z0, x0, backend == "triton")
        new = MambaInferenceState(conv_state.to(state.conv_state.dtype), ssm_state.to(state.ssm_state.dtype))
        if positions is None:
            return out, new
        conv_at = conv_windows_at(state.conv_state, conv_in, positions, reset)
        ssm_at = ssm_at.to(state.ssm_state.dtype)
        if stacked:
            return out, new, {"conv_state": conv_at, "ssm_state": ssm_at}
        # indexed, not unbind(): unbind's outputs are multi-output views that reset_() / zero_() may not modify;
        # rows of tensors shaped from the checked state: no per-position validation
        return out, new, [MambaInferenceState._of_checked(conv_at[i], ssm_at[i]) for i in range(conv_at.shape[0])]

    # ------------------------------------------------------------------ packed sequences
    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, state: MambaInferenceState | None = None,
                       reset: torch.Tensor | None = None, return_states_at: Any = None):
        """:meth:`forward` over packed variable-length sequences: checks, then :meth:`_forward_packed`.

        ``x`` ``[1, total, d_model]`` holds ``num_seqs`` sequences one after another (sequence s is tokens
        ``cu_seqlens[s]:cu_seqlens[s + 1]``, possibly none); ``state`` has one row per sequence (None: zeros);
        ``reset`` ``[1, total]`` still restarts a sequence inside it. Returns ``(y [1, total, d_model], new
        state)`` with one row per sequence: each sequence's outputs, new state and gradients (of the weights and
        of its state row) are those of running it alone from its row. ``return_states_at`` is not supported
        with ``cu_seqlens`` for Mamba-2 (:class:`~mamba_state.errors.StateError`).

        Raises ``StateShapeError`` (nothing computed) for bad boundaries (not int32/int64, not 1-D, not starting
        at 0, decreasing, not ending at ``total``), a batch other than 1, a state whose rows are not num_seqs,
        or a reset that is not ``[1, total]``.
        """
        self._check_x(x, "x")
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise StateShapeError(f"x: expected [1, total, {self.d_model}], found {list(x.shape)}")
        nseq = check_cu_seqlens(cu_seqlens, x.shape[1], x.shape[0])
        if return_states_at is not None:
            raise StateError("return_states_at: not supported with cu_seqlens for Mamba-2 layers (run the packed "
                             "call without it, or the sequences unpacked)")
        if isinstance(state, MambaInferenceState) and state.batch_size != nseq:
            raise StateShapeError(f"state: expected {nseq} rows (one per sequence of cu_seqlens), found "
                                  f"{state.batch_size}")
        fresh = state is None
        state = self.check_state(state, nseq, x.device)
        check_reset(reset, [1, x.shape[1]])
        bounds = [int(v) for v in cu_seqlens.tolist()]
        return self._forward_packed(x, state, reset, bounds, None, fresh=fresh)

    def _forward_packed(self, x: torch.Tensor, state: MambaInferenceState, reset: torch.Tensor | None,
                        bounds: list[int], positions: Any = None, fresh: bool = False):
        """:meth:`forward_packed` on checked arguments (``state`` with one row per sequence, ``bounds``:
        cu_seqlens as a list; the same signature as ``StatefulMamba._forward_packed``, which the LM calls).

        The conv runs through :func:`mamba_state.kernels.causal_conv1d` with ``cu_seqlens`` (its Triton kernels
        on CUDA, one launch). The SSD: on the Triton backend, upstream's native packed path (one call over the
        packed row, sequences as ``seq_idx``, final states by ``return_varlen_states``) when it computes what is
        asked: a fresh state (``fresh``: no state was passed), no resets, no gradients, no empty sequence;
        otherwise :func:`~mamba_state.kernels.ssd.ssd_scan_packed`, a batch of one row per sequence padded to
        the longest, through upstream's ``mamba_chunk_scan_combined`` (initial and final states per row,
        differentiable) on the Triton backend and :func:`ssd_scan_chunked` elsewhere."""
        if positions is not None:
            raise StateError("return_states_at: not supported with cu_seqlens for Mamba-2 layers")
        from mamba_state.kernels.conv1d.launcher import causal_conv1d

        total = x.shape[1]
        if reset is not None:
            reset = reset.to(x.device)
        backend, _ = self.resolved_backend(x.device)
        cu = host_tensor(bounds, torch.int32, x.device)
        z0, x0, z, xBC, dt = self._split_in(self.in_proj(x))
        conv_state = state.conv_state
        xBC, new_conv = causal_conv1d(xBC.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                      conv_state=None if fresh else conv_state, reset=reset, activation="silu",
                                      backend=backend, cu_seqlens=cu, state_dtype=conv_state.dtype)
        xBC = xBC.transpose(1, 2)
        g_n = self.ngroups * self.d_state
        xs, B, C = torch.split(xBC, [self.d_ssm, g_n, g_n], dim=-1)
        xs = xs.reshape(1, total, self.nheads, self.headdim)
        B = B.reshape(1, total, self.ngroups, self.d_state)
        C = C.reshape(1, total, self.ngroups, self.d_state)
        zh = None if self.rmsnorm else z.reshape(1, total, self.nheads, self.headdim)
        h0 = state.ssm_state
        native = (backend == "triton" and fresh and reset is None and total > 0
                  and min(b - a for a, b in zip(bounds[:-1], bounds[1:])) > 0
                  and not (torch.is_grad_enabled() and (x.requires_grad
                                                        or any(t.requires_grad for t in self.parameters()))))
        if native:  # upstream's varlen states have no backward: only without autograd
            y, ssm_state = self._scan_triton_varlen(xs, dt, B, C, zh, cu, bounds)
        else:
            ssd_args = (xs, dt, self._A(), B, C, self._D(), zh, None if fresh else h0, reset, self.dt_bias, True,
                        self.dt_limit, True)
            if backend == "triton":
                y, ssm_state = ssd_scan_packed(*ssd_args, cu_seqlens=cu, scan=self._padded_rows_triton)
            else:
                y, ssm_state = ssd_scan_chunked(*ssd_args, cu_seqlens=cu)
        y = y.reshape(1, total, self.d_ssm)
        out = self._output(y, z, z0, x0, backend == "triton")
        return out, MambaInferenceState(new_conv.to(conv_state.dtype), ssm_state.to(h0.dtype))

    def _padded_rows_triton(self, x, dt, A, B, C, D=None, z=None, initial_state=None, reset=None, dt_bias=None,
                            dt_softplus=False, return_final_state=True):
        """The unpacked scan :func:`ssd_scan_packed` runs over its padded rows, by upstream's Triton kernels:
        ``dt`` arrives processed (so ``dt_bias`` is None and no softplus or limit is applied again), the
        padded steps have dt = 0 (no-ops); resets become ``seq_idx`` per row."""
        scan = _upstream_chunk_scan()
        seq_idx = None if reset is None else torch.cumsum(reset, dim=1, dtype=torch.int32)
        h0 = None if initial_state is None else initial_state.float()
        y, final = scan(x, dt, A, B, C, self.chunk_size, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
                        seq_idx=seq_idx, dt_softplus=dt_softplus, return_final_states=True)
        return y, final

    def _scan_triton_varlen(self, xs, dt, B, C, zh, cu, bounds):
        """Upstream's own packed forward from zero states: the sequences as ``seq_idx`` (sequence ids, so no
        state passes between them), each sequence's final state from ``return_varlen_states``."""
        scan = _upstream_chunk_scan()
        lengths = host_tensor([b - a for a, b in zip(bounds[:-1], bounds[1:])], torch.long, xs.device)
        seq_idx = torch.repeat_interleave(torch.arange(len(bounds) - 1, device=xs.device, dtype=torch.int32),
                                          lengths, output_size=xs.shape[1])[None]
        kwargs = {} if self.dt_limit == _NO_LIMIT else {"dt_limit": self.dt_limit}
        y, varlen_states = scan(xs, dt, self._A(), B, C, self.chunk_size, D=self._D(), z=zh, dt_bias=self.dt_bias,
                                seq_idx=seq_idx, cu_seqlens=cu, dt_softplus=True, return_varlen_states=True,
                                **kwargs)
        return y, varlen_states

    def _scan_all_states(self, xs, dt, B, C, zh, h0, reset):
        """The SSD recurrence as a Mamba-1 scan over ``nheads * headdim`` channels, keeping every state.

        ``(y [B, L, nheads, headdim], states [L + 1, B, nheads, headdim, d_state])``: each head's scalar decay and
        step are repeated over its channels, each channel reads its head's group of B and C.
        """
        bsz, L, h, p = xs.shape
        d, n = h * p, self.d_state
        ct = torch.float64 if torch.float64 in (xs.dtype, dt.dtype, h0.dtype) else torch.float32
        dtc = F.softplus(dt.to(ct) + self.dt_bias.to(ct))
        if self.dt_limit != _NO_LIMIT:
            dtc = dtc.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        u = xs.reshape(bsz, L, d).transpose(1, 2)
        delta = dtc.repeat_interleave(p, dim=2).transpose(1, 2)  # [B, d, L]
        A = self._A().to(ct).repeat_interleave(p)[:, None].expand(d, n)
        D = self._D().to(ct)
        D = D.reshape(d) if D.dim() == 2 else D.repeat_interleave(p)
        z = None if zh is None else zh.reshape(bsz, L, d).transpose(1, 2)
        y, every = selective_scan_all_states(u, delta, A, B.permute(0, 2, 3, 1), C.permute(0, 2, 3, 1), D, z,
                                             initial_state=h0.reshape(bsz, d, n).to(ct), reset=reset)
        return y.transpose(1, 2).reshape(bsz, L, h, p), every.view(L + 1, bsz, h, p, n)

    def _conv(self, xt: torch.Tensor, conv_state: torch.Tensor, reset: torch.Tensor | None, use_cuda_conv: bool):
        """Causal depthwise conv + silu of ``xt`` ``[B, C, L]`` continuing ``conv_state`` ``[B, C, d_conv]``.

        Returns ``(out [B, C, L] in xt.dtype, new window [B, C, d_conv] in conv_state.dtype)``. On CUDA without
        resets, the ``causal_conv1d`` package (when installed) computes the output from the last ``d_conv - 1``
        inputs of the window; the new window is a slice either way.
        """
        fn = _causal_conv1d_fn() if (use_cuda_conv and reset is None and xt.is_cuda and 2 <= self.d_conv <= 4
                                     and self.conv_channels % 8 == 0
                                     and xt.dtype in (torch.float32, torch.float16, torch.bfloat16)) else None
        if fn is None:
            return causal_conv1d_ref(xt, self.conv1d.weight, self.conv1d.bias, conv_state=conv_state, reset=reset,
                                     activation="silu")
        W = self.d_conv
        if not (xt.stride(1) == 1 and xt.stride(2) % 8 == 0 and xt.stride(0) % 8 == 0
                and xt.storage_offset() % 8 == 0):
            xt = xt.transpose(1, 2).contiguous().transpose(1, 2)  # channel-last, aligned: its kernel's layout
        # causal_conv1d wants its initial window channel-last in memory, in the input's dtype
        init = conv_state[:, :, 1:].to(xt.dtype).transpose(1, 2).contiguous().transpose(1, 2)
        out = fn(xt, self.conv1d.weight.view(self.conv_channels, W), self.conv1d.bias, initial_states=init,
                 activation="silu")
        L = xt.shape[-1]
        if L >= W:
            window = xt[:, :, L - W:].to(conv_state.dtype)
        else:
            window = torch.cat([conv_state[:, :, L:], xt.to(conv_state.dtype)], dim=-1)
        return out, window

    def _scan_triton(self, xs, dt, B, C, zh, ssm_state, reset):
        """Upstream's fused SSD: resets become ``seq_idx`` segment ids (initial state = segment 0)."""
        scan = _upstream_chunk_scan()
        seq_idx = None if reset is None else torch.cumsum(reset, dim=1, dtype=torch.int32)
        kwargs = {} if self.dt_limit == _NO_LIMIT else {"dt_limit": self.dt_limit}
        y, final = scan(xs, dt, self._A(), B, C, self.chunk_size, D=self._D(), z=zh, dt_bias=self.dt_bias,
                        initial_states=ssm_state.float(), seq_idx=seq_idx, dt_softplus=True,
                        return_final_states=True, **kwargs)
        return y, final

    # ------------------------------------------------------------------ one token
    def step(self, x_t: torch.Tensor, state: MambaInferenceState | None = None,
             reset: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaInferenceState]:
        """One token: ``x_t`` ``[B, 1, d_model]`` or ``[B, d_model]`` -> ``(y_t`` shaped like ``x_t``, new state).

        Pure function of its inputs (the given state is not modified; differentiable). ``state``: the state before
        the token; ``None`` starts from a fresh zero state (:meth:`new_state`), as ``StatefulMamba.step`` does.
        ``reset``: optional bool ``[B]``, clears those rows' state before the token.
        """
        self._check_x(x_t, "x_t")
        squeeze = x_t.dim() == 3
        if squeeze and (x_t.shape[1] != 1 or x_t.shape[2] != self.d_model) or (
                not squeeze and (x_t.dim() != 2 or x_t.shape[-1] != self.d_model)):
            raise StateShapeError(
                f"x_t: expected [batch, 1, {self.d_model}] or [batch, {self.d_model}], found {list(x_t.shape)}"
            )
        u = x_t[:, 0] if squeeze else x_t
        state = self.check_state(state, u.shape[0], u.device)
        check_reset(reset, [u.shape[0]])
        return self._step(x_t, state, reset)

    def _step(self, x_t: torch.Tensor, state: MambaInferenceState,
              reset: torch.Tensor | None) -> tuple[torch.Tensor, MambaInferenceState]:
        """:meth:`step` on checked arguments (``state`` not None)."""
        squeeze = x_t.dim() == 3
        u = x_t[:, 0] if squeeze else x_t
        bsz = u.shape[0]
        conv_prev, ssm_prev = state.conv_state, state.ssm_state
        if reset is not None:
            keep = (~reset.to(u.device)).to(conv_prev.dtype)
            conv_prev = conv_prev * keep[:, None, None]
            ssm_prev = ssm_prev * keep[:, None, None, None]
        backend, _ = self.resolved_backend(u.device)
        z0, x0, z, xBC, dt = self._split_in(self.in_proj(u))
        ct = torch.float64 if torch.float64 in (u.dtype, conv_prev.dtype, ssm_prev.dtype) else torch.float32
        # conv: shift the window left by one and append this token's input
        window = torch.cat([conv_prev[:, :, 1:], xBC[:, :, None].to(conv_prev.dtype)], dim=-1)
        w = self.conv1d.weight[:, 0] if self.conv1d.weight.dim() == 3 else self.conv1d.weight
        xc = (window.to(ct) * w.to(ct)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.to(ct)
        xc = F.silu(xc)
        g_n = self.ngroups * self.d_state
        xs, B, C = torch.split(xc, [self.d_ssm, g_n, g_n], dim=-1)
        xs = xs.view(bsz, self.nheads, self.headdim)
        rep = self.nheads // self.ngroups
        B = B.view(bsz, self.ngroups, self.d_state).repeat_interleave(rep, dim=1)  # [B, h, n]
        C = C.view(bsz, self.ngroups, self.d_state).repeat_interleave(rep, dim=1)
        dtv = F.softplus(dt.to(ct) + self.dt_bias.to(ct))  # [B, h]
        if self.dt_limit != _NO_LIMIT:
            dtv = dtv.clamp(min=self.dt_limit[0], max=self.dt_limit[1])
        dA = torch.exp(dtv * self._A().to(ct))
        new_ssm = (dA[:, :, None, None] * ssm_prev.to(ct)
                   + (dtv[:, :, None] * xs)[..., None] * B[:, :, None, :])  # [B, h, p, n]
        y = (new_ssm * C[:, :, None, :]).sum(-1)
        D = self._D().to(ct)
        y = y + xs * (D[:, None] if D.dim() == 1 else D)
        if not self.rmsnorm:
            y = y * F.silu(z.to(ct).view(bsz, self.nheads, self.headdim))
        y = y.reshape(bsz, self.d_ssm).to(u.dtype)
        out = self._output(y, z, z0, x0, backend == "triton")
        new = MambaInferenceState(window.to(state.conv_state.dtype), new_ssm.to(state.ssm_state.dtype))
        return (out[:, None] if squeeze else out), new

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ssm={self.d_ssm}, nheads={self.nheads}, headdim={self.headdim}, "
                f"d_state={self.d_state}, ngroups={self.ngroups}, d_conv={self.d_conv}, layer_idx={self.layer_idx}")
