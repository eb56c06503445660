"""Plots of traced states (matplotlib, the optional ``viz`` extra; imported on first use).

* :func:`plot_ssm_heatmap` — SSM state values over time for chosen channels (every state dimension of each).
* :func:`plot_state_norms` — L2 norms of the conv (Mamba-3: key and value) and SSM states of every layer over time.
* :func:`plot_state_pca` — the state trajectory projected on its first 2 or 3 principal components (numpy SVD).

Each takes a :class:`~mamba_state.trace.LayerTrace` (or a :class:`~mamba_state.trace.ModelTrace` where noted),
returns a ``matplotlib.figure.Figure`` and, given ``path``, also writes it there as a PNG. Figures are built on
the Agg canvas directly (no ``pyplot``, no display, no global figure registry), so they work headless and in
threads; Jupyter still shows a returned Figure.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from .errors import StateCompatibilityError, StateError

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

    from .trace import LayerTrace, ModelTrace

__all__ = ["plot_ssm_heatmap", "plot_state_norms", "plot_state_pca", "save_figure"]


def _new_figure(width: float, height: float) -> "Figure":
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("mamba_state.viz needs matplotlib: pip install 'mamba-state[viz]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: "Figure", path: str | os.PathLike, dpi: int = 110) -> str:
    """Write ``fig`` as a PNG at ``path`` (parent folders created); returns the path as a string."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def _check_batch(n: int, batch: int) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or not 0 <= batch < n:
        raise StateError(f"batch: expected a row in [0, {n}), found {batch!r}")


def _rows(trace: "LayerTrace", batch: int, which: str) -> np.ndarray:
    """``[T, channels, d_state]`` (ssm) or ``[T, channels, d_conv]`` (conv) of one batch row, float64."""
    if which not in ("ssm", "conv"):
        raise StateError(f"which: expected 'ssm' or 'conv', found {which!r}")
    states = trace.ssm_states if which == "ssm" else trace.conv_states
    if states is None:
        raise StateCompatibilityError(f"which: expected 'ssm' for a Mamba-3 layer, which has no conv, found "
                                      f"{which!r}")
    _check_batch(states.shape[1], batch)
    s = states[:, batch].detach().double().cpu().numpy()
    return s.reshape(s.shape[0], -1, s.shape[-1])  # Mamba-2 [T, h, p, n] -> [T, h*p, n]


def _edges(positions: Sequence[int]) -> np.ndarray:
    """Cell edges around each position (midpoints between neighbours), for pcolormesh on uneven positions."""
    p = np.asarray(positions, dtype=np.float64)
    if len(p) == 1:
        return np.array([p[0] - 0.5, p[0] + 0.5])
    mid = (p[1:] + p[:-1]) / 2
    return np.concatenate([[p[0] - (mid[0] - p[0])], mid, [p[-1] + (p[-1] - mid[-1])]])


def _layer_name(trace: "LayerTrace") -> str:
    return f"layer {trace.layer_idx}" if trace.layer_idx is not None else "layer"


def plot_ssm_heatmap(trace: "LayerTrace", channels: Sequence[int] | None = None, batch: int = 0,
                     path: str | os.PathLike | None = None, title: str | None = None) -> "Figure":
    """Heatmap of SSM state values over time: one row per (channel, state dimension), one column per position.

    Args:
        trace: a :class:`LayerTrace` with at least one state row.
        channels: channel indices (Mamba-2: ``head * headdim + p``); default the first ``min(4, channels)``.
        batch: which batch row.
        path: also write the figure there as a PNG.
        title: figure title (default names the layer, channels and batch row).
    """
    s = _rows(trace, batch, "ssm")  # [T, C, N]
    T, nch, N = s.shape
    if T == 0:
        raise StateError("trace: expected at least one state row to plot, found none")
    chans = list(range(min(4, nch))) if channels is None else [int(c) for c in channels]
    if not chans or any(not 0 <= c < nch for c in chans):
        raise StateError(f"channels: expected a non-empty list of channels in [0, {nch}), found {channels!r}")
    data = s[:, chans, :].reshape(T, len(chans) * N).T  # [rows, T]
    vmax = float(np.abs(data).max()) or 1.0
    fig = _new_figure(8.0, 1.2 + 0.12 * data.shape[0] + 1.0)
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(_edges(trace.positions), np.arange(data.shape[0] + 1), data, cmap="RdBu_r",
                         vmin=-vmax, vmax=vmax, shading="flat")
    ax.set_yticks([i * N + N / 2 for i in range(len(chans))], [f"ch {c}" for c in chans])
    for i in range(1, len(chans)):
        ax.axhline(i * N, color="black", linewidth=0.6)
    ax.invert_yaxis()
    ax.set_xlabel("tokens processed (position)")
    ax.set_ylabel(f"channel (each band: state dims 0..{N - 1})")
    fig.colorbar(mesh, ax=ax, label="SSM state value")
    ax.set_title(title or f"SSM state over time, {_layer_name(trace)}, batch row {batch}")
    if path is not None:
        save_figure(fig, path)
    return fig


