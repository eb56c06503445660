"""The ``mamba-state`` command line: ``info``, ``demo``, ``rl``, ``trace`` and ``serve`` (subcommands register in
``_COMMANDS``).

Building the parser imports no torch (``mamba-state --help`` and every subcommand's ``--help`` answer at once):
each subcommand's options live in a module without torch at import time, and the work is imported when the
subcommand runs.

Errors the user can act on (a bad path, a bad option value, CUDA asked for but not available, a missing optional
dependency such as matplotlib) print one line, ``mamba-state <cmd>: error: <message>``, on stderr and exit with
status 2, as argparse's own usage errors do. Anything else is a bug and shows its traceback. With the environment
variable ``MAMBA_STATE_DEBUG=1`` every error shows its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from ._cli_util import CommandLineError, HelpFormatter, one_line

__all__ = ["build_parser", "main", "cmd_info"]

# Optional dependencies the subcommands may need: top-level module -> what to pip install.
_OPTIONAL = {"matplotlib": "matplotlib", "tqdm": "tqdm", "transformers": "transformers", "mamba_ssm": "mamba-ssm",
             "causal_conv1d": "causal-conv1d", "triton": "triton",
             "fastapi": "mamba-state[serve]", "uvicorn": "mamba-state[serve]"}


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _upstream_status() -> str:
    """Whether upstream's modules import and its compiled scan exists, without importing mamba_ssm itself."""
    version = _version("mamba-ssm")
    if version == "not installed":
        return "not installed"
    try:
        importlib.import_module("selective_scan_cuda")
        scan = "compiled selective_scan_cuda present"
    except ImportError:
        scan = "no compiled selective_scan_cuda (upstream's Mamba-1 scan cannot run; ours can)"
    return f"{version}; {scan}"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    from mamba_state.kernels.backend import requested_backend, resolve_backend

    from . import __version__

    print(f"mamba-state      {__version__}")
    print(f"python           {sys.version.split()[0]}")
    print(f"torch            {torch.__version__}")
    print(f"triton           {_version('triton')}")
    print(f"mamba-ssm        {_upstream_status()}")
    print(f"causal-conv1d    {_version('causal-conv1d')}")
    cuda = torch.cuda.is_available()
    print(f"CUDA available   {cuda}" + (f" ({torch.cuda.get_device_name(0)})" if cuda else ""))
    print(f"TRITON_INTERPRET {os.environ.get('TRITON_INTERPRET', '0')}")
    print(f"backend request  {requested_backend()} (argument backend= or MAMBA_STATE_BACKEND)")
    devices = ["cpu"] + (["cuda"] if cuda else [])
    ops = ["selective scan (prefill/continue)", "single-step update (decode)", "causal conv window"]
    for dev in devices:
        for op in ops:
            try:
                name, why = resolve_backend(dev, None)
            except ValueError as exc:
                name, why = "error", str(exc)
            if op == "causal conv window" and name == "triton":
                why = f"{why}; inference only: where gradients are needed the PyTorch reference serves"
            elif op == "causal conv window":
                name, why = "pytorch", "depthwise conv1d in PyTorch (the differentiable reference)"
            print(f"  {dev:4s} {op:34s} -> {name:9s} ({why})")
    return 0


# Subcommands: name -> (module with add_arguments(parser), importable without torch; the "module:function" that
# runs it, run(args) -> int, imported only when the subcommand runs; help).
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo": ("mamba_state.demo_cli", "mamba_state.demo:run", "the end-to-end demo (README's main job)"),
    "rl": ("mamba_state.rl.cli", "mamba_state.rl.cli:run",
           "recurrent PPO on the delayed-recall memory task (Mamba vs GRU)"),
    "trace": ("mamba_state.trace_cli", "mamba_state.trace_cli:run",
              "trace a model's states over an input and write the plots (PNG)"),
    "serve": ("mamba_state.serve.cli", "mamba_state.serve.cli:run",
              "serve a checkpoint over HTTP (/v1/completions, sessions, state cache; pip install mamba-state[serve])"),
}


def _runner(target: str):
    """``run(args)`` of ``target`` ("module:function"), imported when called."""
    def run(args: argparse.Namespace) -> int:
        module, function = target.split(":")
        return getattr(importlib.import_module(module), function)(args)

    return run


def _package_version() -> str:
    from . import __version__  # a plain string in the package's __init__: no torch import

    return __version__


def build_parser() -> argparse.ArgumentParser:
    """The ``mamba-state`` parser with every subcommand (imports no torch)."""
    parser = argparse.ArgumentParser(
        prog="mamba-state", description="Recurrent state tools for Mamba models.", formatter_class=HelpFormatter,
        epilog="Errors print one line and exit with status 2; MAMBA_STATE_DEBUG=1 shows their tracebacks.")
    parser.add_argument("--version", action="version", version=f"mamba-state {_package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(["info", *_COMMANDS]) + "}")
    p = sub.add_parser("info", help="versions, devices and which backend each operation uses",
                       description="Versions, devices and which backend each operation uses.",
                       formatter_class=HelpFormatter)
    p.set_defaults(func=cmd_info)
    for name, (module, target, help_text) in _COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):  # a missing dependency inside: show it
                raise
            continue  # the subcommand's module is not part of this install
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".",
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(func=_runner(target))
    return parser


def _debug() -> bool:
    return os.environ.get("MAMBA_STATE_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _missing_optional(exc: ImportError) -> str | None:
    """The pip command for a missing optional dependency behind ``exc`` (also when re-raised with a hint)."""
    seen: BaseException | None = exc
    while seen is not None:
        name = getattr(seen, "name", None)
        if isinstance(seen, ModuleNotFoundError) and name and name.split(".")[0] in _OPTIONAL:
            return _OPTIONAL[name.split(".")[0]]
        seen = seen.__cause__
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``mamba-state`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    prog = f"mamba-state {args.command}"
    from .errors import StateError

    try:
        return int(args.func(args) or 0)
    except (StateError, CommandLineError, OSError) as exc:
        # bad options, a bad file or path, CUDA asked for without CUDA, a mismatched checkpoint: not a bug
        if _debug():
            raise
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except ImportError as exc:
        install = _missing_optional(exc)
        if install is None or _debug():  # a broken install or a bug: the traceback helps
            raise
        print(f"{prog}: error: {one_line(exc)} (pip install {install})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if _debug():
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
