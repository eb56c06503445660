"""``mamba-state trace``: trace a model over an input and write the state plots as PNGs.

Examples::

    mamba-state trace --out trace_out                      # a small random model, 128 random tokens
    mamba-state trace --model ./mamba-130m --tokenizer ./mamba-130m --text "The cat sat" --out trace_out
    mamba-state trace --model ./ckpt --tokens "5 17 2 9" --layer 3 --channels 0,1,2 --out trace_out
    mamba-state trace --mixer mamba3 --out trace_out        # a small random model of upstream Mamba3 blocks

Writes ``norms.png`` (conv -- Mamba-3: key and value -- and SSM state norms of every layer), and for the chosen layer
``ssm_heatmap_layer{K}.png``, ``pca2d_layer{K}.png`` and ``pca3d_layer{K}.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

from ._cli_util import CommandLineError, add_device_argument, one_line, require_module, resolve_device
from .errors import StateError

# torch is imported inside the functions: ``mamba-state trace --help`` builds its parser without it.
__all__ = ["add_arguments", "run"]

_DTYPES = ("bfloat16", "float16", "float32", "float64")  # names of torch dtypes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the ``trace`` subcommand."""
    src = parser.add_argument_group("model (a checkpoint directory, or a random model of the given size)")
    src.add_argument("--model", metavar="DIR",
                     help="checkpoint directory (upstream or transformers Mamba format; default: a random model)")
    src.add_argument("--d-model", type=int, default=64, help="random model: width")
    src.add_argument("--n-layer", type=int, default=4, help="random model: layers (upstream's n_layer)")
    src.add_argument("--d-state", type=int, default=16, help="random model: SSM state size")
    src.add_argument("--vocab-size", type=int, default=256, help="random model: vocabulary")
    src.add_argument("--mixer", choices=("mamba1", "mamba2", "mamba3"), default="mamba1",
                     help="random model: the blocks' mixer (mamba3: upstream's Mamba3 in upstream's blocks, as in "
                          "docs/mamba3.md; needs mamba_ssm)")
    src.add_argument("--headdim", type=int, default=16, help="random model: head size (mamba2, mamba3)")
    inp = parser.add_argument_group("input (one of --tokens, --text, --length)")
    inp.add_argument("--tokens", help="token ids separated by spaces or commas (default: --length random tokens)")
    inp.add_argument("--text", help="text, encoded with --tokenizer (default: none)")
    inp.add_argument("--tokenizer", help="tokenizer directory or name for --text (transformers AutoTokenizer; "
                                         "default: none)")
    inp.add_argument("--length", type=int, default=128, help="random tokens of this length")
    out = parser.add_argument_group("output")
    out.add_argument("--out", default="trace_out", help="folder for the PNGs")
    out.add_argument("--layer", type=int, default=None, help="layer for the heatmap and PCA plots (default: first)")
    out.add_argument("--channels", default=None, help="channels of the heatmap, e.g. 0,1,2,3 (default: first 4)")
    out.add_argument("--stride", type=int, default=None, help="keep the state every STRIDE tokens (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random model and random tokens")
    add_device_argument(parser)
    parser.add_argument("--dtype", choices=_DTYPES, default=None, help="parameter dtype (default: as saved)")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise StateError(f"{what}: expected integers separated by spaces or commas, found {text!r}") from None


def _model(args: argparse.Namespace):
    import torch

    from .adapters.lm import StatefulMambaLM

    dtype = getattr(torch, args.dtype) if args.dtype else None
    if args.model:
        if not os.path.isdir(args.model):
            raise StateError(f"--model: expected a checkpoint directory, found {args.model!r} (no such directory)")
        return StatefulMambaLM.from_pretrained(args.model, device=args.device, dtype=dtype)
    torch.manual_seed(args.seed)
    for name in ("d_model", "n_layer", "d_state", "vocab_size", "headdim"):
        if getattr(args, name) < 1:
            raise StateError(f"--{name.replace('_', '-')}: expected a positive int, found {getattr(args, name)}")
    mixer = getattr(args, "mixer", "mamba1")
    if mixer == "mamba3":
        return _random_mamba3_lm(args, dtype)
    ssm_cfg: dict = {"d_state": args.d_state}
    if mixer == "mamba2":
        ssm_cfg.update(layer="Mamba2", headdim=args.headdim)
    cfg = dict(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size,
               ssm_cfg=ssm_cfg, pad_vocab_size_multiple=8)
    return StatefulMambaLM.from_config(cfg, device=args.device, dtype=dtype)


