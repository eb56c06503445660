"""The ``mamba-state`` command line: ``info`` and ``demo`` (more subcommands register in ``_COMMANDS``)."""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import sys
from typing import Sequence

import torch


def _version(dist: str) -> str:
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
    from . import __version__
    from .backend import requested_backend, resolve_backend

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


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mamba-state", description="Recurrent state tools for Mamba models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="versions, devices and which backend each operation uses")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser("demo", help="the end-to-end demo (README's main job)")
    importlib.import_module("mamba_state.demo").add_arguments(p)
    p.set_defaults(func=cmd_demo)
    for name, (module, help_text) in _COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is None or not module.startswith(exc.name):  # a missing dependency inside: show it
                raise
            continue  # the subcommand's module is not part of this install
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(func=mod.run)
    return parser


# Further subcommands: name -> (module with add_arguments(parser) and run(args) -> int, help).
_COMMANDS: dict[str, tuple[str, str]] = {
    "rl": ("mamba_state.rl.cli", "recurrent PPO on the delayed-recall memory task (Mamba vs GRU)"),
    "trace": ("mamba_state.trace_cli", "trace a model's states over an input and write the plots (PNG)"),
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
