"""Pieces shared by the ``mamba-state`` subcommands: help formatting, the ``--device`` rule, deprecated option
aliases and command-line errors.

This module must stay importable without torch: ``mamba-state --help`` (and every subcommand's ``--help``) builds
its parsers from it, and importing torch alone takes about a second.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

__all__ = ["HelpFormatter", "CommandLineError", "DEVICE_HELP", "BACKEND_HELP", "add_device_argument",
           "add_backend_argument", "add_deprecated_alias", "resolve_device", "require_module", "one_line"]


class CommandLineError(Exception):
    """A problem with what the user asked for or with the install (not a bug): ``main`` prints it as one line,
    ``mamba-state <cmd>: error: <message>``, and exits with status 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's :class:`~argparse.ArgumentDefaultsHelpFormatter` that leaves alone the help of flags (a flag's
    default is "not given") and of options whose help already states its default (options with a ``None``
    default say in words what that means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default:" in text or "%(default)" in text:
            return action.help
        return super()._get_help_string(action)


DEVICE_HELP = "torch device: auto (cuda if torch sees a GPU, else cpu), cpu, cuda, cuda:1, ..."
BACKEND_HELP = "scan backend: auto, reference or triton (default: $MAMBA_STATE_BACKEND, else auto)"


def add_device_argument(parser: Any, extra: str = "") -> None:
    """``--device`` with the one default every subcommand shares: ``auto``."""
    parser.add_argument("--device", default="auto", help=DEVICE_HELP + extra)


def add_backend_argument(parser: Any, extra: str = "") -> None:
    """``--backend`` (default ``None``: the environment variable, else ``auto``)."""
    parser.add_argument("--backend", default=None, choices=["auto", "reference", "triton"], help=BACKEND_HELP + extra)


class _DeprecatedAlias(argparse.Action):
    """An old spelling of an option: stores into the new option's ``dest`` and warns on stderr."""

    def __init__(self, option_strings, dest, replacement: str = "", **kwargs):
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and will be removed; use {self.replacement}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: Any, old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept ``old`` as a hidden alias of ``new`` (same ``dest``, same ``type``/``nargs`` given in ``kwargs``),
    printing a deprecation warning to stderr when it is used. Hidden from ``--help``; the new option's default
    stays in force when neither is given."""
    parser.add_argument(old, dest=dest, action=_DeprecatedAlias, replacement=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def resolve_device(spec: str | None):
    """The ``torch.device`` for a ``--device`` value: ``auto`` (or ``None``) is cuda when torch sees a GPU, else
    cpu. Raises :class:`CommandLineError` for a malformed device or a CUDA device without CUDA."""
    import torch

    if spec is None or str(spec).strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(spec).strip())
    except (RuntimeError, ValueError):
        raise CommandLineError(f"--device: expected auto, cpu, cuda or cuda:N (or another torch device), found "
                               f"{spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch was built without CUDA" if torch.version.cuda is None
                   else "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
            raise CommandLineError(f"--device {spec}: CUDA requested but not available ({why}); use --device cpu "
                                   "or --device auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise CommandLineError(f"--device {spec}: expected a GPU index below {torch.cuda.device_count()}, "
                                   f"found {device.index}")
    return device


def require_module(name: str, what: str, install: str | None = None) -> None:
    """Raise :class:`CommandLineError` naming the pip command when the optional module ``name`` is missing."""
    if importlib.util.find_spec(name) is None:
        raise CommandLineError(f"{what} needs {name}, which is not installed: pip install {install or name}")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (an ``OSError`` as ``path: reason``)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror}" + (f" -> {exc.filename2}" if exc.filename2 is not None else "")
    elif isinstance(exc, KeyError) and type(exc).__str__ is KeyError.__str__ and len(exc.args) == 1:
        text = str(exc.args[0])  # a KeyError would show its message quoted
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(" ".join(line.split()) for line in text.splitlines() if line.strip())
