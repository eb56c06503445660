"""Recurrent actor-critic policies with per-environment state resets: ``MambaPolicy`` and ``GRUPolicy``.

Both share one interface, so PPO treats them alike:

* ``initial_state(batch_size, device=None)`` -> a *policy state*: a tuple of tensors, each with the batch
  (environment) dimension first, all zeros;
* ``step(obs [N, O], state, reset [N] bool)`` -> ``(logits [N, A], value [N], new_state)``, one time step
  (rollout collection);
* ``forward_sequence(obs [N, T, O], state, reset [N, T] bool)`` -> ``(logits [N, T, A], value [N, T],
  new_state)``, a whole training sequence replayed from a stored state (PPO's update).

``reset[b, t] = True`` means observation ``t`` of row ``b`` is the first of a new episode: that row's recurrent
state is cleared just before step ``t``, so nothing flows from one episode into the next. States passed in are
never modified. Helpers :func:`select_state`, :func:`detach_state`, :func:`clone_state` work on any policy state.

Float32 throughout (states included).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from ..errors import StateError, StateShapeError

if TYPE_CHECKING:
    from ..adapters.mamba import StatefulMamba

__all__ = ["RecurrentPolicy", "MambaPolicy", "GRUPolicy", "PolicyState", "select_state", "detach_state",
           "clone_state", "count_parameters", "make_policy"]

PolicyState = tuple  # tuple[torch.Tensor, ...], batch dimension first


def select_state(state: PolicyState, index: torch.Tensor | slice) -> PolicyState:
    """The rows ``index`` (LongTensor or slice over the batch) of every tensor of a policy state."""
    return tuple(t[index] for t in state)


def detach_state(state: PolicyState) -> PolicyState:
    return tuple(t.detach() for t in state)


def clone_state(state: PolicyState) -> PolicyState:
    return tuple(t.clone() for t in state)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _init_heads(actor: nn.Linear, critic: nn.Linear) -> None:
    # Small actor weights give a near-uniform first policy (exploration); unit-scale critic.
    nn.init.orthogonal_(actor.weight, gain=0.01)
    nn.init.zeros_(actor.bias)
    nn.init.orthogonal_(critic.weight, gain=1.0)
    nn.init.zeros_(critic.bias)


class RecurrentPolicy(nn.Module):
    """Common checks and the actor/critic heads. Subclasses implement ``_core_step`` and ``_core_sequence``."""

    def __init__(self, observation_size: int, num_actions: int, feature_size: int):
        super().__init__()
        if observation_size < 1 or num_actions < 2:
            raise StateError(f"policy: expected observation_size >= 1 and num_actions >= 2, found "
                             f"{observation_size} and {num_actions}")
        self.observation_size = int(observation_size)
        self.num_actions = int(num_actions)
        self.actor = nn.Linear(feature_size, num_actions)
        self.critic = nn.Linear(feature_size, 1)
        _init_heads(self.actor, self.critic)

    def _heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.actor(h), self.critic(h).squeeze(-1)

    def _check(self, obs: torch.Tensor, reset: torch.Tensor, seq: bool) -> None:
        rank = 3 if seq else 2
        if not isinstance(obs, torch.Tensor) or obs.dim() != rank or obs.shape[-1] != self.observation_size:
            found: object = list(obs.shape) if isinstance(obs, torch.Tensor) else type(obs).__name__
            want = "[N, T, O]" if seq else "[N, O]"
            raise StateShapeError(f"obs: expected {want} with O = {self.observation_size}, found {found}")
        if not isinstance(reset, torch.Tensor) or reset.dtype != torch.bool or reset.shape != obs.shape[:-1]:
            found = f"{reset.dtype} {list(reset.shape)}" if isinstance(reset, torch.Tensor) else type(reset).__name__
            raise StateShapeError(f"reset: expected a bool tensor {list(obs.shape[:-1])}, found {found}")

    def step(self, obs: torch.Tensor, state: PolicyState, reset: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, PolicyState]:
        """One step for ``N`` environments: ``obs`` float ``[N, O]``, ``reset`` bool ``[N]``.

        Returns ``(logits [N, A], value [N], new_state)``.
        """
        self._check(obs, reset, seq=False)
        h, new_state = self._core_step(obs, state, reset)
        logits, value = self._heads(h)
        return logits, value, new_state

    def forward_sequence(self, obs: torch.Tensor, state: PolicyState, reset: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor, PolicyState]:
        """A sequence: ``obs`` float ``[N, T, O]`` from ``state``, ``reset`` bool ``[N, T]``.

        Returns ``(logits [N, T, A], value [N, T], final_state)``.
        """
        self._check(obs, reset, seq=True)
        h, new_state = self._core_sequence(obs, state, reset)
        logits, value = self._heads(h)
        return logits, value, new_state

    forward = forward_sequence

    def collect_step(self, obs: torch.Tensor, state: PolicyState, reset: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, PolicyState]:
        """:meth:`step` as the graph-ready collection runs it (:mod:`mamba_state.rl.collect`): the same result,
        built only from ops a CUDA graph can hold (no host synchronisation). The default is :meth:`step`."""
        return self.step(obs, state, reset)

    def _core_step(self, obs, state, reset):  # pragma: no cover - abstract
        raise NotImplementedError

    def _core_sequence(self, obs, state, reset):  # pragma: no cover - abstract
        raise NotImplementedError

    def initial_state(self, batch_size: int, device: Any = None) -> PolicyState:  # pragma: no cover - abstract
        raise NotImplementedError


class MambaPolicy(RecurrentPolicy):
    """A small stack of Mamba-1 layers (``StatefulMamba.from_config``) with pre-norm residual blocks.

    ``obs -> Linear(O, d_model) -> [x + Mamba(LayerNorm(x))] * num_layers -> LayerNorm -> actor, critic``.

    Policy state: ``(conv_0, ssm_0, conv_1, ssm_1, ...)`` with ``conv_i [N, d_inner, d_conv]`` and
    ``ssm_i [N, d_inner, d_state]`` (float32), the layers' :class:`~mamba_state.state.MambaInferenceState`
    tensors. ``forward_sequence`` runs each layer over the whole sequence in one chunked call with the reset
    mask; ``step`` runs each layer's one-token update.

    Args:
        backend: the scan backend of the layers (``None``/``"auto"``, ``"reference"``, ``"triton"``).
        dt_min, dt_max: range of the initial step sizes (upstream's initialisation: log-uniform); a channel
            keeps ``exp(A * dt)`` of its state per step, so a smaller range starts with longer memory.
        dt_init_floor: upstream's clamp of the initial step sizes (1e-4; lower it to let ``dt_min`` go below).
        dt_bias_init, chrono_tmax, a_init, memory_fraction, memory_retention: initialisations for long memory
            (:mod:`mamba_state.rl.memory`; the defaults keep upstream's).
    """

    def __init__(self, observation_size: int, num_actions: int, d_model: int = 64, num_layers: int = 2,
                 d_state: int = 16, d_conv: int = 4, expand: int = 2, backend: str | None = None,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 dt_bias_init: str = "upstream", chrono_tmax: float | None = None, a_init: str = "upstream",
                 memory_fraction: float = 0.5, memory_retention: Any = (0.999, 0.99999)):
        from ..adapters.mamba import StatefulMamba
        from .memory import apply_memory_init, check_memory_options

        memory = {"dt_bias_init": dt_bias_init, "chrono_tmax": chrono_tmax, "a_init": a_init,
                  "memory_fraction": memory_fraction, "memory_retention": memory_retention}
        check_memory_options(dt_init_floor, **memory)
        super().__init__(observation_size, num_actions, d_model)
        self.d_model = d_model
        self.embed = nn.Linear(observation_size, d_model)
        self.norms = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_layers))
        self.layers = nn.ModuleList(
            StatefulMamba.from_config(d_model, d_state=d_state, d_conv=d_conv, expand=expand, layer_idx=i,
                                      backend=backend, dt_min=dt_min, dt_max=dt_max, dt_init_floor=dt_init_floor)
            for i in range(num_layers))
        for layer in self.layers:  # re-initialisations for long memory (mamba_state.rl.memory); off by default
            apply_memory_init(layer, **memory)
        self.final_norm = nn.LayerNorm(d_model)

    def initial_state(self, batch_size: int, device: Any = None) -> PolicyState:
        device = self.embed.weight.device if device is None else device
        out: list[torch.Tensor] = []
        for layer in self._mamba_layers():
            s = layer.new_state(batch_size, device=device)
            out += [s.conv_state, s.ssm_state]
        return tuple(out)

    def _mamba_layers(self) -> list[StatefulMamba]:
        return list(self.layers)  # type: ignore[arg-type]  # a ModuleList of StatefulMamba, typed as Module

    def _layer_states(self, state: PolicyState) -> list:
        from ..state import MambaInferenceState

        if not isinstance(state, tuple) or len(state) != 2 * len(self.layers):
            raise StateError(f"MambaPolicy state: expected a tuple of {2 * len(self.layers)} tensors, found "
                             f"{type(state).__name__} of length {len(state) if isinstance(state, tuple) else '-'}")
        return [MambaInferenceState(state[2 * i], state[2 * i + 1]) for i in range(len(self.layers))]

    def _core_step(self, obs, state, reset):
        states = self._layer_states(state)
        x = self.embed(obs)
        new: list[torch.Tensor] = []
        for norm, layer, s in zip(self.norms, self._mamba_layers(), states):
            y, s = layer.step(norm(x), s, reset=reset)
            x = x + y
            new += [s.conv_state, s.ssm_state]
        return self.final_norm(x), tuple(new)

    def _core_sequence(self, obs, state, reset):
        states = self._layer_states(state)
        x = self.embed(obs)
        new: list[torch.Tensor] = []
        for norm, layer, s in zip(self.norms, self._mamba_layers(), states):
            y, s = layer(norm(x), s, reset=reset)
            x = x + y
            new += [s.conv_state, s.ssm_state]
        return self.final_norm(x), tuple(new)


class GRUPolicy(RecurrentPolicy):
    """A GRU actor-critic: ``obs -> Linear(O, embed_size) -> GRU(hidden_size, num_layers) -> actor, critic``.

    Policy state: ``(h,)`` with ``h [N, num_layers, hidden_size]`` float32. ``step`` zeroes the hidden state
    of reset rows before the step; ``forward_sequence`` cuts each row at its resets into segments and runs
    all segments as one ``nn.GRU`` call on a right-padded batch (cuDNN on CUDA). The default sizes give a
    parameter count within 10% of :class:`MambaPolicy`'s defaults (about 67k on the delayed-recall task).
    """

    def __init__(self, observation_size: int, num_actions: int, hidden_size: int = 120, num_layers: int = 1,
                 embed_size: int = 64):
        super().__init__(observation_size, num_actions, hidden_size)
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.embed = nn.Linear(observation_size, embed_size)
        self.gru = nn.GRU(embed_size, hidden_size, num_layers=num_layers, batch_first=True)

    def initial_state(self, batch_size: int, device: Any = None) -> PolicyState:
        device = self.embed.weight.device if device is None else device
        return (torch.zeros(batch_size, self.num_layers, self.hidden_size, device=device),)

    def _h(self, state: PolicyState) -> torch.Tensor:
        if not isinstance(state, tuple) or len(state) != 1 or state[0].dim() != 3:
            raise StateError(f"GRUPolicy state: expected (h [N, {self.num_layers}, {self.hidden_size}],), found "
                             f"{type(state).__name__}")
        return state[0]

    def _one(self, x_t: torch.Tensor, h: torch.Tensor, reset_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = h * (~reset_t).to(h.dtype)[:, None, None]
        y, h_new = self.gru(x_t[:, None], h.transpose(0, 1).contiguous())
        return y[:, 0], h_new.transpose(0, 1)

    def _core_step(self, obs, state, reset):
        y, h = self._one(self.embed(obs), self._h(state), reset)
        return y, (h,)

    def collect_step(self, obs: torch.Tensor, state: PolicyState, reset: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, PolicyState]:
        """One step through ``torch.gru_cell`` per layer with the GRU's own weights: on the CPU bit-identical to
        :meth:`step` (``nn.GRU`` over one step; tested), on CUDA the fused GRU-cell kernel rather than cuDNN's
        RNN (equal up to float rounding), which a CUDA graph can capture."""
        self._check(obs, reset, seq=False)
        h0 = self._h(state)
        h = h0 * (~reset).to(h0.dtype)[:, None, None]
        x = self.embed(obs)
        layers = []
        for i in range(self.num_layers):
            g = self.gru
            x = torch.gru_cell(x, h[:, i], getattr(g, f"weight_ih_l{i}"), getattr(g, f"weight_hh_l{i}"),
                               getattr(g, f"bias_ih_l{i}"), getattr(g, f"bias_hh_l{i}"))
            layers.append(x)
        logits, value = self._heads(x)
        return logits, value, (torch.stack(layers, dim=1),)

    def _core_sequence(self, obs, state, reset):
        # Cut every row at its resets into independent segments and run them all through ONE nn.GRU call on a
        # right-padded batch (cuDNN on CUDA), instead of a Python loop over time steps: at horizon 1000 the loop
        # was about 2000 small calls per minibatch, forward and backward. Padding after a segment's end does not
        # change its outputs. (Not a PackedSequence: on CPU its backward was ~50x slower than the padded one.)
        # Each segment starts from the given state (a row's first segment, unless reset at t = 0) or zeros.
        x = self.embed(obs)
        h0 = self._h(state)
        n, t_len = reset.shape
        starts = reset.clone()
        starts[:, 0] = True
        row, start = starts.nonzero(as_tuple=True)  # row-major: segments ordered by row, then time
        same_row_next = torch.cat([row[1:] == row[:-1], row.new_zeros(1, dtype=torch.bool)])
        end = torch.where(same_row_next, torch.roll(start, -1), torch.full_like(start, t_len))
        length = end - start
        max_len = int(length.max())
        offsets = torch.arange(max_len, device=obs.device)
        pos = (start[:, None] + offsets).clamp(max=t_len - 1)  # [S, max_len]; past a segment's end: padding
        xs = x[row[:, None], pos]
        carry = ((start == 0) & ~reset[row, 0]).to(h0.dtype)[:, None, None]
        hs = (h0[row] * carry).transpose(0, 1).contiguous()  # [layers, S, hidden]
        window = self._time_window(xs.shape[0])
        outs = self._gru_windows(xs, hs, window)  # one call unless the input is too large for cuDNN
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # [S, max_len, hidden]
        seg = starts.flatten().long().cumsum(0).view(n, t_len) - 1  # the segment of every (row, t)
        out = y[seg, torch.arange(t_len, device=obs.device)[None, :] - start[seg]]
        last = (~same_row_next).nonzero(as_tuple=True)[0]  # each row's last segment, rows in order
        if self.num_layers == 1:  # the output at a segment's last valid step is its hidden state
            h_last = y[last, length[last] - 1][:, None, :]
        else:  # lower layers' states at each row's end: rerun the last segments packed (forward is cheap)
            h_last = self._last_hidden_packed(xs[last], hs[:, last].contiguous(), length[last], window)
        return out, (h_last,)

    # cuDNN's RNN fails with an illegal memory access once one call's activations pass 2^31 elements (seen on
    # the H200 at 128 sequences x 40,000 steps x 120 hidden); a call covers at most this many (sequence, step,
    # gate-or-hidden, layer) elements, and longer inputs run in time windows with the hidden state carried.
    max_call_elements = 1 << 30

    def _time_window(self, sequences: int) -> int:
        """The most time steps per ``nn.GRU`` call for ``sequences`` sequences (at least 1)."""
        return max(1, self.max_call_elements // max(1, sequences * 4 * self.hidden_size * self.num_layers))

    def _gru_windows(self, xs: torch.Tensor, hs: torch.Tensor, window: int) -> list[torch.Tensor]:
        """``nn.GRU`` over ``xs [S, T, E]`` from ``hs [layers, S, hidden]`` in windows of ``window`` steps, the
        hidden state carried between them (the same recurrence as one call). Returns the windows' outputs."""
        outs = []
        for a in range(0, xs.shape[1], window):
            y, hs = self.gru(xs[:, a:a + window], hs)
            outs.append(y)
        return outs

    def _last_hidden_packed(self, xs: torch.Tensor, hs: torch.Tensor, length: torch.Tensor, window: int
                            ) -> torch.Tensor:
        """Every layer's hidden state after ``length[i]`` steps of ``xs[i]`` (``[S, T, E]``, right-padded) from
        ``hs [layers, S, hidden]``: packed GRU calls of at most ``window`` steps, each over the sequences still
        running. Returns ``[S, layers, hidden]``."""
        from torch.nn.utils.rnn import pack_padded_sequence

        length_cpu = length.cpu()
        h = hs
        for a in range(0, int(length_cpu.max()), window):
            active = (length_cpu > a).nonzero(as_tuple=True)[0]
            steps = (length_cpu[active] - a).clamp(max=window)
            rows = active.to(xs.device)
            packed = pack_padded_sequence(xs[rows, a:a + window], steps, batch_first=True, enforce_sorted=False)
            _, h_n = self.gru(packed, h[:, rows].contiguous())
            h = h.index_copy(1, rows, h_n)
        return h.transpose(0, 1)


def make_policy(controller: str, observation_size: int, num_actions: int, **kwargs: Any) -> RecurrentPolicy:
    """``"mamba"`` -> :class:`MambaPolicy`, ``"gru"`` -> :class:`GRUPolicy` (kwargs go to the constructor)."""
    if controller == "mamba":
        return MambaPolicy(observation_size, num_actions, **kwargs)
    if controller == "gru":
        return GRUPolicy(observation_size, num_actions, **kwargs)
    raise StateError(f"controller: expected 'mamba' or 'gru', found {controller!r}")


def state_rows(state: Sequence[torch.Tensor]) -> int:
    """The batch size of a policy state."""
    return int(state[0].shape[0])
