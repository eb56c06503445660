"""``StatefulMamba``: an upstream Mamba-1 layer's parameters run through an explicit-state path.

The adapter registers the *same* submodules and parameters as the upstream layer, under upstream's names
(``in_proj``, ``conv1d``, ``x_proj``, ``dt_proj``, ``out_proj``, ``A_log``, ``D``), so its ``state_dict()`` keys
equal upstream's and ``load_state_dict`` works in both directions. Nothing is copied or patched and the upstream
module itself is never registered (it stays exactly as it was).

State (a :class:`~mamba_state.state.MambaInferenceState`, fp32 by default):

* ``conv_state`` ``[B, d_inner, d_conv]``: the last ``d_conv`` conv *inputs*, oldest first, exactly as upstream's
  ``Mamba.step`` keeps it (so states are interchangeable with upstream's ``InferenceParams`` caches);
* ``ssm_state`` ``[B, d_inner, d_state]``.

Math per chunk (as upstream's forward): ``x, z = in_proj(u)``; ``x = silu(causal_conv1d(x))`` continuing the
window; ``dt, B, C = x_proj(x)``; ``dt = dt_proj.weight @ dt``; selective scan with ``A = -exp(A_log)``,
``D``, gate ``z``, ``delta_bias = dt_proj.bias``, softplus, continuing the SSM state; ``out_proj``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from mamba_state.kernels.dispatch import DeviceOps, device_ops
from mamba_state.kernels.conv1d.naive import causal_conv1d_ref
from mamba_state.kernels.scan_positions import check_positions, conv_windows_at, run_segments, use_dense_states
from mamba_state.kernels.selective_scan.all_states import selective_scan_all_states
from mamba_state.kernels.selective_scan.packed import check_varlen_positions, seq_bounds

from ..errors import StateCompatibilityError, StateError, StateShapeError
from ..state import MambaInferenceState
from ._state_checks import check_layer_state, check_reset

__all__ = ["StatefulMamba", "Mamba1Parameters"]

_SHARED_MODULES = ("in_proj", "conv1d", "x_proj", "dt_proj", "out_proj")
_SHARED_PARAMS = ("A_log", "D")
# the scan's positional arguments (u, delta, A, B, C, D)
_ScanArgs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _weight_matmul(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``weight [out, in] @ x [B, in, L] -> [B, out, L]`` (contiguous) as one strided-batched GEMM.

    ``torch.matmul`` of a 2-D weight with a 3-D tensor folds the batch into the rows of a token-major product
    and copies it back into channel-major order; broadcasting the weight with a zero batch stride lets the GEMM
    write channel-major directly."""
    return torch.bmm(weight.expand(x.shape[0], -1, -1), x)


def _fast_conv(xs, ops: DeviceOps) -> bool:
    """Whether the Triton conv serves (forward and backward): Triton backend, half/float32 inputs."""
    return ops.triton and xs.dtype != torch.float64


def _channel_major(x: torch.Tensor, ops: DeviceOps, positions: list[int] | None) -> bool:
    """Whether a chunk runs the training layout (:meth:`StatefulMamba._forward_channel_major`): autograd records
    and the Triton kernels serve (they read channel-major activations in place)."""
    return torch.is_grad_enabled() and positions is None and ops.triton and x.dtype != torch.float64


