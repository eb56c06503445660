"""The ``mamba-state`` command line: --version, defaults in every --help, one-line errors with exit status 2,
deprecated option spellings, and parsers built without importing torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

import mamba_state
from mamba_state import cli

SUBCOMMANDS = ["info", "demo", "rl", "trace", "serve"]


def _cli(*args: str, code: str | None = None, env: dict | None = None, timeout: int = 120):
    """``python -m mamba_state.cli ARGS`` (or ``python -c CODE ARGS``) in a fresh process."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "mamba_state.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _one_error_line(proc, cmd: str) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"mamba-state {cmd}: error: "), proc.stderr
    return lines[0]


def test_version_and_help_without_torch():
    proc = _cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"mamba-state {mamba_state.__version__}", proc
    # the parsers of every subcommand (and their help) are built without importing torch
    code = """
import sys
import mamba_state, mamba_state.cli as c
parser = c.build_parser()
helps = [p.format_help() for p in [parser, *[a for a in parser._actions if hasattr(a, 'choices') and
                                            isinstance(a.choices, dict)][0].choices.values()]]
assert len(helps) == 6, len(helps)
loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))
print('torch loaded:', loaded[:3])
"""
    proc = _cli(code=code)
    assert proc.returncode == 0 and proc.stdout.strip() == "torch loaded: []", proc.stdout + proc.stderr
    proc = _cli("rl", "--help")
    assert proc.returncode == 0 and "(default: 16)" in proc.stdout and "--n-layer" in proc.stdout, proc.stdout
    assert "--num-layers" not in proc.stdout  # the deprecated spelling is hidden


def test_every_option_of_every_subcommand_shows_its_default():
    subs = _subparsers(cli.build_parser())
    assert sorted(subs) == sorted(SUBCOMMANDS)
    for name, parser in subs.items():
        assert parser.prog == f"mamba-state {name}"
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or action.nargs == 0 or not action.option_strings:
                continue  # --help, flags, hidden aliases
            text = formatter._expand_help(action)
            # a required option has no default: its help says it is required instead
            assert ("required" in text) if action.required else ("default" in text), (name, action.option_strings, text)


def test_one_spelling_and_one_device_rule_across_subcommands():
    subs = _subparsers(cli.build_parser())
    options: dict[str, dict[str, argparse.Action]] = {
        name: {o: a for a in p._actions for o in a.option_strings if a.help != argparse.SUPPRESS}
        for name, p in subs.items()}
    for name in ("demo", "rl", "trace"):
        assert options[name]["--device"].default == "auto", name
        assert "--num-layers" not in options[name]
    assert "--n-layer" in options["rl"] and "--n-layer" in options["trace"]
    assert options["demo"]["--backend"].default is None and options["rl"]["--backend"].default is None


def test_deprecated_num_layers_still_works_and_warns(capsys):
    parser = cli.build_parser()
    assert parser.parse_args(["rl", "--num-layers", "3"]).num_layers == 3
    err = capsys.readouterr().err
    assert "mamba-state rl: warning: --num-layers is deprecated" in err and "--n-layer" in err
    assert parser.parse_args(["rl", "--n-layer", "2"]).num_layers == 2
    assert parser.parse_args(["rl"]).num_layers == 1  # the default of --n-layer when neither is given
    assert capsys.readouterr().err == ""


def test_a_bad_path_is_one_line_with_exit_status_2(tmp_path):
    missing = str(tmp_path / "missing")
    line = _one_error_line(_cli("trace", "--model", missing), "trace")
    assert missing in line
    line = _one_error_line(_cli("demo", "--model", missing, "--device", "cpu"), "demo")
    assert missing in line


def test_cuda_without_cuda_and_a_bad_device_are_one_line(capsys, tmp_path):
    import torch

    for device, words in [("cuda", "CUDA requested but not available"), ("bogus", "found 'bogus'")]:
        if device == "cuda" and torch.cuda.is_available():
            continue
        for cmd in ("demo", "trace", "rl"):
            assert cli.main([cmd, "--device", device, "--out" if cmd != "demo" else "--seed",
                             str(tmp_path / "out") if cmd != "demo" else "0"]) == 2
            lines = capsys.readouterr().err.splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"mamba-state {cmd}: error: --device"), lines
            assert words in lines[0], lines
    assert not (tmp_path / "out").exists()  # refused before any work


def test_main_prints_user_errors_as_one_line_and_lets_bugs_raise(monkeypatch, capsys, tmp_path):
    from mamba_state import trace_cli
    from mamba_state.errors import StateError

    def fails_with(exc):
        def run(args):
            raise exc
        return run

    monkeypatch.setattr(trace_cli, "run", fails_with(StateError("x: expected 1,\n  found 2")))
    assert cli.main(["trace"]) == 2
    assert capsys.readouterr().err == "mamba-state trace: error: x: expected 1, found 2\n"
    monkeypatch.setattr(trace_cli, "run", fails_with(FileNotFoundError(2, "No such file or directory", "a/b")))
    assert cli.main(["trace"]) == 2
    assert capsys.readouterr().err == "mamba-state trace: error: a/b: No such file or directory\n"
    missing = ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")
    monkeypatch.setattr(trace_cli, "run", fails_with(missing))
    assert cli.main(["trace"]) == 2
    assert "(pip install matplotlib)" in capsys.readouterr().err
    monkeypatch.setattr(trace_cli, "run", fails_with(ModuleNotFoundError("no", name="not_optional")))
    with pytest.raises(ModuleNotFoundError):  # not an optional dependency: a broken install, shown in full
        cli.main(["trace"])
    monkeypatch.setattr(trace_cli, "run", fails_with(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        cli.main(["trace"])
    monkeypatch.setattr(trace_cli, "run", fails_with(StateError("shown in full")))
    monkeypatch.setenv("MAMBA_STATE_DEBUG", "1")
    with pytest.raises(StateError, match="shown in full"):
        cli.main(["trace"])


def test_missing_matplotlib_is_one_line(tmp_path):
    code = """
import importlib.util, sys
find_spec = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split('.')[0] == 'matplotlib' else find_spec(name, package))
class Hide:  # and any import of it fails, as when it is not installed
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'matplotlib':
            raise ModuleNotFoundError(f'No module named {name!r}', name=name)
        return None
sys.meta_path.insert(0, Hide())
from mamba_state.cli import main
sys.exit(main(sys.argv[1:]))
"""
    proc = _cli("trace", "--out", str(tmp_path / "t"), "--device", "cpu", code=code)
    line = _one_error_line(proc, "trace")
    assert "matplotlib" in line and "pip install matplotlib" in line


def test_lazy_package_exports_every_public_name():
    code = """
import sys
import mamba_state as ms
assert 'torch' not in sys.modules
assert set(ms.__all__) <= set(dir(ms))
from mamba_state import StatefulMambaLM, MambaModelState, StateError
for name in ms.__all__:
    assert getattr(ms, name) is not None, name
import torch, io
assert ms.io.save_model_state is ms.save_model_state and ms.reference.selective_scan_ref
assert not hasattr(ms, 'no_such_name')
s = ms.MambaInferenceState(torch.zeros(1, 4, 3), torch.zeros(1, 4, 2))
buf = io.BytesIO(); torch.save({'s': s}, buf); buf.seek(0)
assert isinstance(torch.load(buf, weights_only=True)['s'], ms.MambaInferenceState)
print('ok')
"""
    proc = _cli(code=code)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr
