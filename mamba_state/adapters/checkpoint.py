"""Loading and saving ``StatefulMambaLM`` checkpoints without importing mamba_ssm.

* :func:`load_pretrained` reads a directory in upstream's format (``config.json`` with ``MambaConfig`` fields and
  ``pytorch_model.bin`` or ``model.safetensors``) or in transformers' Mamba format (``"model_type": "mamba"``;
  names mapped to upstream's). ``.bin`` files are read with ``torch.load(weights_only=True)``: no code runs.
* :func:`adopt_hf` wraps a live transformers ``MambaForCausalLM``, sharing its modules.
* :func:`save_pretrained` writes upstream's format (``config.json`` + ``model.safetensors``), with a
  ``mamba_state_checksum`` (SHA-256 of the header and the tensor data) in the weights' safetensors metadata that
  :func:`read_weights` verifies; weights without one (older mamba-state, other tools) load with an
  :class:`UnverifiedWeightsWarning`.

Before any model is built, ``config.json`` is read with the state format's bounds (size, JSON depth) and its
fields are type-checked within bounds (:func:`check_config`), and the parameter count the configuration implies is
checked against the weights file's size: a configuration of ``n_layer = 10**7`` or a vocabulary of ``2**40`` is
refused by name instead of being allocated.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, cast

import torch
import torch.nn as nn

from ..errors import StateCompatibilityError, StateFormatError
from ..state.files import lock_temp, open_temp_beside, replace_keeping_mode, sweep_stale_temps
from ..state.format import MAX_HEADER_BYTES, _digest, _Reader, _write_all, loads_bounded, write_error

__all__ = ["load_pretrained", "adopt_hf", "save_pretrained", "hf_config_to_upstream", "hf_state_dict_to_upstream",
           "read_config", "read_weights", "check_config", "UnverifiedWeightsWarning", "MAX_CONFIG_BYTES"]

MAX_CONFIG_BYTES = 1024 * 1024  # a config.json is a few hundred bytes
_CHECKSUM_KEY = "mamba_state_checksum"


class UnverifiedWeightsWarning(UserWarning):
    """A weights file without a ``mamba_state_checksum`` (older mamba-state, another tool): loaded unverified."""

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
    if not file.exists():
        raise StateFormatError(f"{os.fspath(path)}: expected a checkpoint directory with config.json, found none")
    with _Reader(file) as f:  # a regular file (no FIFO, no device), of a bounded size
        if f.size > MAX_CONFIG_BYTES:
            raise StateFormatError(f"{file}: expected a config.json of at most {MAX_CONFIG_BYTES} bytes, found "
                                   f"{f.size}")
        raw = bytes(f.read(f.size, "config.json"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"{file}: expected UTF-8 JSON, found unreadable content ({exc})") from None
    cfg = loads_bounded(text, str(file))
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
        if name.endswith(".safetensors"):
            return _read_safetensors(file)
        try:
            sd = torch.load(str(file), map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StateFormatError(f"{file}: expected a readable weights file, found an error: {exc}") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise StateFormatError(f"{file}: expected a dict of tensors (a state_dict), found {type(sd).__name__}")
        return sd
    raise StateFormatError(f"{os.fspath(path)}: expected one of {list(_WEIGHT_FILES)}, found none")


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors weights file, its ``mamba_state_checksum`` verified when it has one."""
    from safetensors.torch import load as st_load

    with _Reader(file) as f:
        data = bytes(f.read(f.size, "weights"))
    n = struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0
    if not 0 < n <= min(len(data) - 8, MAX_HEADER_BYTES):
        raise StateFormatError(f"{file}: expected a safetensors file (a header of 1..{MAX_HEADER_BYTES} bytes), found "
                               f"a header length of {n} in {len(data)} bytes")
    try:
        header = loads_bounded(data[8:8 + n].decode("utf-8"), f"{file}: safetensors header")
    except UnicodeDecodeError as exc:
        raise StateFormatError(f"{file}: expected a UTF-8 safetensors header, found unreadable bytes ({exc})") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    recorded = meta.get(_CHECKSUM_KEY) if isinstance(meta, dict) else None
    if recorded is None:
        warnings.warn(f"{file}: no {_CHECKSUM_KEY} in its metadata (written by mamba-state 0.1 or another tool), so "
                      "its data cannot be verified; save_pretrained writes one", UnverifiedWeightsWarning,
                      stacklevel=5)  # the caller of from_pretrained / load_pretrained
    else:
        unchecked = dict(header)
        unchecked["__metadata__"] = {k: v for k, v in cast(dict, meta).items() if k != _CHECKSUM_KEY}
        actual = _digest(unchecked, memoryview(data)[8 + n:])
        if recorded != actual:
            raise StateFormatError(f"{file}: expected {_CHECKSUM_KEY} {str(recorded)[:80]}, found {actual} (the "
                                   "weights file is corrupted)")
    try:
        return dict(st_load(data))
    except Exception as exc:  # safetensors' own errors are plain Exceptions
        raise StateFormatError(f"{file}: expected a readable safetensors file, found {type(exc).__name__}: "
                               f"{str(exc)[:200]}") from None


