"""Persistence: states as safetensors files with JSON metadata, written atomically, validated on load.

File layout (format ``mamba-state``, version 1):

* tensors ``layers.<idx>.conv_state`` / ``layers.<idx>.ssm_state`` (a model state) or ``conv_state`` /
  ``ssm_state`` (a single-layer state), stored contiguous;
* ``__metadata__`` (str -> str): ``format``, ``format_version``, ``container`` (``model`` or ``layer``),
  ``library_version``, ``seqlen_offset``, ``layers`` (JSON list of ``{idx, kind, conv_shape, conv_dtype,
  ssm_shape, ssm_dtype, device}``), ``user_metadata`` (JSON) and, when a model was given at save time,
  ``model_fingerprint`` and ``model_layout`` (the layer layout and a digest of it: layer indices, kinds and state
  shapes, not the weights); ``checksum``: ``sha256:<hex>`` of the canonical JSON of the rest of
  the header followed by the tensor bytes, so that a flipped byte anywhere in the file is caught.

Loading never unpickles: the header is parsed as JSON and every tensor is checked against it before a state is
built; anything else raises :class:`~mamba_state.errors.StateFormatError`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from typing import Any, Mapping

import torch

from ..errors import StateCompatibilityError, StateError, StateFormatError
from .containers import MambaInferenceState, MambaModelState
from .files import open_temp_beside, replace_keeping_mode
from .layers import layout_fingerprint, model_layout

__all__ = ["save_state", "load_state", "save_model_state", "load_model_state", "StateFileNotFoundError",
           "FORMAT_NAME", "FORMAT_VERSION"]

FORMAT_NAME = "mamba-state"
FORMAT_VERSION = 1

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


class StateFileNotFoundError(StateFormatError, FileNotFoundError):
    """The state file does not exist (also a ``FileNotFoundError``)."""


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise StateError(f"dtype: expected one of {sorted(_DTYPES)} to save, found {dtype}")
    return name


def _library_version() -> str:
    from .. import __version__

    return __version__


# ---------------------------------------------------------------------------------------------- save
def _layer_entries(state: MambaInferenceState | MambaModelState) -> list[tuple[str, int | None, MambaInferenceState]]:
    if isinstance(state, MambaModelState):
        return [(f"layers.{i}.", i, s) for i, s in state.items()]
    if isinstance(state, MambaInferenceState):
        return [("", None, state)]
    raise StateError(f"state: expected a MambaInferenceState or MambaModelState, found {type(state).__name__}")


def _serialize(state, model: Any = None, metadata: Mapping[str, Any] | None = None) -> bytes:
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    layers = []
    for prefix, idx, s in _layer_entries(state):
        if s.device.type == "meta":
            raise StateError(f"state: expected tensors with data to save, found {s.device} tensors (no data)")
        entry: dict[str, Any] = {"idx": idx, "kind": s.kind, "device": str(s.device)}
        for name in ("conv_state", "ssm_state"):
            t = getattr(s, name)
            entry[name.replace("_state", "_shape")] = list(t.shape)
            entry[name.replace("_state", "_dtype")] = _dtype_name(t.dtype)
            # always a private copy: safetensors refuses tensors that share memory (one state under two layer
            # indices, or states built as views of one buffer)
            tensors[prefix + name] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        layers.append(entry)
    user = dict(state.metadata) if isinstance(state, MambaModelState) else dict(metadata or {})
    try:
        user_json = json.dumps(user)
    except (TypeError, ValueError) as exc:
        raise StateError(f"metadata: expected JSON-serialisable values, found {exc}") from None
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "container": "model" if isinstance(state, MambaModelState) else "layer",
        "library_version": _library_version(),
        "seqlen_offset": str(state.seqlen_offset if isinstance(state, MambaModelState) else 0),
        "layers": json.dumps(layers),
        "user_metadata": user_json,
    }
    if model is not None:
        layout = model_layout(model)
        if isinstance(state, MambaModelState):
            _check_against_layout(state, layout, strict=False, where="save")
        meta["model_layout"] = json.dumps({str(k): v for k, v in layout.items()})
        meta["model_fingerprint"] = layout_fingerprint(layout)
    return _with_checksum(st_save(tensors, metadata=meta))


def _digest(header: Mapping[str, Any], data: bytes | memoryview) -> str:
    h = hashlib.sha256(json.dumps(header, sort_keys=True, separators=(",", ":")).encode())
    h.update(data)
    return "sha256:" + h.hexdigest()


def _with_checksum(raw: bytes) -> bytes:
    """Re-emit safetensors bytes with ``checksum`` added to the metadata (the data section is unchanged)."""
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    data = memoryview(raw)[8 + n:]
    header["__metadata__"]["checksum"] = _digest(header, data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors keeps the data 8-byte aligned
    return struct.pack("<Q", len(text)) + text + data


def _check_save_path(path: str) -> None:
    """Refuse a path that cannot become a file, before anything is written."""
    if os.path.isdir(path):
        raise StateError(f"path: expected a file path to write the state to, found a directory at {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateError(f"path: expected an existing directory for {path!r}, found none at {directory!r}")


def _atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (the caller has checked the path).

    A new file gets the permissions the umask gives (``0o666 & ~umask``, as ``open(path, "wb")`` would); a replaced
    file keeps its permission bits (see :mod:`mamba_state._files`).
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = open_temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_keeping_mode(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not every platform can open a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_state(state: MambaInferenceState | MambaModelState, path: str | os.PathLike, model: Any = None,
               metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same directory, fsync, rename).

    ``model`` (optional, an upstream or wrapped model) records its layer layout and fingerprint so that
    ``load(..., model=...)`` can check compatibility: layer indices, kinds and state shapes only, not the weights
    (record a model name or revision in the metadata to tell checkpoints of one architecture apart). ``metadata``
    is user data for a single-layer state (a model state carries its own ``.metadata``). Tensors are written in
    their own dtypes. An existing file is replaced only when writing succeeded, and keeps its permission bits; a
    new file gets those of the umask (``0o666 & ~umask``, as ``open(path, "wb")`` gives). ``path`` must name a
    file in an existing directory; a directory raises ``StateError`` (nothing is written).
    """
    where = os.fspath(path)
    _check_save_path(where)  # before serialising: a bad path is an argument error, not a failed write
    _atomic_write(where, _serialize(state, model=model, metadata=metadata))


