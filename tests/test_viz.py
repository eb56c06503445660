"""Plots of traced states write non-empty PNGs with labelled axes; ``mamba-state trace`` writes them too."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")  # the test extra installs it; the library itself only needs it for viz

from mamba_state import StatefulMamba, StatefulMamba2, StatefulMambaLM, trace_cli, viz  # noqa: E402
from mamba_state.errors import StateError  # noqa: E402
from mamba_state.trace import trace_layer, trace_model  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Tiny tensors: one torch thread is faster and leaves the shared cores alone."""


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def _labelled(ax, z=False):
    assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title()
    if z:
        assert ax.get_zlabel()


@pytest.fixture(scope="module")
def layer_trace():
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(8, d_state=4, layer_idx=1)
    return trace_layer(layer, torch.randn(2, 20, 8))


@pytest.fixture(scope="module")
def model_trace():
    torch.manual_seed(1)
    lm = StatefulMambaLM.from_config(dict(d_model=16, n_layer=2, vocab_size=32, ssm_cfg={"d_state": 4}))
    return trace_model(lm, torch.randint(0, 32, (1, 16)))


def test_heatmap_png_and_labels(layer_trace, tmp_path):
    fig = viz.plot_ssm_heatmap(layer_trace, channels=[0, 3], batch=1, path=tmp_path / "h.png")
    _assert_png(tmp_path / "h.png")
    ax = fig.axes[0]
    _labelled(ax)
    assert "layer 1" in ax.get_title() and [t.get_text() for t in ax.get_yticklabels()] == ["ch 0", "ch 3"]
    assert fig.axes[1].get_ylabel() == "SSM state value"  # the colorbar
    mesh = ax.collections[0].get_array()  # the plotted values are the trace's, channel 3's band second
    expected = layer_trace.ssm_states[:, 1, 3, :].double().numpy().T
    np.testing.assert_allclose(np.asarray(mesh).reshape(8, -1)[4:], expected, rtol=1e-6)


def test_heatmap_of_a_mamba2_trace_and_bad_arguments(layer_trace, tmp_path):
    torch.manual_seed(2)
    layer = StatefulMamba2.from_config(16, d_state=4, headdim=4, layer_idx=0)
    tr = trace_layer(layer, torch.randn(1, 6, 16), stride=2)
    viz.plot_ssm_heatmap(tr, channels=[5], path=tmp_path / "m2.png")  # head 1, channel 1 of the head
    _assert_png(tmp_path / "m2.png")
    with pytest.raises(StateError, match="channels"):
        viz.plot_ssm_heatmap(layer_trace, channels=[99])
    with pytest.raises(StateError, match="batch"):
        viz.plot_ssm_heatmap(layer_trace, batch=2)


def test_norms_png_for_a_model_and_a_layer(model_trace, layer_trace, tmp_path):
    fig = viz.plot_state_norms(model_trace, path=tmp_path / "n.png")
    _assert_png(tmp_path / "n.png")
    conv_ax, ssm_ax = fig.axes[:2]
    assert conv_ax.get_ylabel() == "conv state L2 norm" and ssm_ax.get_ylabel() == "SSM state L2 norm"
    assert ssm_ax.get_xlabel() and conv_ax.get_title() and ssm_ax.get_title()
    assert len(ssm_ax.get_lines()) == 2  # one line per layer
    y = ssm_ax.get_lines()[1].get_ydata()
    expected = model_trace.layers[1].ssm_states[:, 0].double().flatten(1).norm(dim=-1).numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    viz.plot_state_norms(layer_trace, batch=1, path=tmp_path / "n1.png")
    _assert_png(tmp_path / "n1.png")


@pytest.mark.parametrize("k", [2, 3])
def test_pca_png_and_labels(layer_trace, tmp_path, k):
    fig = viz.plot_state_pca(layer_trace, n_components=k, path=tmp_path / f"p{k}.png")
    _assert_png(tmp_path / f"p{k}.png")
    ax = fig.axes[0]
    _labelled(ax, z=(k == 3))
    assert ax.get_xlabel().startswith("PC1 (") and "variance" in ax.get_ylabel()


def test_pca_projection_recovers_a_planar_trajectory():
    rng = np.random.default_rng(0)
    t = np.linspace(0, 2 * np.pi, 50)
    basis = np.linalg.qr(rng.standard_normal((30, 2)))[0]  # an orthonormal plane in 30-D
    X = np.stack([3 * np.cos(t), np.sin(t)], 1) @ basis.T + 5.0
    coords, ratio = viz.pca_project(X, 3)
    assert ratio[:2].sum() == pytest.approx(1.0) and ratio[2] == pytest.approx(0.0, abs=1e-12)
    Xc = X - X.mean(0)  # distances are preserved within the plane
    np.testing.assert_allclose(np.linalg.norm(coords[:, :2], axis=1), np.linalg.norm(Xc, axis=1), rtol=1e-9)


def test_pca_bad_arguments(layer_trace):
    with pytest.raises(StateError, match="n_components"):
        viz.plot_state_pca(layer_trace, n_components=4)
    one = trace_layer(StatefulMamba.from_config(8, d_state=4), torch.randn(1, 3, 8), positions=[2])
    with pytest.raises(StateError, match="at least 2"):
        viz.plot_state_pca(one)


def _cli(*argv):
    parser = argparse.ArgumentParser()
    trace_cli.add_arguments(parser)
    return trace_cli.run(parser.parse_args(list(argv)))


def test_cli_trace_writes_the_pngs(tmp_path, capsys):
    out = tmp_path / "plots"
    rc = _cli("--out", str(out), "--d-model", "16", "--n-layer", "2", "--d-state", "4", "--length", "24",
              "--layer", "1", "--channels", "0,2")
    assert rc == 0
    names = ["norms.png", "ssm_heatmap_layer1.png", "pca2d_layer1.png", "pca3d_layer1.png"]
    printed = capsys.readouterr().out
    for name in names:
        _assert_png(out / name)
        assert str(out / name) in printed


def test_cli_trace_bad_input_exits_2(tmp_path, capsys):
    assert _cli("--out", str(tmp_path), "--d-model", "16", "--n-layer", "1", "--tokens", "1 2 9999") == 2
    assert "token id" in capsys.readouterr().err
    assert _cli("--out", str(tmp_path), "--d-model", "16", "--n-layer", "1", "--layer", "5") == 2
    assert "--layer" in capsys.readouterr().err
    assert _cli("--out", str(tmp_path), "--model", str(tmp_path / "missing")) == 2
    assert not list(tmp_path.glob("*.png"))


def test_visualize_example_writes_its_pngs(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "visualize_ssm_states.py"
    spec = importlib.util.spec_from_file_location("example_visualize_ssm_states", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    written = module.main(["--out", str(tmp_path), "--length", "24", "--dpi", "50"])
    assert len(written) == 10
    for p in written:
        _assert_png(Path(p))


def test_cli_trace_of_a_saved_checkpoint_with_given_tokens(tmp_path, capsys):
    torch.manual_seed(3)
    lm = StatefulMambaLM.from_config(dict(d_model=16, n_layer=2, vocab_size=40, ssm_cfg={"d_state": 4}))
    lm.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "plots"
    assert _cli("--model", str(tmp_path / "ckpt"), "--tokens", "1, 5, 7 9 11 3 2", "--stride", "2",
                "--out", str(out)) == 0
    assert "traced 7 tokens through 2 layers" in capsys.readouterr().out
    for name in ("norms.png", "ssm_heatmap_layer0.png", "pca2d_layer0.png", "pca3d_layer0.png"):
        _assert_png(out / name)
