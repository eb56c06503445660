"""Loading and saving ``StatefulMambaLM`` checkpoints without importing mamba_ssm.

* :func:`load_pretrained` reads a directory in upstream's format (``config.json`` with ``MambaConfig`` fields and
  ``pytorch_model.bin`` or ``model.safetensors``) or in transformers' Mamba format (``"model_type": "mamba"``;
  names mapped to upstream's). ``.bin`` files are read with ``torch.load(weights_only=True)``: no code runs.
* :func:`adopt_hf` wraps a live transformers ``MambaForCausalLM``, sharing its modules.
* :func:`save_pretrained` writes upstream's format (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, cast

import torch
import torch.nn as nn

from ..errors import StateCompatibilityError, StateFormatError
from ..state.files import open_temp_beside, replace_keeping_mode

__all__ = ["load_pretrained", "adopt_hf", "save_pretrained", "hf_config_to_upstream", "hf_state_dict_to_upstream",
           "read_config", "read_weights"]

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


_HUB_ID = re.compile(r"[A-Za-z0-9_][\w.-]*/[A-Za-z0-9_][\w.-]*")


def _check_directory(path: str | os.PathLike) -> None:
    """A missing path or a file instead of a directory, named; a Hub id gets the commands that download it."""
    text = os.fspath(path)
    root = Path(path)
    if root.is_dir():
        return
    if root.exists():
        raise StateFormatError(f"{text}: expected a checkpoint directory (config.json and weights), found a file; "
                               "pass the directory that holds it")
    if isinstance(text, str) and _HUB_ID.fullmatch(text) and ".." not in text:
        name = text.split("/")[1]
        raise StateFormatError(
            f"{text}: expected a local checkpoint directory, found no such directory; {text!r} looks like a Hugging "
            "Face Hub id, and from_pretrained reads local directories only (it never downloads): download it first, "
            f"with `hf download {text} --local-dir {name}` (older huggingface_hub: `huggingface-cli download`) or "
            f"in Python `directory = huggingface_hub.snapshot_download({text!r})`, then pass the directory: "
            f"StatefulMambaLM.from_pretrained({name!r})"
        )
    raise StateFormatError(f"{text}: expected a checkpoint directory with config.json, found no such directory")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    _check_directory(path)
    file = Path(path) / "config.json"
    if not file.is_file():
        raise StateFormatError(f"{os.fspath(path)}: expected a checkpoint directory with config.json, found none")
    try:
        cfg = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise StateFormatError(f"{file}: expected JSON, found unreadable content ({exc})") from None
    if not isinstance(cfg, dict):
        raise StateFormatError(f"{file}: expected a JSON object, found {type(cfg).__name__}")
    return cfg


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` (preferred) or ``pytorch_model.bin`` (weights-only unpickling)."""
    root = Path(path)
    for name in _WEIGHT_FILES:
        file = root / name
        if not file.is_file():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return dict(load_file(str(file), device="cpu"))
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StateFormatError(f"{file}: expected a readable weights file, found an error: {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise StateFormatError(f"{file}: expected a dict of tensors (a state_dict), found {type(sd).__name__}")
        return sd
    raise StateFormatError(f"{os.fspath(path)}: expected one of {list(_WEIGHT_FILES)}, found none")


def hf_config_to_upstream(hf: dict[str, Any]) -> dict[str, Any]:
    """transformers ``MambaConfig`` fields -> upstream ``MambaConfig`` fields (plus ``norm_epsilon``)."""
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise StateCompatibilityError(f"config hidden_act: expected 'silu', found {act!r}")
    d_model = int(hf["hidden_size"])
    expand = hf.get("expand", 2)
    if "intermediate_size" in hf and int(hf["intermediate_size"]) != int(expand * d_model):
        raise StateCompatibilityError(
            f"config intermediate_size: expected expand * hidden_size = {int(expand * d_model)}, found {hf['intermediate_size']}"
        )
    out = {
        "d_model": d_model, "d_intermediate": 0, "n_layer": int(hf["num_hidden_layers"]),
        "vocab_size": int(hf["vocab_size"]),
        "ssm_cfg": {"d_state": int(hf.get("state_size", 16)), "d_conv": int(hf.get("conv_kernel", 4)),
                    "expand": expand, "dt_rank": hf.get("time_step_rank", "auto"),
                    "bias": bool(hf.get("use_bias", False)), "conv_bias": bool(hf.get("use_conv_bias", True))},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True,
        "residual_in_fp32": bool(hf.get("residual_in_fp32", True)), "fused_add_norm": True,
        "pad_vocab_size_multiple": 1, "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
    }
    eps = float(hf.get("layer_norm_epsilon", 1e-5))
    if eps != 1e-5:
        out["norm_epsilon"] = eps
    return out


def hf_state_dict_to_upstream(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename transformers' Mamba parameter names to upstream's (only the embedding differs)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone.embeddings."):
            k = "backbone.embedding." + k[len("backbone.embeddings."):]
        out[k] = v
    return out


def load_pretrained(path: str | os.PathLike, device: Any = None, dtype: torch.dtype | None = None,
                    state_dtype: torch.dtype = torch.float32, backend: str | None = None) -> nn.Module:
    """The upstream-shaped model (a :class:`~mamba_state.adapters.modules.MambaLMParameters` with the weights
    loaded) of a local checkpoint directory (upstream's or transformers' Mamba format), for
    ``StatefulMambaLM.from_pretrained`` to wrap.

    Nothing is downloaded: for a Hugging Face Hub id such as ``"state-spaces/mamba-130m"``, download the repository
    first (``hf download state-spaces/mamba-130m --local-dir mamba-130m``, or
    ``huggingface_hub.snapshot_download(...)``, which returns the directory) and pass the directory; a missing path
    that looks like a Hub id raises ``StateFormatError`` saying so.

    Mirrors upstream's ``MambaLMHeadModel.from_pretrained``: with ``dtype`` every tensor of the file is cast to
    it and loaded into a model built with that dtype (``A_log`` and ``D`` parameters stay float32). Raises
    ``StateFormatError`` for unreadable files and ``StateCompatibilityError`` when the weights do not fit.
    """
    from .modules import MambaLMParameters

    raw = read_config(path)
    model_type = raw.get("model_type")
    if model_type == "mamba2":
        raise StateCompatibilityError(
            f"{os.fspath(path)}: transformers Mamba-2 checkpoints are not supported; expected upstream's format "
            "(config.json with ssm_cfg {'layer': 'Mamba2'}) or a transformers Mamba (v1) checkpoint"
        )
    hf = model_type == "mamba"
    cfg = hf_config_to_upstream(raw) if hf else raw
    sd = read_weights(path)
    if hf:
        sd = hf_state_dict_to_upstream(sd)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    params = MambaLMParameters(cfg, device=device, dtype=dtype, state_dtype=state_dtype, backend=backend)
    if params.config["tie_embeddings"] and "lm_head.weight" not in sd and "backbone.embedding.weight" in sd:
        sd["lm_head.weight"] = sd["backbone.embedding.weight"]
    expected = set(params.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise StateCompatibilityError(
            f"{os.fspath(path)}: expected the parameters of config.json, found missing {missing[:6]} and "
            f"unexpected {unexpected[:6]}"
        )
    own = params.state_dict()
    bad = [(k, list(v.shape), list(own[k].shape)) for k, v in sd.items() if v.shape != own[k].shape]
    if bad:
        k, found, exp = bad[0]
        raise StateCompatibilityError(f"{os.fspath(path)} {k}: expected shape {exp}, found {found}")
    params.load_state_dict(sd, strict=True)
    return params


def adopt_hf(hf_model: nn.Module) -> Any:
    """A view of a transformers ``MambaForCausalLM`` under upstream's names (its modules shared, nothing copied),
    for ``StatefulMambaLM.from_hf`` to wrap.

    ``Mamba2ForCausalLM`` is refused with ``StateCompatibilityError`` (its mixer differs from upstream's Mamba2:
    load its checkpoint in upstream's format instead).
    """
    cfg: Any = getattr(hf_model, "config", None)  # a transformers config (None fails the model_type check)
    model_type = getattr(cfg, "model_type", None)
    if model_type == "mamba2":
        raise StateCompatibilityError(
            "hf_model: found a transformers Mamba2ForCausalLM, which is not supported; expected MambaForCausalLM "
            "(convert the checkpoint to upstream's format and use StatefulMambaLM.from_pretrained)"
        )
    backbone = getattr(hf_model, "backbone", None)
    if model_type != "mamba" or backbone is None or not hasattr(hf_model, "lm_head"):
        upstream = type(hf_model).__module__.split(".")[0] == "mamba_ssm" or type(hf_model).__name__ == "MambaLMHeadModel"
        raise StateCompatibilityError(
            f"hf_model: expected a transformers MambaForCausalLM, found {type(hf_model).__name__} "
            f"(model_type {model_type!r})"
            + ("; wrap an upstream MambaLMHeadModel with StatefulMambaLM(model)" if upstream else "")
        )
    upstream_cfg = hf_config_to_upstream(cfg.to_dict())
    upstream_cfg["tie_embeddings"] = cast(nn.Linear, hf_model.lm_head).weight is backbone.embeddings.weight
    layers = [SimpleNamespace(norm=b.norm, mixer=b.mixer, mlp=None) for b in backbone.layers]
    view = SimpleNamespace(
        config=upstream_cfg,
        backbone=SimpleNamespace(embedding=backbone.embeddings, layers=layers, norm_f=backbone.norm_f),
        lm_head=hf_model.lm_head,
    )
    return view


def save_pretrained(lm: nn.Module, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` (upstream names; tied weights written once per key).

    Files are written to temporary names and renamed, so a failure leaves no half-written checkpoint. New files get
    the permissions the umask gives (as ``open(path, "w")`` would); files replaced keep their permission bits.
    """
    from safetensors.torch import save_file

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in lm.state_dict().items()}
    cfg = dict(cast(Mapping[str, Any], lm.config))  # the normalised config dict the LM keeps
    for target, write in (("model.safetensors", lambda f: save_file(tensors, f, metadata={"format": "pt"})),
                          ("config.json", lambda f: Path(f).write_text(json.dumps(cfg, indent=2) + "\n"))):
        fd, tmp = open_temp_beside(root / target)
        # the umask's mode, kept aside: recent safetensors releases write a temporary file of their own (0o600)
        # and rename it over tmp
        new_mode = stat.S_IMODE(os.fstat(fd).st_mode)
        os.close(fd)
        try:
            write(tmp)
            replace_keeping_mode(tmp, root / target, new_mode=new_mode)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
