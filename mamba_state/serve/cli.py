"""``mamba-state serve``: options (no torch or FastAPI import at module level) and :func:`run`.

``mamba-state serve --model DIR [--host 127.0.0.1 --port 8000]`` loads an upstream-format checkpoint directory
(``StatefulMambaLM.from_pretrained``), a tokenizer when the directory has one (``transformers.AutoTokenizer``),
builds a :class:`~mamba_state.cache.StateCache` (with a disk tier when ``--cache-dir`` is given) and an
:class:`~mamba_state.serve.Engine`, and serves them with uvicorn until SIGINT / SIGTERM (in-flight requests
then park their state).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .._cli_util import CommandLineError, add_backend_argument, add_device_argument, require_module, resolve_device

__all__ = ["add_arguments", "run"]

_DTYPES = ("float32", "bfloat16", "float16", "float64")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _bytes(text: str) -> int | None:
    """``--*-cache-bytes`` values: an int with an optional K/M/G/T suffix (powers of 1024), or ``none``."""
    t = text.strip().lower()
    if t in ("none", "inf", "unlimited"):
        return None
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30), ("t", 1 << 40)):
        if t.endswith(suffix) or t.endswith(suffix + "ib"):
            t, mult = t[: t.rindex(suffix)], m
            break
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 1073741824, 512M, 4G or none, found {text!r}") \
            from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative size, found {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the ``serve`` options on ``parser``."""
    parser.add_argument(
        "--model", required=True, metavar="DIR",
        help="checkpoint directory (upstream's config.json + weights, or a transformers Mamba; required)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="TCP port")
    add_device_argument(parser)
    parser.add_argument("--dtype", default="float32", choices=_DTYPES,
                        help="parameter dtype (float64: the states too; for tests)")
    add_backend_argument(parser)
    parser.add_argument("--max-batch", type=int, default=64, help="most requests decoding at once")
    parser.add_argument("--max-queue", type=int, default=256,
                        help="most requests waiting; beyond it requests get HTTP 503")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="disk tier of the state cache: prefixes and sessions survive restarts (default: none)")
    parser.add_argument("--device-cache-bytes", type=_bytes, default=1 << 30, help="device tier budget")
    parser.add_argument("--host-cache-bytes", type=_bytes, default=4 << 30, help="host tier budget")
    parser.add_argument("--disk-cache-bytes", type=_bytes, default=None,
                        help="disk tier budget (default: unbounded)")
    parser.add_argument("--cache-every", type=int, default=None,
                        help="also cache prompt states every N tokens (default: at the end of prompts only)")
    parser.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="tokenizer directory (default: the model directory when it has one; else token ids "
                             "only)")
    parser.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")


def _tokenizer(path: str | None, model_dir: str) -> Any:
    directory = path or model_dir
    if path is None and not any(os.path.exists(os.path.join(model_dir, f)) for f in _TOKENIZER_FILES):
        return None
    require_module("transformers", "a tokenizer", "transformers")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


def build(args: argparse.Namespace) -> tuple[Any, Any]:
    """``(engine, app)`` for the parsed options (the model loaded; nothing started)."""
    require_module("fastapi", "mamba-state serve", "mamba-state[serve]")
    require_module("uvicorn", "mamba-state serve", "mamba-state[serve]")
    import torch

    from ..adapters import StatefulMambaLM
    from ..cache import StateCache
    from .app import build_app
    from .engine import Engine

    if not os.path.isdir(args.model):
        raise CommandLineError(f"--model: expected a checkpoint directory, found {args.model!r}")
    for name in ("max_batch", "max_queue", "port"):
        if getattr(args, name) < (0 if name != "max_batch" else 1):
            raise CommandLineError(f"--{name.replace('_', '-')}: expected a non-negative int, found "
                                   f"{getattr(args, name)}")
    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)
    lm = StatefulMambaLM.from_pretrained(args.model, device=device, dtype=dtype, backend=args.backend,
                                         state_dtype=torch.float64 if dtype == torch.float64 else torch.float32
                                         ).eval()
    cache = StateCache(lm, device_bytes=args.device_cache_bytes, host_bytes=args.host_cache_bytes,
                       directory=args.cache_dir, disk_bytes=args.disk_cache_bytes, device=device)
    engine = Engine(lm, cache, max_batch=args.max_batch, max_queue=args.max_queue, cache_every=args.cache_every,
                    cuda_graph=not args.no_cuda_graph)
    tokenizer = _tokenizer(args.tokenizer, args.model)
    def stopped() -> None:
        s = engine.stats()
        print(f"mamba-state serve: stopped after {s['finished']} requests ({len(engine.cache)} cached entries)",
              flush=True)

    app = build_app(engine, tokenizer=tokenizer, model_name=os.path.basename(os.path.abspath(args.model)),
                    on_stop=stopped)
    return engine, app


def run(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status. On SIGTERM / SIGINT uvicorn shuts down gracefully (the
    engine parks what is in flight) and then re-raises the signal, so the process ends by that signal."""
    engine, app = build(args)
    import uvicorn

    for path, reason in engine.cache.problems:
        print(f"mamba-state serve: dropped cache entry {path}: {reason}", flush=True)
    print(f"mamba-state serve: http://{args.host}:{args.port} (model {args.model}, device {engine.device}, "
          f"{len(engine.cache)} cached entries)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
