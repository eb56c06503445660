"""Mamba initialisations that can hold a memory over long horizons (options; the defaults are upstream's).

A Mamba-1 channel ``c`` keeps ``exp(dt_c(t) * A_cn)`` of state ``n`` per step, with ``dt = softplus(dt_proj(x) +
bias)`` and ``A = -exp(A_log)``. Holding a bit for ``H`` steps needs ``dt * |A| <~ 1 / H`` on the distractor
steps. Upstream's initialisation draws ``dt`` log-uniformly in ``[1e-3, 1e-1]`` (floored at ``1e-4``) and sets
``|A_cn| = n`` for ``n = 1 .. d_state``, so the slowest state of the slowest channel starts with a memory of about
1,000 steps and most channels with 10-100: fine for language, two orders of magnitude short of ``H = 20,000``.

The options here re-initialise the parameters of layers built by :meth:`StatefulMamba.from_config
<mamba_state.adapters.mamba.StatefulMamba.from_config>` (nothing in the layer's computation changes):

* ``dt_init_floor`` (upstream's argument, passed through): with ``dt_min`` below 1e-4 the log-uniform range
  really reaches it (upstream clamps at 1e-4);
* ``dt_bias_init="chrono"``: the *chrono initialisation* of Tallec & Ollivier (ICLR 2018, "Can recurrent neural
  networks warp time?") carried over to Mamba's step size: each channel's characteristic time ``1 / dt_c`` is
  drawn uniformly in ``[1, T_max]`` (they draw LSTM forget-gate biases as ``log U[1, T_max - 1]`` so that the
  forgetting times cover the range of dependencies the task has), i.e. ``dt_c = 1 / U[1, T_max]``; the CLI
  takes ``T_max = horizon + 2`` unless told;
* ``a_init="memory"``: a fraction of the channels gets ``A`` such that their per-step retention at the initial
  ``dt`` is drawn uniformly on a ring ``[r_min, r_max]`` close to 1, as the LRU's eigenvalue initialisation of
  Orvieto et al. (ICML 2023, "Resurrecting recurrent neural networks for long sequences": ``|lambda|``
  uniform in ``[r_min, r_max]``, e.g. 0.9-0.999 for long-range tasks): ``|A_cn| = -log(r_cn) / dt_c``. The
  other channels keep upstream's ``A``, so the layer keeps its fast channels too.

Each is tested on the delayed-recall task at short horizons on the CPU (tests/test_rl_memory.py); docs/rl.md
has the results and what was not measured.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ..errors import StateError

__all__ = ["MEMORY_DEFAULTS", "check_memory_options", "apply_memory_init", "step_retention", "memory_steps"]

# The policy's keyword arguments for these options and their defaults (upstream's initialisation).
MEMORY_DEFAULTS: dict[str, Any] = {"dt_init_floor": 1e-4, "dt_bias_init": "upstream", "chrono_tmax": None,
                                   "a_init": "upstream", "memory_fraction": 0.5,
                                   "memory_retention": (0.999, 0.99999)}


def check_memory_options(dt_init_floor: float = 1e-4, dt_bias_init: str = "upstream", chrono_tmax: Any = None,
                         a_init: str = "upstream", memory_fraction: float = 0.5,
                         memory_retention: Any = (0.999, 0.99999)) -> None:
    """Raise :class:`~mamba_state.errors.StateError` naming the bad option, else nothing."""
    if not (isinstance(dt_init_floor, (int, float)) and 0 < float(dt_init_floor) < 1):
        raise StateError(f"dt_init_floor: expected a float in (0, 1), found {dt_init_floor!r}")
    if dt_bias_init not in ("upstream", "chrono"):
        raise StateError(f"dt_bias_init: expected 'upstream' or 'chrono', found {dt_bias_init!r}")
    if dt_bias_init == "chrono" and not (isinstance(chrono_tmax, (int, float)) and float(chrono_tmax) > 1):
        raise StateError(f"chrono_tmax: expected a number > 1 with dt_bias_init='chrono', found {chrono_tmax!r}")
    if a_init not in ("upstream", "memory"):
        raise StateError(f"a_init: expected 'upstream' or 'memory', found {a_init!r}")
    if not (isinstance(memory_fraction, (int, float)) and 0 < float(memory_fraction) <= 1):
        raise StateError(f"memory_fraction: expected a float in (0, 1], found {memory_fraction!r}")
    try:
        r_min, r_max = (float(r) for r in memory_retention)
    except (TypeError, ValueError):
        raise StateError(f"memory_retention: expected two floats (r_min, r_max), found {memory_retention!r}") from None
    if not 0 < r_min <= r_max < 1:
        raise StateError(f"memory_retention: expected 0 < r_min <= r_max < 1, found {memory_retention!r}")


def _inverse_softplus(dt: torch.Tensor) -> torch.Tensor:
    return dt + torch.log(-torch.expm1(-dt))  # upstream's formula (exact inverse of softplus)


@torch.no_grad()
def apply_memory_init(layer: Any, dt_bias_init: str = "upstream", chrono_tmax: float | None = None,
                      a_init: str = "upstream", memory_fraction: float = 0.5,
                      memory_retention: Any = (0.999, 0.99999), **_: Any) -> None:
    """Re-initialise ``layer.dt_proj.bias`` and/or ``layer.A_log`` of one Mamba-1 layer in place (see the module
    docstring). Draws from torch's global generator only for the options that are on, so the defaults draw
    nothing and leave upstream's initialisation as it was."""
    if dt_bias_init == "chrono":
        assert chrono_tmax is not None  # checked by check_memory_options
        bias = layer.dt_proj.bias
        tau = 1 + torch.rand(bias.shape, dtype=torch.float32, device=bias.device) * (float(chrono_tmax) - 1)
        bias.copy_(_inverse_softplus(1.0 / tau).to(bias.dtype))
    if a_init == "memory":
        d_inner, d_state = layer.A_log.shape
        count = max(1, int(round(float(memory_fraction) * d_inner)))
        chosen = torch.randperm(d_inner, device=layer.A_log.device)[:count]
        r_min, r_max = (float(r) for r in memory_retention)
        r = r_min + torch.rand(count, d_state, device=layer.A_log.device) * (r_max - r_min)
        dt = F.softplus(layer.dt_proj.bias.float()[chosen])[:, None]
        layer.A_log[chosen] = torch.log(-torch.log(r) / dt).to(layer.A_log.dtype)


def step_retention(layer: Any) -> torch.Tensor:
    """Per-step retention ``exp(-softplus(bias) * exp(A_log))`` of every (channel, state) at the bias's ``dt``
    (the input's part of ``dt`` left out), ``[d_inner, d_state]``: what the options above set."""
    dt = F.softplus(layer.dt_proj.bias.detach().float())[:, None]
    return torch.exp(-dt * torch.exp(layer.A_log.detach().float()))


def memory_steps(retention: torch.Tensor) -> torch.Tensor:
    """Steps until a state keeps ``1/e`` of itself, ``-1 / log(retention)``."""
    return -1.0 / torch.log(retention.clamp(max=1 - 1e-12))