def _layer_traces(trace: Any) -> dict[Any, "LayerTrace"]:
    if hasattr(trace, "layers") and isinstance(trace.layers, Mapping):
        return dict(trace.layers)
    if isinstance(trace, Mapping):
        return dict(trace)
    if hasattr(trace, "ssm_states"):
        return {trace.layer_idx: trace}
    raise StateError(f"trace: expected a LayerTrace, a ModelTrace or a dict of LayerTraces, found "
                     f"{type(trace).__name__}")


def plot_state_norms(trace: "LayerTrace | ModelTrace | Mapping[int, LayerTrace]", batch: int = 0,
                     path: str | os.PathLike | None = None, title: str | None = None) -> "Figure":
    """L2 norms of the conv and SSM states over time, one line per layer (two panels). A Mamba-3 layer has no
    conv: its top-panel line is the norm of its last token's key and value (``k_state`` and ``v_state`` together).

    Args:
        trace: a :class:`ModelTrace`, a :class:`LayerTrace` or ``{layer_idx: LayerTrace}`` (string keys are used
            as line labels, in their order: e.g. one layer traced over several inputs).
        batch: which batch row.
        path: also write the figure there as a PNG.
    """
    layers = _layer_traces(trace)
    if not layers:
        raise StateError("trace: expected at least one layer, found none")
    fig = _new_figure(8.0, 5.5)
    ax_conv, ax_ssm = fig.subplots(2, 1, sharex=True)
    keys = list(layers) if any(isinstance(k, str) for k in layers) else sorted(layers, key=lambda k: (k is None, k))
    for idx in keys:
        t = layers[idx]
        _check_batch(t.ssm_states.shape[1], batch)
        label = idx if isinstance(idx, str) else (f"layer {idx}" if idx is not None else "layer")
        if t.conv_states is None:  # Mamba-3
            top = (t.norms("k_state") ** 2 + t.norms("v_state") ** 2).sqrt()
        else:
            top = t.conv_norms()
        ax_conv.plot(t.positions, top[:, batch].numpy(), label=label, linewidth=1.2)
        ax_ssm.plot(t.positions, t.ssm_norms()[:, batch].numpy(), label=label, linewidth=1.2)
    m3 = [layers[k].conv_states is None for k in keys]
    ax_conv.set_ylabel("conv state L2 norm" if not any(m3) else
                       "k/v state L2 norm" if all(m3) else "conv / k,v state L2 norm")
    ax_ssm.set_ylabel("SSM state L2 norm")
    ax_ssm.set_xlabel("tokens processed (position)")
    ax_conv.set_title("conv window" if not any(m3) else "last key and value (Mamba-3)" if all(m3)
                      else "conv window (Mamba-1/2), last key and value (Mamba-3)")
    ax_ssm.set_title("SSM state")
    if len(layers) <= 12:
        ax_ssm.legend(fontsize="small", ncols=min(4, len(layers)))
    fig.suptitle(title or f"State norms over time, batch row {batch}")
    if path is not None:
        save_figure(fig, path)
    return fig