class Mamba1Parameters(nn.Module):
    """The parameters of an upstream ``mamba_ssm.Mamba`` layer, built without importing mamba_ssm.

    Same names, shapes, dtypes and initialisation as upstream (in the same order of random draws, so that with
    one seed both give identical tensors). Used by :meth:`StatefulMamba.from_config`; not a runnable layer.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 layer_idx: int | None = None, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.layer_idx = layer_idx
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **fk)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -std, std)
        else:
            raise StateError(f"dt_init: expected 'random' or 'constant', found {dt_init!r}")
        # dt bias: softplus(bias) log-uniform in [dt_min, dt_max]; stored as softplus's inverse
        dt = torch.exp(torch.rand(self.d_inner, **fk) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # fp32 whatever dtype is, as upstream
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)


class StatefulMamba(nn.Module):
    """A Mamba-1 layer with explicit state in and out, sharing an upstream layer's parameters.

    Args:
        layer: an upstream ``mamba_ssm.Mamba`` (or anything with its submodules: transformers' ``MambaMixer``,
            :class:`Mamba1Parameters`). Sizes are read from the parameter shapes.
        state_dtype: dtype of new states (float32 by default). A state passed in keeps its own dtypes.
        backend: ``None``/``"auto"``, ``"reference"`` or ``"triton"`` (see :mod:`mamba_state.backend`).
        layer_idx: overrides ``layer.layer_idx``.
    """

    # the upstream layer's own submodules and parameters, registered by setattr in __init__ (declared for typing)
    in_proj: nn.Linear
    conv1d: nn.Conv1d
    x_proj: nn.Linear
    dt_proj: nn.Linear
    out_proj: nn.Linear
    A_log: nn.Parameter
    D: nn.Parameter

    def __init__(self, layer: nn.Module, state_dtype: torch.dtype = torch.float32, backend: str | None = None,
                 layer_idx: int | None = None):
        super().__init__()
        missing = [n for n in _SHARED_MODULES + _SHARED_PARAMS if not hasattr(layer, n)]
        if missing:
            raise StateCompatibilityError(
                f"layer: expected a Mamba-1 layer with {list(_SHARED_MODULES + _SHARED_PARAMS)}, found "
                f"{type(layer).__name__} without {missing}"
            )
        if hasattr(layer, "nheads") or not isinstance(layer.A_log, torch.Tensor) or layer.A_log.dim() != 2:
            raise StateCompatibilityError(
                f"layer: expected a Mamba-1 layer (A_log [d_inner, d_state]), found {type(layer).__name__}; "
                "wrap Mamba-2 layers with StatefulMamba2"
            )
        if not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
            raise StateError(f"state_dtype: expected a floating torch.dtype, found {state_dtype!r}")
        for name in _SHARED_MODULES:  # the very same modules: parameters shared, names as upstream
            setattr(self, name, getattr(layer, name))
        for name in _SHARED_PARAMS:
            setattr(self, name, getattr(layer, name))
        act = getattr(layer, "activation", "silu")
        if act not in ("silu", "swish"):
            raise StateCompatibilityError(f"layer activation: expected 'silu', found {act!r}")
        self.d_model = int(self.in_proj.in_features)
        self.d_inner = int(self.in_proj.out_features) // 2
        self.d_state = int(self.A_log.shape[1])
        self.d_conv = int(self.conv1d.kernel_size[0])
        self.dt_rank = int(self.dt_proj.in_features)
        checks = {
            "conv1d.weight": (list(self.conv1d.weight.shape), [self.d_inner, 1, self.d_conv]),
            "x_proj.weight": (list(self.x_proj.weight.shape), [self.dt_rank + 2 * self.d_state, self.d_inner]),
            "dt_proj.weight": (list(self.dt_proj.weight.shape), [self.d_inner, self.dt_rank]),
            "A_log": (list(self.A_log.shape), [self.d_inner, self.d_state]),
            "D": (list(self.D.shape), [self.d_inner]),
            "out_proj.weight": (list(self.out_proj.weight.shape), [self.d_model, self.d_inner]),
        }
        for name, (found, expected) in checks.items():
            if found != expected:
                raise StateCompatibilityError(f"layer {name}: expected shape {expected}, found {found}")
        if self.dt_proj.bias is None:
            raise StateCompatibilityError("layer dt_proj: expected a bias (upstream's delta_bias), found none")
        self.layer_idx = layer_idx if layer_idx is not None else getattr(layer, "layer_idx", None)
        self.state_dtype = state_dtype
        self.backend = backend

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                    dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                    dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                    layer_idx: int | None = None, device: Any = None, dtype: torch.dtype | None = None,
                    state_dtype: torch.dtype = torch.float32, backend: str | None = None,
                    use_fast_path: bool = True) -> "StatefulMamba":
        """A new layer with upstream ``Mamba(...)``'s parameters, names and initialisation (no mamba_ssm needed).

        ``use_fast_path`` is accepted (and ignored) so that upstream ``ssm_cfg`` dicts can be passed as they are.
        """
        params = Mamba1Parameters(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init, dt_scale,
                                  dt_init_floor, conv_bias, bias, layer_idx, device, dtype)
        return cls(params, state_dtype=state_dtype, backend=backend)

    # ------------------------------------------------------------------ state description
    def state_layout(self) -> dict[str, Any]:
        return {"kind": "mamba1", "conv_shape": [self.d_inner, self.d_conv], "ssm_shape": [self.d_inner, self.d_state]}

    def new_state(self, batch_size: int, device: Any = None, dtype: torch.dtype | None = None) -> MambaInferenceState:
        """A zero state: conv ``[B, d_inner, d_conv]``, ssm ``[B, d_inner, d_state]`` (``state_dtype`` by default)."""
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise StateError(f"batch_size: expected a positive int, found {batch_size!r}")
        device = self.in_proj.weight.device if device is None else device
        dtype = self.state_dtype if dtype is None else dtype
        return MambaInferenceState(
            torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype),
            torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=dtype),
        )

    def check_state(self, state: Any, batch_size: int, device: torch.device | str) -> MambaInferenceState:
        """``state`` when it fits this layer (its layout, ``batch_size`` rows, on ``device``), a zero state for
        None; else a :class:`~mamba_state.errors.StateError` subclass naming what was expected and found. The one
        check of a layer state: :meth:`forward` and :meth:`step` run it, and ``StatefulMambaLM.check_state`` runs
        it for every layer before the LM calls the unchecked internals."""
        device = torch.device(device)
        if state is None:
            return self.new_state(batch_size, device=device)
        return check_layer_state(state, self.state_layout(), self.layer_idx, batch_size, device)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model or x.shape[1] < 1:
            found = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise StateShapeError(f"x: expected [batch, seqlen >= 1, d_model={self.d_model}], found {found}")

    # ------------------------------------------------------------------ chunked forward
    def forward(self, x: torch.Tensor, state: MambaInferenceState | None = None,
                reset: torch.Tensor | None = None, return_states_at: Any = None,
                cu_seqlens: torch.Tensor | None = None):
        """Run a chunk from ``state`` (zeros when None).

        Args:
            x: ``[B, L, d_model]`` in the parameters' dtype.
            state: the state before ``x``; not modified.
            reset: bool ``[B, L]``; True at ``t`` makes row ``b`` start afresh at token ``t``.
            return_states_at: None, or non-decreasing ints in ``[0, L]``: also return the state after ``p``
                tokens of this chunk for each ``p`` (0: ``state`` itself; a reset at token ``p`` is not applied
                yet). On Triton the scan stores them in its one pass; elsewhere it runs in segments cut at these
                positions (no token is processed twice either way).
            cu_seqlens: None, or int32/int64 ``[num_seqs + 1]``: ``x`` is ``[1, total, d_model]`` holding
                ``num_seqs`` sequences packed one after another (sequence ``s`` is tokens
                ``cu_seqlens[s]:cu_seqlens[s + 1]``, possibly none), and ``state`` has one row per sequence
                (zeros when None). Each sequence runs exactly as it would alone from its own row; the new state
                has one row per sequence. ``reset`` is ``[1, total]``; ``return_states_at`` is then one list of
                positions per sequence (token counts within it) and ``states`` one list per sequence of
                batch-1 states. See :meth:`forward_packed`.

        Returns:
            ``(y [B, L, d_model], new_state)``; the new state has the incoming state's dtypes. With
            ``return_states_at``: ``(y, new_state, states)``, ``states`` a list of :class:`MambaInferenceState`
            (one per position, the incoming state's dtypes; differentiable).
        """
        if cu_seqlens is not None:
            return self.forward_packed(x, cu_seqlens, state, reset, return_states_at)
        state, positions = self._check_chunk(x, state, reset, return_states_at)
        return self._forward(x, state, reset, positions)

    def _forward_stacked_states(self, x: torch.Tensor, state: MambaInferenceState | None,
                                reset: torch.Tensor | None, positions: Any):
        """:meth:`forward` with ``return_states_at=positions`` (a non-empty list), the states returned stacked:
        ``(y, new_state, {"conv_state": [P, B, d_inner, d_conv], "ssm_state": [P, B, d_inner, d_state]})``.
        What a trace keeps, without building one state object per position (for a full trace of 2048 tokens
        those cost tens of ms of host time)."""
        state, checked = self._check_chunk(x, state, reset, positions)
        return self._forward(x, state, reset, checked, stacked=True)

    def _check_chunk(self, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
                     positions: Any) -> tuple[MambaInferenceState | None, list[int] | None]:
        """The checks of an unpacked :meth:`forward`: ``(checked state or None, checked positions or None)``."""
        self._check_input(x)
        batch, seqlen, _ = x.shape
        checked = None if positions is None else check_positions(positions, seqlen)
        if state is not None:
            state = self.check_state(state, batch, x.device)
        check_reset(reset, [batch, seqlen])
        return state, checked

    def _forward(self, x: torch.Tensor, state: MambaInferenceState | None, reset: torch.Tensor | None,
                 positions: list[int] | None, stacked: bool = False):
        """:meth:`forward` on checked arguments (its caller checked them: forward, or the LM after its
        ``check_state``); ``positions`` a checked list or None; ``stacked``: the states at positions as stacked
        tensors by name (:meth:`_forward_stacked_states`)."""
        ops = device_ops(x.device, self.backend)  # which kernels this call runs, decided once
        batch, seqlen, _ = x.shape
        if state is None and (positions is not None or self.state_dtype == torch.float64):
            state = self.new_state(batch, device=x.device)
        # else zeros, never materialised: the conv and the scan start from zeros themselves (a float64 zero state
        # is materialised because it makes the reference path compute in float64)
        if reset is not None:
            reset = reset.to(x.device)
        if _channel_major(x, ops, positions):
            return self._forward_channel_major(x, state, reset, ops)
        # Channel-major layout throughout ([B, channels, L], what the scan takes): strided-batched GEMMs of the
        # (broadcast) weight against the transposed input write it directly, so no activation is copied.
        xt = x.transpose(1, 2)  # [B, d_model, L] (a view)
        w_in = self.in_proj.weight
        xs = _weight_matmul(w_in[: self.d_inner], xt)  # [B, d_inner, L], contiguous
        z = _weight_matmul(w_in[self.d_inner:], xt)
        if self.in_proj.bias is not None:
            xs = xs + self.in_proj.bias[: self.d_inner, None]
            z = z + self.in_proj.bias[self.d_inner:, None]
        conv_in = xs
        xs, conv_state = self._conv(xs, None if state is None else state.conv_state, reset, ops)
        x_dbl = _weight_matmul(self.x_proj.weight, xs)  # [B, dt_rank + 2*d_state, L]
        # B and C stay views of x_dbl (time stride 1, which is all the scan needs): no copies
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = _weight_matmul(self.dt_proj.weight, dt)  # [B, d_inner, L]; the bias goes in as delta_bias
        ct = _compute_dtype(x)
        A = -torch.exp(self.A_log.to(ct))
        # without autograd the scan reads the bias in its own dtype (a half -> float32 cast is exact): no cast op
        dt_bias = self.dt_proj.bias if not torch.is_grad_enabled() else self.dt_proj.bias.to(ct)
        args = (xs, dt, A, B, C, self.D.to(ct))
        kwargs = dict(z=z, delta_bias=dt_bias, delta_softplus=True)
        h0 = None if state is None else state.ssm_state
        if positions is None:
            y, last = ops.selective_scan(*args, **kwargs, return_last_state=True, initial_state=h0, reset=reset)
        else:
            assert state is not None  # materialised above whenever positions are asked for
            y, last, ssm_at = self._scan_segments(ops, args, kwargs, state.ssm_state, reset, positions)
        # token-major [B, L, d_model], contiguous: the GEMM reads y transposed instead of copying it
        out = torch.bmm(y.transpose(1, 2), self.out_proj.weight.t().expand(batch, -1, -1))
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        new = MambaInferenceState(conv_state, last.to(self.state_dtype if h0 is None else h0.dtype))
        if positions is None:
            return out, new
        assert state is not None
        conv_at = conv_windows_at(state.conv_state, conv_in, positions, reset)
        if ssm_at.dtype != state.ssm_state.dtype:
            ssm_at = ssm_at.to(state.ssm_state.dtype)
        if stacked:
            return out, new, {"conv_state": conv_at, "ssm_state": ssm_at}
        # rows of tensors shaped from the checked state: no per-position validation. With autograd recording,
        # indexed: unbind's outputs are then multi-output views that reset_() / zero_() may not modify; without
        # (inference), unbind: two calls instead of one per position and tensor, and its views may be modified
        if torch.is_grad_enabled():
            rows = [(conv_at[i], ssm_at[i]) for i in range(conv_at.shape[0])]
        else:
            rows = list(zip(conv_at.unbind(0), ssm_at.unbind(0)))
        return out, new, [MambaInferenceState._of_checked(c, h) for c, h in rows]

    def _forward_channel_major(self, x: torch.Tensor, state: MambaInferenceState | None,
                               reset: torch.Tensor | None, ops: DeviceOps):
        """:meth:`_forward` in the training layout (as upstream's ``mamba_inner_fn``): every activation between
        the projections is channel-major, ``[channels, batch * L]`` in memory, seen as ``[batch, channels, L]``
        with time stride 1. Each projection is then one plain GEMM of the weight against the tokens (no
        broadcast-weight batched GEMM, whose weight gradient is a batch of GEMMs and a sum), and its backward
        is plain GEMMs too; the conv and the scan read and write that layout in place. Everything after
        ``in_proj`` is one autograd Function (:mod:`mamba_state.adapters.mamba_inner`) that keeps what upstream
        keeps and recomputes the conv output, dt and the gated output in the backward."""
        from mamba_state.kernels._launch import default_chunk

        from .mamba_inner import mamba_inner

        batch, seqlen, _ = x.shape
        tokens = x.reshape(batch * seqlen, self.d_model)
        xz = torch.mm(self.in_proj.weight, tokens.t())  # [2 * d_inner, batch * L]
        if self.in_proj.bias is not None:
            xz = xz + self.in_proj.bias[:, None]
        h0 = None if state is None else state.ssm_state
        out, conv_state, last = mamba_inner(xz, self, None if state is None else state.conv_state, h0, reset,
                                            batch, seqlen, default_chunk(seqlen))
        new = MambaInferenceState(conv_state, last.to(self.state_dtype if h0 is None else h0.dtype))
        return out.view(batch, seqlen, self.d_model), new

    def _scan_segments(self, ops: DeviceOps, args: _ScanArgs, kwargs: dict[str, Any], initial_state: torch.Tensor,
                       reset: torch.Tensor | None, positions: list[int]):
        """The scan with the states at ``positions``: ``(y, last, states [P, B, d_inner, d_state])``. On Triton the
        kernels store them in their one pass (kernels/selective_scan/positions.py); elsewhere the scan is cut at
        the positions (see scan_positions), or one pass keeps every state for many dense positions."""
        L = args[0].shape[-1]
        if ops.triton:
            return ops.selective_scan(*args, **kwargs, return_last_state=True, initial_state=initial_state,
                                      reset=reset, return_states_at=positions)
        if use_dense_states(positions, L):  # many positions (full traces): one pass keeping every state
            h0 = initial_state.to(_compute_dtype(args[0]))
            y, every = selective_scan_all_states(*args, **kwargs, initial_state=h0, reset=reset)
            return y, every[-1], every[positions]

        def part(t, a, b):
            return t[..., a:b] if t is not None and t.dim() == 3 else t

        def run(a, b, h):
            seg_args = [part(t, a, b) for t in args]
            seg_kwargs = {k: part(v, a, b) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            return ops.selective_scan(*seg_args, **seg_kwargs, return_last_state=True, initial_state=h,
                                      reset=None if reset is None else reset[:, a:b])

        return run_segments(run, L, positions, initial_state, time_dim=-1)

    def _conv(self, xs: torch.Tensor, conv_state: torch.Tensor | None, reset: torch.Tensor | None, ops: DeviceOps):
        """silu(causal depthwise conv) continuing ``conv_state`` (zeros when None, the new window then in
        ``state_dtype``); returns ``(out [B, d_inner, L], new conv_state)``.

        With the Triton backend, its conv (forward and backward; resets and the window in the kernels). Otherwise,
        with resets, the reference function (windows cleared per row); without, one ``F.conv1d`` in the input's
        dtype over the last ``d_conv - 1`` state inputs followed by the chunk (accumulation is float32 inside
        PyTorch's kernels for half inputs, as in upstream's causal-conv1d).
        """
        if _fast_conv(xs, ops):
            return ops.causal_conv1d(xs, self.conv1d.weight, self.conv1d.bias, conv_state=conv_state, reset=reset,
                                     activation="silu", state_dtype=self.state_dtype)
        if conv_state is None:
            conv_state = torch.zeros(xs.shape[0], self.d_inner, self.d_conv, device=xs.device, dtype=self.state_dtype)
        if reset is not None:
            return causal_conv1d_ref(xs, self.conv1d.weight, self.conv1d.bias, conv_state=conv_state, reset=reset,
                                     activation="silu")
        W, L = self.d_conv, xs.shape[-1]
        full = torch.cat([conv_state[:, :, 1:].to(xs.dtype), xs], dim=-1)  # [B, d_inner, W - 1 + L]
        out = F.silu(F.conv1d(full, self.conv1d.weight.to(xs.dtype), None if self.conv1d.bias is None
                              else self.conv1d.bias.to(xs.dtype), groups=self.d_inner))
        if L >= W:
            new = xs[:, :, L - W:]
        else:  # the window keeps W - L older inputs from the state
            new = torch.cat([conv_state[:, :, L:], xs.to(conv_state.dtype)], dim=-1)
        return out, new.to(conv_state.dtype).contiguous()

    # ------------------------------------------------------------------ packed sequences
    def forward_packed(self, x: torch.Tensor, cu_seqlens: torch.Tensor, state: MambaInferenceState | None = None,
                       reset: torch.Tensor | None = None, return_states_at: Any = None):
        """:meth:`forward` over packed variable-length sequences (``cu_seqlens``, batch 1): checks, then
        :meth:`_forward_packed`. Returns ``(y [1, total, d_model], new_state [num_seqs rows])``, plus the states
        at positions (one list per sequence of batch-1 :class:`MambaInferenceState`) when asked."""
        self._check_input(x)
        bounds = seq_bounds(cu_seqlens, x.shape[1], x.shape[0])
        nseq = len(bounds) - 1
        positions = None if return_states_at is None else check_varlen_positions(return_states_at, bounds)
        if state is not None and isinstance(state, MambaInferenceState) and state.batch_size != nseq:
            raise StateShapeError(f"state: expected {nseq} rows (one per sequence of cu_seqlens), found "
                                  f"{state.batch_size}")
        state = self.check_state(state, nseq, x.device)
        check_reset(reset, [1, x.shape[1]])
        return self._forward_packed(x, state, reset, bounds, positions)

    packed_states_at = True  # _forward_packed takes states at positions per sequence (the LM checks this)

    def _forward_packed(self, x: torch.Tensor, state: MambaInferenceState, reset: torch.Tensor | None,
                        bounds: list[int], positions: list[list[int]] | None, fresh: bool = False):
        """:meth:`forward_packed` on checked arguments: ``state`` has one row per sequence, ``bounds`` is
        ``cu_seqlens`` as a list. The math of :meth:`_forward` in its inference layout (channel-major
        activations; autograd records through the scan's and conv's own backward passes), with the conv run per
        sequence (:meth:`_conv_packed`) and one packed scan."""
        from mamba_state.kernels.selective_scan.launcher import selective_scan_fn

        ops = device_ops(x.device, self.backend)
        if reset is not None:
            reset = reset.to(x.device)
        cu = torch.tensor(bounds, dtype=torch.int32)  # checked; the kernels read it on the host
        xt = x.transpose(1, 2)
        w_in = self.in_proj.weight
        xs = _weight_matmul(w_in[: self.d_inner], xt)  # [1, d_inner, total]
        z = _weight_matmul(w_in[self.d_inner:], xt)
        if self.in_proj.bias is not None:
            xs = xs + self.in_proj.bias[: self.d_inner, None]
            z = z + self.in_proj.bias[self.d_inner:, None]
        conv_in = xs
        xs, conv_state = self._conv_packed(xs, state.conv_state, reset, cu, ops)
        x_dbl = _weight_matmul(self.x_proj.weight, xs)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=1)
        dt = _weight_matmul(self.dt_proj.weight, dt)
        ct = _compute_dtype(x)
        A = -torch.exp(self.A_log.to(ct))
        dt_bias = self.dt_proj.bias if not torch.is_grad_enabled() else self.dt_proj.bias.to(ct)
        h0 = state.ssm_state
        res = selective_scan_fn(xs, dt, A, B, C, self.D.to(ct), z=z, delta_bias=dt_bias, delta_softplus=True,
                                return_last_state=True, initial_state=h0, reset=reset, backend=ops.backend,
                                cu_seqlens=cu, return_states_at=positions)
        y, last = res[0], res[1]
        out = torch.bmm(y.transpose(1, 2), self.out_proj.weight.t().expand(1, -1, -1))
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        new = MambaInferenceState(conv_state, last.to(h0.dtype))
        if positions is None:
            return out, new
        ssm_at = res[2]
        states_at = []
        for s, ps in enumerate(positions):  # the conv windows of each sequence at its own positions
            a, b = bounds[s], bounds[s + 1]
            conv_at = conv_windows_at(state.conv_state[s:s + 1], conv_in[:, :, a:b], ps,
                                      None if reset is None else reset[:, a:b])
            states_at.append([MambaInferenceState(conv_at[i], ssm_at[s][i:i + 1].to(h0.dtype))
                              for i in range(len(ps))])
        return out, new, states_at

    def _conv_packed(self, xs: torch.Tensor, conv_state: torch.Tensor, reset: torch.Tensor | None,
                     cu: torch.Tensor, ops: DeviceOps) -> tuple[torch.Tensor, torch.Tensor]:
        """silu(causal conv) of packed sequences, each continuing its own row of ``conv_state`` ``[num_seqs,
        d_inner, d_conv]``: ``(out [1, d_inner, total], new windows [num_seqs, d_inner, d_conv])``, through the
        conv's packed path (``causal_conv1d(..., cu_seqlens=)``, one launch)."""
        return ops.causal_conv1d(xs, self.conv1d.weight, self.conv1d.bias, conv_state=conv_state, reset=reset,
                                 activation="silu", cu_seqlens=cu)

    # ------------------------------------------------------------------ one token
    def step(self, x_t: torch.Tensor, state: MambaInferenceState | None = None,
             reset: torch.Tensor | None = None) -> tuple[torch.Tensor, MambaInferenceState]:
        """One token, as upstream's ``Mamba.step`` (but returning a new state; ``state`` is not modified).

        Args:
            x_t: ``[B, 1, d_model]`` or ``[B, d_model]``.
            state: the state before the token (zeros when None).
            reset: optional bool ``[B]``: rows that start afresh at this token.

        Returns:
            ``(y_t, new_state)`` with ``y_t`` shaped like ``x_t``.
        """
        if not isinstance(x_t, torch.Tensor) or x_t.dim() not in (2, 3) or x_t.shape[-1] != self.d_model or (
                x_t.dim() == 3 and x_t.shape[1] != 1):
            found = list(x_t.shape) if isinstance(x_t, torch.Tensor) else type(x_t).__name__
            raise StateShapeError(f"x_t: expected [batch, 1, {self.d_model}] or [batch, {self.d_model}], found {found}")
        u = x_t if x_t.dim() == 2 else x_t[:, 0]
        state = self.check_state(state, u.shape[0], u.device)
        check_reset(reset, [u.shape[0]])
        return self._step(x_t, state, reset)

    def _step(self, x_t: torch.Tensor, state: MambaInferenceState,
              reset: torch.Tensor | None) -> tuple[torch.Tensor, MambaInferenceState]:
        """:meth:`step` on checked arguments (``state`` not None)."""
        squeeze = x_t.dim() == 2
        u = x_t if squeeze else x_t[:, 0]
        conv_prev, ssm_prev = state.conv_state, state.ssm_state
        if reset is not None:
            keep = (~reset.to(u.device)).view(-1, 1, 1)
            conv_prev, ssm_prev = conv_prev * keep, ssm_prev * keep
        xz = self.in_proj(u)
        xs, z = xz.chunk(2, dim=-1)  # [B, d_inner]
        conv_state = torch.cat([conv_prev[:, :, 1:], xs.unsqueeze(-1).to(conv_prev.dtype)], dim=-1)
        w = self.conv1d.weight[:, 0]
        ct = _compute_dtype(u)
        xc = (conv_state.to(ct) * w.to(ct)).sum(-1)
        if self.conv1d.bias is not None:
            xc = xc + self.conv1d.bias.to(ct)
        xc = F.silu(xc).to(u.dtype)
        x_db = self.x_proj(xc)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.to(ct))
        ssm = ssm_prev.clone()
        ops = device_ops(u.device, self.backend)
        y = ops.selective_state_update(ssm, xc, dt, A, B, C, self.D.to(ct), z=z, dt_bias=self.dt_proj.bias.to(ct),
                                       dt_softplus=True)
        out = self.out_proj(y)
        return (out if squeeze else out.unsqueeze(1)), MambaInferenceState(conv_state, ssm)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, layer_idx={self.layer_idx}, state_dtype={self.state_dtype}")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (exact tests), else float32 (upstream computes A, D and dt's bias in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