def _int_field(cfg: Mapping[str, Any], key: str, lo: int, hi: int, where: str, default: Any = None) -> int:
    value = cfg.get(key, default)
    if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
        raise StateFormatError(f"{where}: config {key}: expected an integer in {lo}..{hi}, found {value!r:.60}")
    return value


def _check_bool(cfg: Mapping[str, Any], key: str, where: str) -> None:
    if key in cfg and not isinstance(cfg[key], bool):
        raise StateFormatError(f"{where}: config {key}: expected true or false, found {cfg[key]!r:.60}")


def check_config(cfg: Mapping[str, Any], where: str, hf: bool) -> int:
    """Type- and bound-check the fields of a checkpoint configuration before a model is built; returns a lower
    bound on the parameter count it implies. ``hf``: transformers' Mamba field names, else upstream's."""
    d_mlp = 0  # the MLP width (upstream's d_intermediate; transformers' Mamba has none)
    if hf:
        d_model = _int_field(cfg, "hidden_size", 1, 1 << 16, where)
        n_layer = _int_field(cfg, "num_hidden_layers", 1, 1 << 12, where)
        vocab = _int_field(cfg, "vocab_size", 1, 1 << 24, where)
        ssm: Mapping[str, Any] = {k: cfg[h] for k, h in (("d_state", "state_size"), ("d_conv", "conv_kernel"),
                                                          ("expand", "expand")) if h in cfg}
        if "intermediate_size" in cfg:
            _int_field(cfg, "intermediate_size", 1, 1 << 20, where)
        eps = cfg.get("layer_norm_epsilon", 1e-5)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1:
            raise StateFormatError(f"{where}: config layer_norm_epsilon: expected a number in (0, 1), found "
                                   f"{eps!r:.60}")
        rank = cfg.get("time_step_rank", "auto")
        if rank != "auto":
            _int_field(cfg, "time_step_rank", 1, 1 << 16, where)
        for key in ("use_bias", "use_conv_bias", "residual_in_fp32", "tie_word_embeddings"):
            _check_bool(cfg, key, where)
    else:
        d_model = _int_field(cfg, "d_model", 1, 1 << 16, where)
        n_layer = _int_field(cfg, "n_layer", 1, 1 << 12, where)
        vocab = _int_field(cfg, "vocab_size", 1, 1 << 24, where)
        d_mlp = _int_field(cfg, "d_intermediate", 0, 1 << 20, where, default=0)
        _int_field(cfg, "pad_vocab_size_multiple", 1, 1 << 12, where, default=1)
        ssm_cfg = cfg.get("ssm_cfg", {})
        if not isinstance(ssm_cfg, dict):
            raise StateFormatError(f"{where}: config ssm_cfg: expected an object, found {ssm_cfg!r:.60}")
        ssm = ssm_cfg
        for key in ("rms_norm", "residual_in_fp32", "fused_add_norm", "tie_embeddings"):
            _check_bool(cfg, key, where)
        if not isinstance(cfg.get("attn_layer_idx", []), list) or not isinstance(cfg.get("attn_cfg", {}), dict):
            raise StateFormatError(f"{where}: config attn_layer_idx / attn_cfg: expected a list and an object, found "
                                   f"{cfg.get('attn_layer_idx')!r:.40} and {cfg.get('attn_cfg')!r:.40}")
    _int_field(ssm, "d_state", 1, 1 << 12, where, default=16)
    if ssm.get("layer", "Mamba1") not in ("Mamba1", "Mamba2", "Mamba3"):
        raise StateFormatError(f"{where}: config ssm_cfg layer: expected 'Mamba1', 'Mamba2' or 'Mamba3', found "
                               f"{ssm.get('layer')!r:.60}")
    if ssm.get("layer") == "Mamba3":  # the fields StatefulMamba3.config() writes
        for key, hi in (("headdim", 1 << 12), ("ngroups", 1 << 12), ("chunk_size", 1 << 16), ("mimo_rank", 1 << 6)):
            if key in ssm:
                _int_field(ssm, key, 1, hi, where)
        if ssm.get("rope_fraction", 0.5) not in (0.5, 1.0) or isinstance(ssm.get("rope_fraction"), bool):
            raise StateFormatError(f"{where}: config rope_fraction: expected 0.5 or 1.0, found "
                                   f"{ssm.get('rope_fraction')!r:.60}")
        _check_bool(ssm, "is_outproj_norm", where)
        _check_bool(ssm, "is_mimo", where)
    _int_field(ssm, "d_conv", 1, 1 << 10, where, default=4)
    expand = ssm.get("expand", 2)
    if isinstance(expand, bool) or not isinstance(expand, (int, float)) or not 0 < expand <= 64:
        raise StateFormatError(f"{where}: config expand: expected a number in (0, 64], found {expand!r:.60}")
    # a lower bound: the embedding and, per layer, in_proj (2 * d_inner rows) and out_proj, each d_model wide, and
    # the MLP's two projections
    d_inner = max(1, math.floor(expand * d_model))
    return vocab * d_model + n_layer * (3 * d_model * d_inner + 2 * d_model * d_mlp)


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
    where = os.fspath(path)
    min_params = check_config(raw, where, hf)
    weights = next((Path(path) / n for n in _WEIGHT_FILES if (Path(path) / n).is_file()), None)
    if weights is not None:
        # every parameter is stored with at least one byte (two for the float types checkpoints use): a configuration
        # implying more than the file can hold is refused before the model is built and allocated
        size = weights.stat().st_size
        if min_params > size:
            raise StateFormatError(f"{where}: config.json describes at least {min_params} parameters, found a weights "
                                   f"file of {size} bytes ({weights.name}) that cannot hold them")
    cfg = hf_config_to_upstream(raw) if hf else raw
    sd = read_weights(path)
    if hf:
        sd = hf_state_dict_to_upstream(sd)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    try:
        params = MambaLMParameters(cfg, device=device, dtype=dtype, state_dtype=state_dtype, backend=backend)
    except (StateCompatibilityError, StateFormatError):
        raise
    except (TypeError, KeyError, ValueError, RuntimeError) as exc:  # a field the checks above do not know
        raise StateFormatError(f"{where}/config.json: expected a configuration a model can be built from, found "
                               f"{type(exc).__name__}: {str(exc)[:200]}") from None
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