def _random_mamba3_lm(args: argparse.Namespace, dtype):
    """docs/mamba3.md's recipe: upstream's ``MambaLMHeadModel`` with a ``Mamba3`` mixer in every block."""
    require_module("mamba_ssm", "--mixer mamba3", "mamba-ssm")
    if 2 * args.d_model % args.headdim:
        raise StateError(f"--headdim: expected a divisor of 2 * d_model = {2 * args.d_model}, found {args.headdim}")
    if args.d_state < 4:
        raise StateError(f"--d-state: expected at least 4 for a Mamba3 mixer (one rotary angle), found "
                         f"{args.d_state}")
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba3 import Mamba3

    from .adapters.lm import StatefulMambaLM

    cfg = MambaConfig(d_model=args.d_model, n_layer=args.n_layer, vocab_size=args.vocab_size,
                      ssm_cfg={"layer": "Mamba2", "d_state": args.d_state, "headdim": args.headdim},
                      rms_norm=True, fused_add_norm=False, residual_in_fp32=True, pad_vocab_size_multiple=8)
    model = MambaLMHeadModel(cfg, device=args.device, dtype=dtype)
    for i, block in enumerate(model.backbone.layers):
        block.mixer = Mamba3(args.d_model, d_state=args.d_state, headdim=args.headdim, layer_idx=i,
                             device=args.device, dtype=dtype)
    return StatefulMambaLM(model)


def _input_ids(args: argparse.Namespace, vocab: int):
    import torch

    given = [name for name in ("tokens", "text") if getattr(args, name)]
    if len(given) > 1:
        raise StateError("input: expected one of --tokens or --text, found both")
    if args.tokens:
        ids = _ints(args.tokens, "--tokens")
    elif args.text:
        if not args.tokenizer:
            raise StateError("--text: expected --tokenizer too (a tokenizer directory or name), found none")
        require_module("transformers", "--text")
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(args.tokenizer)(args.text)["input_ids"]
    else:
        if args.length < 1:
            raise StateError(f"--length: expected a positive int, found {args.length}")
        gen = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, vocab, (args.length,), generator=gen).tolist()
    if not ids or any(not 0 <= i < vocab for i in ids):
        raise StateError(f"input: expected at least one token id in [0, {vocab}), found {ids[:16]}")
    return torch.tensor([ids], dtype=torch.long, device=args.device)


def run(args: argparse.Namespace) -> int:
    """Trace, plot, write the PNGs; print their paths. Returns 0, or 2 with a message on bad input."""
    try:
        require_module("matplotlib", "mamba-state trace (its plots)")
        args.device = str(resolve_device(args.device))
        import torch

        from . import viz
        from .trace import trace_model

        lm = _model(args)
        vocab = int(lm.lm_head.weight.shape[0])
        ids = _input_ids(args, vocab)
        layers = lm.layer_indices
        layer = layers[0] if args.layer is None else args.layer
        if layer not in layers:
            raise StateError(f"--layer: expected one of the model's layers {layers}, found {layer}")
        channels = _ints(args.channels, "--channels") if args.channels else None
        with torch.inference_mode():
            mtrace = trace_model(lm, ids, stride=args.stride)
        lt = mtrace.layers[layer]
        os.makedirs(args.out, exist_ok=True)
        paths = [
            os.path.join(args.out, "norms.png"),
            os.path.join(args.out, f"ssm_heatmap_layer{layer}.png"),
            os.path.join(args.out, f"pca2d_layer{layer}.png"),
            os.path.join(args.out, f"pca3d_layer{layer}.png"),
        ]
        viz.plot_state_norms(mtrace, path=paths[0])
        viz.plot_ssm_heatmap(lt, channels=channels, path=paths[1])
        viz.plot_state_pca(lt, 2, path=paths[2])
        viz.plot_state_pca(lt, 3, path=paths[3])
    except (StateError, CommandLineError, OSError) as exc:
        print(f"mamba-state trace: error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"traced {ids.shape[1]} tokens through {len(layers)} layers "
          f"({mtrace.nbytes / 2 ** 20:.1f} MiB of states and outputs)")
    for p in paths:
        print(p)
    return 0