def save_model_state(state: MambaModelState, path: str | os.PathLike, model: Any = None) -> None:
    """Save a :class:`MambaModelState` (same as ``state.save(path)``)."""
    if not isinstance(state, MambaModelState):
        raise StateError(f"state: expected a MambaModelState, found {type(state).__name__}")
    save_state(state, path, model=model)


# ---------------------------------------------------------------------------------------------- load
def _sniff(data: bytes) -> str:
    if not data:
        return "an empty file"
    if data[:2] == b"PK":
        return "a zip archive (torch.save output?)"
    if data[:1] == b"\x80":
        return "a pickle stream"
    return f"{len(data)} bytes that do not start with a safetensors header"


def _parse_header(data: bytes, where: str) -> tuple[dict, int]:
    if len(data) < 8:
        raise StateFormatError(f"{where}: expected a mamba-state safetensors file, found {_sniff(data)}")
    (n,) = struct.unpack("<Q", data[:8])
    if n == 0 or n > len(data) - 8 or n > 100_000_000:
        raise StateFormatError(f"{where}: expected a mamba-state safetensors file, found {_sniff(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"{where}: expected a JSON safetensors header, found unreadable bytes ({exc})") from None
    if not isinstance(header, dict):
        raise StateFormatError(f"{where}: expected a JSON object header, found {type(header).__name__}")
    return header, 8 + n


def _meta_json(meta: Mapping[str, str], key: str, where: str) -> Any:
    try:
        return json.loads(meta[key])
    except KeyError:
        raise StateFormatError(f"{where}: expected metadata key {key!r}, found keys {sorted(meta)}") from None
    except (TypeError, json.JSONDecodeError) as exc:
        raise StateFormatError(f"{where}: expected JSON in metadata {key!r}, found {meta.get(key)!r:.60} "
                               f"({exc})") from None


def _validate_file(data: bytes, where: str) -> tuple[dict[str, str], list[dict[str, Any]]]:
    header, data_start = _parse_header(data, where)
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise StateFormatError(
            f"{where}: expected a safetensors file with metadata format={FORMAT_NAME!r}, found "
            + (f"format={found!r}" if found is not None else "a safetensors file of something else")
        )
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise StateFormatError(f"{where}: expected an integer format_version, found "
                               f"{meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise StateFormatError(
            f"{where}: expected format_version <= {FORMAT_VERSION}, found {version} (written by mamba-state "
            f"{meta.get('library_version', '?')}; upgrade mamba-state to read it)"
        )
    if version < 1:
        raise StateFormatError(f"{where}: expected format_version >= 1, found {version}")
    unchecked = {k: (dict(v) if k == "__metadata__" else v) for k, v in header.items()}
    checksum = unchecked["__metadata__"].pop("checksum", None)
    actual = _digest(unchecked, memoryview(data)[data_start:])
    if checksum != actual:
        raise StateFormatError(
            f"{where}: expected checksum {checksum!r:.80}, found {actual} (the file is corrupted)"
            if checksum is not None else f"{where}: expected a 'checksum' in the metadata, found none"
        )
    container = meta.get("container")
    if container not in ("model", "layer"):
        raise StateFormatError(f"{where}: expected container 'model' or 'layer', found {container!r}")
    layers = _meta_json(meta, "layers", where)
    if not isinstance(layers, list) or not layers or (container == "layer" and len(layers) != 1):
        raise StateFormatError(f"{where}: expected a non-empty list of layers in metadata, found {layers!r:.80}")
    expected_names = set()
    end = 0
    for entry in layers:
        if not isinstance(entry, dict):
            raise StateFormatError(f"{where}: expected layer entries as objects, found {entry!r:.60}")
        idx = entry.get("idx")
        if container == "model" and (not isinstance(idx, int) or isinstance(idx, bool) or idx < 0):
            raise StateFormatError(f"{where}: expected a non-negative int layer idx, found {idx!r}")
        prefix = f"layers.{idx}." if container == "model" else ""
        for name in ("conv", "ssm"):
            key = f"{prefix}{name}_state"
            expected_names.add(key)
            info = header.get(key)
            if not isinstance(info, dict):
                raise StateFormatError(f"{where}: expected tensor {key!r}, found none")
            st_dtype = _ST_DTYPES.get(str(info.get("dtype")))
            shape = info.get("shape")
            if st_dtype is None or st_dtype != entry.get(f"{name}_dtype"):
                raise StateFormatError(
                    f"{where}: tensor {key!r}: expected dtype {entry.get(f'{name}_dtype')!r}, found "
                    f"{info.get('dtype')!r}"
                )
            if not isinstance(shape, list) or shape != entry.get(f"{name}_shape"):
                raise StateFormatError(f"{where}: tensor {key!r}: expected shape {entry.get(f'{name}_shape')}, found "
                                       f"{shape}")
            offsets = info.get("data_offsets")
            numel = 1
            for s in shape:
                numel *= int(s)
            if (not isinstance(offsets, list) or len(offsets) != 2
                    or offsets[1] - offsets[0] != numel * _ITEMSIZE[st_dtype] or offsets[0] < 0):
                raise StateFormatError(f"{where}: tensor {key!r}: data offsets {offsets} do not fit its shape {shape}")
            end = max(end, offsets[1])
        # the kind is read from the tensors (ssm_state rank 3: Mamba-1, rank 4: Mamba-2); a file must agree
        ssm_shape = entry.get("ssm_shape")
        kind = {3: "mamba1", 4: "mamba2"}.get(len(ssm_shape)) if isinstance(ssm_shape, list) else None
        if entry.get("kind") != kind:
            raise StateFormatError(
                f"{where}: layer {idx if container == 'model' else 0} kind: expected {kind!r} (ssm_state of shape "
                f"{ssm_shape}), found {entry.get('kind')!r} in the metadata"
            )
    extra = set(header) - expected_names - {"__metadata__"}
    if extra:
        raise StateFormatError(f"{where}: expected only state tensors, found extra entries {sorted(extra)[:5]}")
    if len(data) - data_start != end:
        raise StateFormatError(
            f"{where}: expected {end} bytes of tensor data, found {len(data) - data_start} (truncated or padded file)"
        )
    return meta, layers


def _check_device(device: Any) -> torch.device | None:
    """The ``device`` argument of a load as a ``torch.device`` usable here; ``StateError`` names a bad one."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise StateError(f"device: expected None, a torch.device or a device string such as 'cpu' or 'cuda:0', "
                         f"found {device!r}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise StateError(f"device: expected an available device, found {dev} (CUDA is not available)")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise StateError(f"device: expected an available device, found {dev} (this process has "
                             f"{torch.cuda.device_count()} CUDA devices)")
    elif dev.type not in ("cpu", "meta"):
        try:  # other backends (mps, xpu, ...): ask torch whether it can place a tensor there
            torch.empty(0, device=dev)
        except (RuntimeError, AssertionError) as exc:
            raise StateError(f"device: expected an available device, found {dev} ({exc})") from None
    return dev


def _resolve_device(saved: str, device: torch.device | None) -> torch.device:
    if device is not None:
        return device
    dev = torch.device(saved)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
        return dev
    warnings.warn(f"state was saved on {saved}, which this process does not have; loading it on the CPU", stacklevel=3)
    return torch.device("cpu")


def _check_against_layout(state: MambaModelState, layout: Mapping[int, Mapping[str, Any]], strict: bool,
                          where: str) -> None:
    have, want = set(state.layer_indices), set(layout)
    if strict and have != want:
        raise StateCompatibilityError(
            f"{where}: expected the model's Mamba layers {sorted(want)}, found state layers {sorted(have)}"
        )
    if not have <= want:
        raise StateCompatibilityError(
            f"{where}: expected state layers among the model's {sorted(want)}, found extra layers {sorted(have - want)}"
        )
    for idx in sorted(have):
        got, exp = state[idx].layout(), dict(layout[idx])
        for key in ("kind", "conv_shape", "ssm_shape"):
            if got[key] != exp[key]:
                raise StateCompatibilityError(f"{where}: layer {idx} {key}: expected {exp[key]} (model), found "
                                              f"{got[key]} (state)")


def load_state(path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
               strict: bool = True) -> MambaInferenceState | MambaModelState:
    """Read a state file written by :func:`save_state`; validates everything before returning.

    ``device=None`` restores each layer to the device it was saved from when this process has it (else CPU,
    with a warning). Tensors come back in the dtypes they were saved in, bit for bit (there is no ``dtype``
    argument: convert with ``state.to(dtype=...)``). ``model``: check that the state fits it (``strict``: the same
    Mamba layers and, when one was recorded, the same layout fingerprint; otherwise a subset), naming the first
    mismatch. The check covers layer indices, kinds and state shapes, not the weights or dtypes: a state saved
    in one dtype loads against a model of another and keeps its own. A ``device`` that is not a device, or not
    available here (``"cuda"`` without CUDA), raises ``StateError`` before the file is read.
    """
    from safetensors.torch import load as st_load

    target = _check_device(device)  # an argument error, not the file's fault: checked before reading
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise StateFileNotFoundError(f"{where}: expected a mamba-state file, found no such file") from None
    except IsADirectoryError:
        raise StateFormatError(f"{where}: expected a mamba-state file, found a directory") from None
    meta, layers = _validate_file(data, where)
    try:
        seqlen_offset = int(meta.get("seqlen_offset", "0"))
        user = _meta_json(meta, "user_metadata", where) if "user_metadata" in meta else {}
        tensors = st_load(data)
        built: dict[int | None, MambaInferenceState] = {}
        for entry in layers:
            prefix = f"layers.{entry['idx']}." if meta["container"] == "model" else ""
            dev = _resolve_device(str(entry.get("device", "cpu")), target)
            built[entry["idx"]] = MambaInferenceState(
                tensors[prefix + "conv_state"].to(dev), tensors[prefix + "ssm_state"].to(dev)
            )
        if meta["container"] == "layer":
            state: MambaInferenceState | MambaModelState = built[None]
        else:
            by_idx = {idx: s for idx, s in built.items() if idx is not None}
            state = MambaModelState(by_idx, seqlen_offset=seqlen_offset, metadata=user)
    except StateFormatError:
        raise
    except (StateError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise StateFormatError(f"{where}: expected a consistent mamba-state file, found {type(exc).__name__}: "
                               f"{exc}") from None
    if model is not None:
        if not isinstance(state, MambaModelState):
            raise StateCompatibilityError(f"{where}: expected a model state to check against a model, found a "
                                          "single-layer state")
        layout = model_layout(model)
        _check_against_layout(state, layout, strict=strict, where=where)
        fp = meta.get("model_fingerprint")
        if strict and fp is not None and fp != layout_fingerprint(layout):
            raise StateCompatibilityError(
                f"{where}: expected model fingerprint {layout_fingerprint(layout)}, found {fp} (saved from another "
                "model layout: the fingerprint covers layer indices, kinds and state shapes)"
            )
    return state


def load_model_state(path: str | os.PathLike, device: torch.device | str | None = None, model: Any = None,
                     strict: bool = True) -> MambaModelState:
    """Read a :class:`MambaModelState` (same as ``MambaModelState.load``)."""
    return MambaModelState.load(path, device=device, model=model, strict=strict)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a state file, validated like :func:`load_state` but without building tensors."""
    where = os.fspath(path)
    with open(where, "rb") as f:
        data = f.read()
    meta, layers = _validate_file(data, where)
    out: dict[str, Any] = {k: v for k, v in meta.items() if k not in ("layers", "user_metadata", "model_layout")}
    out["layers"] = layers
    out["user_metadata"] = _meta_json(meta, "user_metadata", where) if "user_metadata" in meta else {}
    return out
