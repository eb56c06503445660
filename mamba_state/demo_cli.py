"""The options of ``mamba-state demo`` (no torch import here: ``mamba-state demo --help`` builds its parser
without it); the demo itself is :mod:`mamba_state.demo`."""

from __future__ import annotations

import argparse

from ._cli_util import add_backend_argument, add_device_argument

__all__ = ["add_arguments"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``demo`` options on ``parser``."""
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="an upstream-format checkpoint directory to use instead of training the recall model "
                             "(default: train it)")
    parser.add_argument("--train-steps", type=int, default=1500, help="most training steps")
    parser.add_argument("--train-seconds", type=float, default=80.0, help="stop training after this many seconds")
    parser.add_argument("--stream-tokens", type=int, default=2048, help="length of the chunking check's stream")
    parser.add_argument("--continue-tokens", type=int, default=512,
                        help="tokens continued from the state in the timing")
    parser.add_argument("--save-model", default=None, metavar="DIR",
                        help="also write the trained recall model there, in upstream's format (default: a "
                             "temporary directory only)")
    add_backend_argument(parser)