def _mamba3_ssm_cfg(lm: nn.Module) -> dict[str, Any] | None:
    """``ssm_cfg`` ``{"layer": "Mamba3", ...}`` for an LM whose mixers are all alike Mamba-3 layers, None for one
    without Mamba-3 mixers; ``StateCompatibilityError`` when one config cannot describe them."""
    from .mamba3 import StatefulMamba3

    mixers = [b.mixer for b in cast(Any, lm).backbone.blocks()]
    if not any(isinstance(m, StatefulMamba3) for m in mixers):
        return None
    if not all(isinstance(m, StatefulMamba3) for m in mixers):
        kinds = sorted({type(m).__name__ for m in mixers})
        raise StateCompatibilityError(f"lm: expected every mixer a Mamba3 (config.json holds one ssm_cfg for all "
                                      f"layers), found {kinds}")
    cfgs = [cast(StatefulMamba3, m).config() for m in mixers]
    for i, c in enumerate(cfgs):
        if c != cfgs[0]:
            raise StateCompatibilityError(f"lm: expected every Mamba3 mixer configured alike (config.json holds one "
                                          f"ssm_cfg), found layer 0 {cfgs[0]} and layer {i} {c}")
    return {"layer": "Mamba3", **cfgs[0]}


def save_pretrained(lm: nn.Module, path: str | os.PathLike) -> None:
    """Write ``config.json`` and ``model.safetensors`` (upstream names; tied weights written once per key).

    A model of upstream blocks with ``Mamba3`` mixers gets ``ssm_cfg`` ``{"layer": "Mamba3", ...}`` (the mixers'
    :meth:`~mamba_state.adapters.mamba3.StatefulMamba3.config`), which :func:`load_pretrained` reads and upstream's
    ``MambaLMHeadModel`` does not.

    Files are written to temporary names and renamed, so a failure leaves no half-written checkpoint. New files get
    the permissions the umask gives (as ``open(path, "w")`` would); files replaced keep their permission bits.
    """
    from safetensors.torch import save as st_save

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in lm.state_dict().items()}
    cfg = dict(cast(Mapping[str, Any], lm.config))  # the normalised config dict the LM keeps
    m3 = _mamba3_ssm_cfg(lm)
    if m3 is not None:  # upstream blocks with Mamba3 mixers: the model's own config says Mamba1/Mamba2
        cfg["ssm_cfg"] = m3
    raw = st_save(tensors, metadata={"format": "pt"})
    del tensors
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    header["__metadata__"][_CHECKSUM_KEY] = _digest(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    parts: dict[str, list[bytes | memoryview]] = {"model.safetensors": [struct.pack("<Q", len(text)) + text, data],
             "config.json": [(json.dumps(cfg, indent=2) + "\n").encode()]}
    for target, chunks in parts.items():
        sweep_stale_temps(root / target)
        try:
            fd, tmp = open_temp_beside(root / target)
        except OSError as exc:
            raise write_error(str(root / target), sum(len(c) for c in chunks), exc) from None
        try:
            try:
                lock_temp(fd)  # kept from other saves' sweeps while it is written
                for chunk in chunks:
                    _write_all(fd, chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            replace_keeping_mode(tmp, root / target)
        except OSError as exc:
            raise write_error(str(root / target), sum(len(c) for c in chunks), exc) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