def pca_project(X: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``X`` ``[T, F]`` projected on their first principal components (centred SVD).

    Returns ``(coords [T, n_components], explained_variance_ratio [n_components])``; components beyond the
    data's rank are zero.
    """
    Xc = X - X.mean(axis=0, keepdims=True)
    U, S, _ = np.linalg.svd(Xc, full_matrices=False)
    k = min(n_components, S.shape[0])
    coords = np.zeros((X.shape[0], n_components))
    coords[:, :k] = U[:, :k] * S[:k]
    total = float((S ** 2).sum())
    ratio = np.zeros(n_components)
    if total > 0:
        ratio[:k] = S[:k] ** 2 / total
    return coords, ratio


def plot_state_pca(trace: "LayerTrace", n_components: int = 2, batch: int = 0, which: str = "ssm",
                   path: str | os.PathLike | None = None, title: str | None = None) -> "Figure":
    """The trajectory of one layer's state projected on its first 2 or 3 principal components.

    Each state row (flattened) is a point; points are joined in time order and coloured by position, the
    first marked with a circle and the last with a star. Axes give each component's share of the variance.

    Args:
        trace: a :class:`LayerTrace` with at least two state rows.
        n_components: 2 or 3 (a 3-D plot).
        batch: which batch row.
        which: ``"ssm"`` or ``"conv"``.
        path: also write the figure there as a PNG.
    """
    if n_components not in (2, 3):
        raise StateError(f"n_components: expected 2 or 3, found {n_components!r}")
    s = _rows(trace, batch, which)
    if s.shape[0] < 2:
        raise StateError(f"trace: expected at least 2 state rows for a PCA, found {s.shape[0]}")
    coords, ratio = pca_project(s.reshape(s.shape[0], -1), n_components)
    pos = np.asarray(trace.positions, dtype=np.float64)
    fig = _new_figure(7.0, 6.0)
    if n_components == 3:
        import mpl_toolkits.mplot3d  # noqa: F401  (registers the 3-D projection)

        ax = fig.add_subplot(projection="3d")
        ax.plot(coords[:, 0], coords[:, 1], coords[:, 2], color="0.6", linewidth=0.8)
        sc = ax.scatter(coords[:, 0], coords[:, 1], coords[:, 2], c=pos, cmap="viridis", s=12)
        ax.scatter(coords[0, 0], coords[0, 1], coords[0, 2], marker="o", s=60, color="black",
                   label=f"start (position {int(pos[0])})")
        ax.scatter(coords[-1, 0], coords[-1, 1], coords[-1, 2], marker="*", s=120, color="red",
                   label=f"end (position {int(pos[-1])})")
        ax.set_zlabel(f"PC3 ({100 * ratio[2]:.1f}% of variance)", labelpad=8)
        ax.set_box_aspect(None, zoom=0.85)  # leave room for the z label next to the colour bar
    else:
        ax = fig.add_subplot()
        ax.plot(coords[:, 0], coords[:, 1], color="0.6", linewidth=0.8)
        sc = ax.scatter(coords[:, 0], coords[:, 1], c=pos, cmap="viridis", s=14, zorder=3)
        ax.scatter(coords[0, 0], coords[0, 1], marker="o", s=60, color="black",
                   label=f"start (position {int(pos[0])})", zorder=4)
        ax.scatter(coords[-1, 0], coords[-1, 1], marker="*", s=120, color="red",
                   label=f"end (position {int(pos[-1])})", zorder=4)
    ax.set_xlabel(f"PC1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC2 ({100 * ratio[1]:.1f}% of variance)")
    ax.legend(fontsize="small", loc="best")
    fig.colorbar(sc, ax=ax, label="tokens processed (position)", shrink=0.8, pad=0.12 if n_components == 3 else 0.02)
    ax.set_title(title or f"{which.upper() if which == 'ssm' else 'Conv'} state trajectory, {n_components}-D PCA, "
                          f"{_layer_name(trace)}, batch row {batch}")
    if path is not None:
        save_figure(fig, path)
    return fig
