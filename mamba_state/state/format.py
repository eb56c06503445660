"""The state file format: safetensors with JSON metadata, written atomically, validated on load.

This module knows the file, not the containers: it writes and reads plain layer entries (index, kind and the two
tensors) with the container kind, ``seqlen_offset`` and the user metadata. The containers' ``save`` / ``load``
(:mod:`mamba_state.state.containers`) and the public functions (:mod:`mamba_state.state.io`) are built on it.

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
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..errors import StateCompatibilityError, StateError, StateFormatError
from .files import open_temp_beside, replace_keeping_mode
from .layers import layout_fingerprint, model_layout

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "StateFileNotFoundError", "LayerEntry", "StateFile", "serialize",
           "check_save_path", "atomic_write", "read_state", "read_metadata", "inconsistent", "BUILD_ERRORS"]

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


LayerEntry = tuple[int | None, str, torch.Tensor, torch.Tensor]
"""One layer as the format sees it: ``(idx, kind, conv_state, ssm_state)``; ``idx`` is ``None`` in a single-layer
file."""

# what building a state from a validated file may raise: reported as an inconsistent file (see inconsistent())
BUILD_ERRORS = (StateError, ValueError, KeyError, TypeError, RuntimeError)


def inconsistent(where: str, exc: BaseException) -> StateFormatError:
    """The error for a file that passed validation but whose contents do not make a state."""
    return StateFormatError(f"{where}: expected a consistent mamba-state file, found {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- save
def _entry_layout(kind: str, conv: torch.Tensor, ssm: torch.Tensor) -> dict[str, Any]:
    return {"kind": kind, "conv_shape": list(conv.shape[1:]), "ssm_shape": list(ssm.shape[1:])}


def serialize(container: str, layers: Sequence[LayerEntry], *, seqlen_offset: int, metadata: Mapping[str, Any],
              model: Any = None) -> bytes:
    """The checksummed safetensors bytes of a state: ``container`` is ``"model"`` or ``"layer"`` (one entry, idx
    ``None``); ``metadata`` is the user metadata; ``model`` records its layout (and, for a model state, must fit
    it: a subset of its layers with the same kinds and shapes)."""
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for idx, kind, conv, ssm in layers:
        prefix = f"layers.{idx}." if container == "model" else ""
        if ssm.device.type == "meta":
            raise StateError(f"state: expected tensors with data to save, found {ssm.device} tensors (no data)")
        entry: dict[str, Any] = {"idx": idx, "kind": kind, "device": str(ssm.device)}
        for name, t in (("conv", conv), ("ssm", ssm)):
            entry[f"{name}_shape"] = list(t.shape)
            entry[f"{name}_dtype"] = _dtype_name(t.dtype)
            # always a private copy: safetensors refuses tensors that share memory (one state under two layer
            # indices, or states built as views of one buffer)
            tensors[f"{prefix}{name}_state"] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        entries.append(entry)
    user = dict(metadata)
    try:
        user_json = json.dumps(user)
    except (TypeError, ValueError) as exc:
        raise StateError(f"metadata: expected JSON-serialisable values, found {exc}") from None
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(FORMAT_VERSION),
        "container": container,
        "library_version": _library_version(),
        "seqlen_offset": str(seqlen_offset),
        "layers": json.dumps(entries),
        "user_metadata": user_json,
    }
    if model is not None:
        layout = model_layout(model)
        if container == "model":
            have = {idx: _entry_layout(kind, conv, ssm) for idx, kind, conv, ssm in layers if idx is not None}
            _check_against_layout(have, layout, strict=False, where="save")
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


def check_save_path(path: str) -> None:
    """Refuse a path that cannot become a file, before anything is written."""
    if os.path.isdir(path):
        raise StateError(f"path: expected a file path to write the state to, found a directory at {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StateError(f"path: expected an existing directory for {path!r}, found none at {directory!r}")


def atomic_write(path: str, data: bytes) -> None:
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


def _resolve_device(saved: str, device: torch.device | None, stacklevel: int) -> torch.device:
    if device is not None:
        return device
    dev = torch.device(saved)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda" and torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count():
        return dev
    warnings.warn(f"state was saved on {saved}, which this process does not have; loading it on the CPU",
                  stacklevel=stacklevel)
    return torch.device("cpu")


def _check_against_layout(have: Mapping[int, Mapping[str, Any]], layout: Mapping[int, Mapping[str, Any]],
                          strict: bool, where: str) -> None:
    """Check a state's layer layout (``have``) against a model's: ``{idx: {kind, conv_shape, ssm_shape}}``."""
    have_idx, want = set(have), set(layout)
    if strict and have_idx != want:
        raise StateCompatibilityError(
            f"{where}: expected the model's Mamba layers {sorted(want)}, found state layers {sorted(have_idx)}"
        )
    if not have_idx <= want:
        raise StateCompatibilityError(
            f"{where}: expected state layers among the model's {sorted(want)}, found extra layers "
            f"{sorted(have_idx - want)}"
        )
    for idx in sorted(have_idx):
        got, exp = dict(have[idx]), dict(layout[idx])
        for key in ("kind", "conv_shape", "ssm_shape"):
            if got[key] != exp[key]:
                raise StateCompatibilityError(f"{where}: layer {idx} {key}: expected {exp[key]} (model), found "
                                              f"{got[key]} (state)")


@dataclass(frozen=True)
class StateFile:
    """A validated state file, in plain parts: what :func:`read_state` returns."""

    where: str
    container: str  # "model" or "layer"
    seqlen_offset: int
    metadata: Any  # the user metadata
    model_fingerprint: str | None
    entries: list[dict[str, Any]]
    tensors: dict[str, torch.Tensor]
    device: torch.device | None  # the device asked for (None: each layer's saved device where this process has it)

    def layers(self) -> Iterator[tuple[int | None, torch.Tensor, torch.Tensor]]:
        """``(idx, conv_state, ssm_state)`` of each layer in file order, moved to its device one at a time."""
        for entry in self.entries:
            prefix = f"layers.{entry['idx']}." if self.container == "model" else ""
            # the warning points at the caller of the public load: this generator, the containers' reader and the
            # public function lie between
            dev = _resolve_device(str(entry.get("device", "cpu")), self.device, stacklevel=5)
            yield entry["idx"], self.tensors[prefix + "conv_state"].to(dev), self.tensors[prefix + "ssm_state"].to(dev)

    def check_model(self, state_layout: Mapping[int, Mapping[str, Any]], model: Any, strict: bool) -> None:
        """Check the state read from this file (its layer layout, ``{idx: {kind, conv_shape, ssm_shape}}``)
        against ``model``: with ``strict`` the same Mamba layers and the recorded fingerprint, else a subset."""
        if self.container != "model":
            raise StateCompatibilityError(f"{self.where}: expected a model state to check against a model, found "
                                          "a single-layer state")
        layout = model_layout(model)
        _check_against_layout(state_layout, layout, strict=strict, where=self.where)
        fp = self.model_fingerprint
        if strict and fp is not None and fp != layout_fingerprint(layout):
            raise StateCompatibilityError(
                f"{self.where}: expected model fingerprint {layout_fingerprint(layout)}, found {fp} (saved from "
                "another model layout: the fingerprint covers layer indices, kinds and state shapes)"
            )


def read_state(path: str | os.PathLike, device: torch.device | str | None = None) -> StateFile:
    """Read and validate a state file (``device`` is checked first, before the file is read)."""
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
    except StateFormatError:
        raise
    except BUILD_ERRORS as exc:
        raise inconsistent(where, exc) from None
    return StateFile(where, meta["container"], seqlen_offset, user, meta.get("model_fingerprint"), layers, tensors,
                     target)


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

