"""The state file format: safetensors with JSON metadata, written atomically, validated on load.

This module knows the file, not the containers: it writes and reads plain layer entries (index, kind and the
family's named tensors) with the container kind, ``seqlen_offset`` and the user metadata. The containers'
``save`` / ``load`` (:mod:`mamba_state.state.containers`) and the public functions (:mod:`mamba_state.state.io`)
are built on it.

File layout (format ``mamba-state``, version 2; version 1 is the same restricted to Mamba-1/2 layers):

* tensors ``layers.<idx>.<name>`` (a model state) or ``<name>`` (a single-layer state), one per named tensor of
  the layer's family (:data:`~mamba_state.state.layers.FAMILY_TENSORS`: ``conv_state`` and ``ssm_state`` for
  Mamba-1/2; ``angle_dt_state``, ``ssm_state``, ``k_state`` and ``v_state`` for Mamba-3), stored contiguous;
* ``__metadata__`` (str -> str): ``format``, ``format_version``, ``container`` (``model`` or ``layer``),
  ``library_version``, ``seqlen_offset``, ``layers`` (JSON list of ``{idx, kind, device}`` plus
  ``<field>_shape`` and ``<field>_dtype`` for each of the family's tensors: ``conv``/``ssm`` for Mamba-1/2,
  ``angle``/``ssm``/``k``/``v`` for Mamba-3), ``user_metadata`` (JSON) and, when a model was given at save time,
  ``model_fingerprint`` and ``model_layout`` (the layer layout and a digest of it: layer indices, kinds and state
  shapes, not the weights); ``checksum``: ``sha256:<hex>`` of the canonical JSON of the rest of
  the header followed by the tensor bytes, so that a flipped byte anywhere in the file is caught.

Reading is one front (:func:`read_state`, :func:`read_metadata`) for every loader. It opens the path without
blocking, refuses anything but a regular file, reads the header alone (bounded by :data:`MAX_HEADER_BYTES`),
checks its JSON for depth and size before parsing it (:func:`loads_bounded`), type-checks every value in its
canonical form, checks the announced tensor data against the file's size, and only then reads the data, verifies
the checksum and builds tensors.

Versions: a file with only Mamba-1/2 layers is written as version 1, byte for byte the layout of 0.1.0 (so readers
of 0.1.0 still read it); a file with a Mamba-3 layer as version 2, which a version-1 reader refuses by its version
("upgrade mamba-state") instead of misreading its entries. Both are read; a version-1 file may hold only Mamba-1/2
entries. Nothing is unpickled or evaluated; every failure, OS errors included, is a
:class:`~mamba_state.errors.StateFormatError` naming the file, what was expected and what was found.
"""

from __future__ import annotations

import errno as _errno
import hashlib
import json
import os
import re
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence, TypeVar

import torch

from ..errors import StateCompatibilityError, StateError, StateFormatError
from .files import lock_temp, open_temp_beside, replace_keeping_mode, resolve_link, sweep_stale_temps
from .layers import FAMILY_TENSORS, TENSOR_FIELDS, family_fields, layout_fingerprint, model_layout

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "MAX_HEADER_BYTES", "MAX_JSON_DEPTH", "MAX_JSON_CONTAINERS",
           "MAX_LAYERS", "MAX_DIM", "StateFileNotFoundError", "StateFileAccessError", "StateWriteError",
           "LayerEntry", "StateFile", "serialize", "check_save_path", "atomic_write", "read_state", "read_metadata",
           "loads_bounded", "check_json_bounds", "inconsistent", "BUILD_ERRORS"]

FORMAT_NAME = "mamba-state"
FORMAT_VERSION = 2  # the newest version read and written (files without Mamba-3 layers are written as version 1)
_KINDS_OF_VERSION = {1: ("mamba1", "mamba2"), 2: ("mamba1", "mamba2", "mamba3")}

# Limits on what a file may make a reader do (docs/persistence.md, "Limits"). A real header is a few KiB (about
# 250 bytes per layer plus the user metadata); these bound the work and memory of a hostile one before it is parsed.
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64  # nesting of arrays and objects in any JSON of the file (the user metadata included)
MAX_JSON_CONTAINERS = 1_000_000  # arrays and objects in one JSON text: bounds what json.loads allocates
MAX_LAYERS = 10_000
MAX_DIM = 2**31 - 1  # one tensor dimension

_DTYPES = {
    "float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
}
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
_KIND_OF_RANK = {3: "mamba1", 4: "mamba2"}  # rank of ssm_state -> kind
_ENTRY_KEYS = ("idx", "kind", "conv_shape", "conv_dtype", "ssm_shape", "ssm_dtype", "device")  # Mamba-1/2
_MAMBA3_ENTRY_KEYS = ("idx", "kind", "angle_shape", "angle_dtype", "ssm_shape", "ssm_dtype", "k_shape", "k_dtype",
                      "v_shape", "v_dtype", "device")
_TENSOR_KEYS = {"dtype", "shape", "data_offsets"}
# canonical decimal integers: ASCII digits, no sign, no spaces, no leading zeros (int() would take " 1 ", "+1", "１")
_DECIMAL = re.compile(r"(?:0|[1-9][0-9]{0,18})")
_CHECKSUM = re.compile(r"sha256:[0-9a-f]{64}")
_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


class _Message:
    """Shows the message it was made with (``OSError.__str__`` would show ``[Errno n] strerror`` once ``errno`` is
    set)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""  # type: ignore[attr-defined]


class StateFileNotFoundError(_Message, StateFormatError, FileNotFoundError):
    """The state file does not exist (also a ``FileNotFoundError``)."""


class StateFileAccessError(_Message, StateFormatError, OSError):
    """The state file could not be opened or read (permission, a symlink loop, a name too long, an I/O error): also
    an ``OSError`` with the original ``errno``."""


class StateWriteError(_Message, StateError, OSError):
    """Writing a state file failed (a full disk, a quota, a read-only file system, no permission): also an
    ``OSError`` with the original ``errno``. The destination is as it was before the save."""


_E = TypeVar("_E", bound=OSError)


def _with_errno(exc: _E, cause: OSError) -> _E:
    """``exc`` carrying ``cause``'s ``errno``, ``strerror`` and ``filename`` (callers may test ``errno``)."""
    if cause.errno is not None:
        exc.errno, exc.strerror, exc.filename = cause.errno, cause.strerror, cause.filename
    return exc


def _dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).replace("torch.", "")
    if name not in _DTYPES:
        raise StateError(f"dtype: expected one of {sorted(_DTYPES)} to save, found {dtype}")
    return name


def _library_version() -> str:
    from .. import __version__

    return __version__


LayerEntry = tuple  # (idx, kind, {name: tensor}) or, as before 0.2, (idx, kind, conv_state, ssm_state)
"""One layer as the format sees it: ``(idx, kind, tensors)`` with ``tensors`` the family's named tensors, or the
0.1 form ``(idx, kind, conv_state, ssm_state)`` of a Mamba-1/2 layer; ``idx`` is ``None`` in a single-layer file."""


def _named(entry: Sequence[Any]) -> tuple[int | None, str, dict[str, torch.Tensor]]:
    if len(entry) == 4:
        idx, kind, conv, ssm = entry
        return idx, kind, {"conv_state": conv, "ssm_state": ssm}
    idx, kind, tensors = entry
    return idx, kind, dict(tensors)

# what building a state from a validated file may raise: reported as an inconsistent file (see inconsistent())
BUILD_ERRORS = (StateError, ValueError, KeyError, TypeError, RuntimeError)


def inconsistent(where: str, exc: BaseException) -> StateFormatError:
    """The error for a file that passed validation but whose contents do not make a state."""
    return StateFormatError(f"{where}: expected a consistent mamba-state file, found {type(exc).__name__}: {exc}")


# ---------------------------------------------------------------------------------------------- bounded JSON
# a JSON string literal (escapes included); the unrolled form never backtracks more than linearly
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_DEEP_RUN = re.compile(rb"[\[{]{%d}" % (MAX_JSON_DEPTH + 1))  # more opening brackets in a row than the depth allows


def check_json_bounds(text: bytes | str) -> str | None:
    """Why ``text`` is beyond the JSON limits (nested deeper than :data:`MAX_JSON_DEPTH`, more than
    :data:`MAX_JSON_CONTAINERS` arrays and objects), or ``None`` when it is within them.

    Works on the brackets outside string literals, without parsing: ``json.loads`` of a deep text raises
    ``RecursionError``, and a long one (``[],[],...``) allocates tens of bytes per byte before anything can be
    checked."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    skeleton = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    if len(skeleton) > 2 * MAX_JSON_CONTAINERS:
        return f"at most {MAX_JSON_CONTAINERS} arrays and objects, found {len(skeleton) // 2}"
    too_deep = f"nesting at most {MAX_JSON_DEPTH} deep, found deeper nesting (or unbalanced brackets)"
    if _DEEP_RUN.search(skeleton):  # the common deep text, refused without the passes below
        return too_deep
    for _ in range(MAX_JSON_DEPTH):
        if not skeleton:
            return None
        # one nesting level per pass: re.sub does not rescan the pairs its own removals bring together
        skeleton = _EMPTY_PAIR.sub(b"", skeleton)
    return too_deep if skeleton else None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def loads_bounded(text: bytes | str, what: str, allow_constants: bool = False) -> Any:
    """``json.loads`` within the limits: refuses (``StateFormatError`` naming ``what``) texts beyond
    :func:`check_json_bounds`, invalid JSON, duplicate object keys and, unless ``allow_constants``, ``NaN`` /
    ``Infinity``."""
    try:
        too_big = check_json_bounds(text)
    except UnicodeEncodeError as exc:
        raise StateFormatError(f"{what}: expected UTF-8 JSON, found unencodable text ({exc})") from None
    if too_big is not None:
        raise StateFormatError(f"{what}: expected JSON with {too_big}")
    try:
        if allow_constants:
            return json.loads(text, object_pairs_hook=_no_duplicates)
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StateFormatError(f"{what}: expected valid JSON, found {str(exc)[:200]}") from None


# ---------------------------------------------------------------------------------------------- save
def _entry_layout(kind: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    return {"kind": kind, **{f"{TENSOR_FIELDS[name]}_shape": list(t.shape[1:]) for name, t in tensors.items()}}


def serialize(container: str, layers: Sequence[LayerEntry], *, seqlen_offset: int, metadata: Mapping[str, Any],
              model: Any = None) -> bytes:
    """The checksummed safetensors bytes of a state: ``container`` is ``"model"`` or ``"layer"`` (one entry, idx
    ``None``); ``metadata`` is the user metadata; ``model`` records its layout (and, for a model state, must fit
    it: a subset of its layers with the same kinds and shapes).

    Refuses (``StateError``) what a reader would refuse: more than :data:`MAX_LAYERS` layers, metadata beyond the
    JSON limits, a header over :data:`MAX_HEADER_BYTES`; a file that saves always loads."""
    from safetensors.torch import save as st_save

    if len(layers) > MAX_LAYERS:
        raise StateError(f"state: expected at most {MAX_LAYERS} layers to save, found {len(layers)}")
    named = [_named(e) for e in layers]
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    for idx, kind, layer_tensors in named:
        if kind not in FAMILY_TENSORS or tuple(layer_tensors) != FAMILY_TENSORS[kind]:
            raise StateError(f"state: expected a layer kind in {sorted(FAMILY_TENSORS)} with its tensors "
                             f"{list(FAMILY_TENSORS.get(kind, ()))}, found kind {kind!r} with {list(layer_tensors)}")
        prefix = f"layers.{idx}." if container == "model" else ""
        ssm = layer_tensors["ssm_state"]
        if ssm.device.type == "meta":
            raise StateError(f"state: expected tensors with data to save, found {ssm.device} tensors (no data)")
        entry: dict[str, Any] = {"idx": idx, "kind": kind, "device": str(ssm.device)}
        for name, t in layer_tensors.items():
            field = TENSOR_FIELDS[name]
            entry[f"{field}_shape"] = list(t.shape)
            entry[f"{field}_dtype"] = _dtype_name(t.dtype)
            # always a private copy: safetensors refuses tensors that share memory (one state under two layer
            # indices, or states built as views of one buffer)
            tensors[f"{prefix}{name}"] = t.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        entries.append(entry)
    # the oldest version that holds these layers: Mamba-1/2 files stay readable by 0.1.0
    version = 1 if all(kind in _KINDS_OF_VERSION[1] for _, kind, _ in named) else FORMAT_VERSION
    user = dict(metadata)
    try:
        user_json = json.dumps(user)
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateError(f"metadata: expected JSON-serialisable values, found {str(exc)[:200]}") from None
    too_big = check_json_bounds(user_json)
    if too_big is not None:  # refused here, or the file would save and never load back
        raise StateError(f"metadata: expected JSON with {too_big}")
    meta = {
        "format": FORMAT_NAME,
        "format_version": str(version),
        "container": container,
        "library_version": _library_version(),
        "seqlen_offset": str(seqlen_offset),
        "layers": json.dumps(entries),
        "user_metadata": user_json,
    }
    if model is not None:
        layout = model_layout(model)
        if container == "model":
            have = {idx: _entry_layout(kind, t) for idx, kind, t in named if idx is not None}
            _check_against_layout(have, layout, strict=False, where="save")
        meta["model_layout"] = json.dumps({str(k): v for k, v in layout.items()})
        meta["model_fingerprint"] = layout_fingerprint(layout)
    data = _with_checksum(st_save(tensors, metadata=meta))
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES:
        raise StateError(f"metadata: expected a file header of at most {MAX_HEADER_BYTES} bytes, found {n} "
                         "(the user metadata is too large for a state file)")
    return data


def _digest(header: Mapping[str, Any], data: bytes | memoryview | bytearray) -> str:
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


def _path_text(path: Any, what: str) -> str:
    """``path`` as a str, refusing what cannot name a file (``StateError``, not an ``OSError`` or ``TypeError``)."""
    try:
        text = os.fsdecode(os.fspath(path))
    except TypeError:
        raise StateError(f"path: expected a str or os.PathLike {what}, found {type(path).__name__}") from None
    if "\0" in text:
        raise StateError(f"path: expected a path without NUL characters, found {text!r}")
    if not text:
        raise StateError(f"path: expected a non-empty path {what}, found ''")
    return text


def check_save_path(path: str | os.PathLike) -> None:
    """Refuse a path that cannot become a file, before anything is written (``StateError`` naming it).

    A symlink is followed: the file it points to is what a save writes (a dangling link is fine when the
    directory it points into exists; a loop is refused)."""
    where = _path_text(path, "to write the state to")
    target = resolve_link(where)
    if target is None:
        raise StateError(f"path: expected a file path or a symlink to one, found a symlink loop at {where!r}")
    if os.path.isdir(target):
        raise StateError(f"path: expected a file path to write the state to, found a directory at {where!r}")
    if os.path.lexists(target) and not os.path.isfile(target):
        raise StateError(f"path: expected a regular file (or a new one) to write the state to, found "
                         f"{_file_kind(os.stat(target).st_mode)} at {where!r}")
    directory = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(directory):
        raise StateError(f"path: expected an existing directory for {where!r}, found none at {directory!r}")


_WRITE_REASONS = {
    _errno.ENOSPC: "the disk is full",
    getattr(_errno, "EDQUOT", -1): "the disk quota is exceeded",
    _errno.EROFS: "a read-only file system",
    _errno.EACCES: "no permission to write there",
    _errno.EPERM: "no permission to write there",
    _errno.EFBIG: "a file larger than the file system allows",
}


def write_error(where: str, nbytes: int, exc: OSError) -> StateWriteError:
    """The ``StateWriteError`` for an ``OSError`` raised while writing ``nbytes`` to ``where``."""
    reason = _WRITE_REASONS.get(exc.errno or 0, exc.strerror or str(exc) or type(exc).__name__)
    detail = f" ({_errno.errorcode.get(exc.errno, '?')}: {exc.strerror})" if exc.errno is not None else ""
    err = StateWriteError(f"{where}: expected to write {nbytes} bytes, found {reason}{detail}; the file is as it was "
                          "before the save")
    return _with_errno(err, exc)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (the caller has checked the path).

    A symlink at ``path`` is followed (its target is replaced, the link stays). Temporary files left beside the
    target by a save that was killed are removed first (:func:`~mamba_state.state.files.sweep_stale_temps`). A new
    file gets the permissions the umask gives (``0o666 & ~umask``, as ``open(path, "wb")`` would); a replaced file
    keeps its permission bits (see :mod:`mamba_state.state.files`). An ``OSError`` while writing (a full disk)
    raises :class:`StateWriteError` saying so, with the destination unchanged and the temporary file removed.
    """
    where = _path_text(path, "to write the state to")
    target = resolve_link(where)
    if target is None:
        raise StateError(f"path: expected a file path or a symlink to one, found a symlink loop at {where!r}")
    directory = os.path.dirname(os.path.abspath(target))
    sweep_stale_temps(target)
    try:
        fd, tmp = open_temp_beside(target)
    except OSError as exc:
        raise write_error(where, len(data), exc) from None
    closed = False
    try:
        lock_temp(fd)  # a live save's temporary file is locked, so that another save's sweep leaves it alone
        _write_all(fd, data)
        os.fsync(fd)
        if os.name == "nt":  # Windows cannot rename an open file; elsewhere the lock is held through the rename
            os.close(fd)
            closed = True
        replace_keeping_mode(tmp, target)
    except BaseException as exc:
        if not closed:
            os.close(fd)
            closed = True
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise write_error(where, len(data), exc) from None
        raise
    finally:
        if not closed:
            os.close(fd)
    try:  # make the rename itself durable; not every platform can open a directory
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------------- load: the file
def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return f"a special file (mode {stat.S_IFMT(mode):#o})"


def _sniff(data: bytes) -> str:
    if not data:
        return "an empty file"
    if data[:2] == b"PK":
        return "a zip archive (torch.save output?)"
    if data[:1] == b"\x80":
        return "a pickle stream"
    return "bytes that do not start with a safetensors header"


def _access_error(where: str, exc: OSError) -> StateFormatError:
    if isinstance(exc, FileNotFoundError):
        return _with_errno(StateFileNotFoundError(f"{where}: expected a mamba-state file, found no such file"), exc)
    reason = {_errno.EACCES: "no permission to read it", _errno.EPERM: "no permission to read it",
              _errno.ELOOP: "a symlink loop", _errno.ENAMETOOLONG: "a name too long for the file system",
              _errno.ENOTDIR: "a path through something that is not a directory",
              _errno.EISDIR: "a directory"}.get(exc.errno or 0, exc.strerror or type(exc).__name__)
    return _with_errno(StateFileAccessError(f"{where}: expected a readable mamba-state file, found {reason} "
                                            f"({_errno.errorcode.get(exc.errno or 0, '?')})"), exc)


# O_NONBLOCK: opening a FIFO for reading must not wait for a writer (the file type is checked right after)
_READ_FLAGS = (os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
               | getattr(os, "O_NONBLOCK", 0))


class _Reader:
    """A regular file opened for reading, its size known before anything is read."""

    def __init__(self, path: Any):
        self.where = _path_text(path, "of a state file")
        try:
            fd = os.open(self.where, _READ_FLAGS)
        except OSError as exc:
            raise _access_error(self.where, exc) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block, /dev/zero never end
                raise StateFormatError(f"{self.where}: expected a regular mamba-state file, found "
                                       f"{_file_kind(st.st_mode)}")
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size
        self.file = os.fdopen(fd, "rb", buffering=0)

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def read(self, n: int, what: str) -> bytearray:
        """Exactly ``n`` bytes (``n`` is within the size known at open)."""
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        try:
            while got < n:
                k = self.file.readinto(view[got:])
                if not k:
                    raise StateFormatError(f"{self.where}: expected {n} bytes of {what}, found {got} (the file "
                                           "shrank while it was read)")
                got += k
        except OSError as exc:
            raise _access_error(self.where, exc) from None
        return buf

    def at_end(self) -> bool:
        try:
            return not self.file.read(1)
        except OSError as exc:
            raise _access_error(self.where, exc) from None


# ---------------------------------------------------------------------------------------------- load: the header
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _canonical_int(meta: Mapping[str, str], key: str, where: str) -> int:
    value = meta.get(key)
    if value is None:
        raise StateFormatError(f"{where}: expected metadata key {key!r}, found keys {sorted(meta)}")
    if not _DECIMAL.fullmatch(value):
        raise StateFormatError(f"{where}: expected {key} as a non-negative integer in decimal digits (such as "
                               f"'1'), found {value!r:.60}")
    return int(value)


def _shape(value: Any, ranks: tuple[int, ...], what: str, where: str) -> list[int]:
    if (not isinstance(value, list) or len(value) not in ranks
            or not all(_is_int(d) and 0 <= d <= MAX_DIM for d in value)):
        raise StateFormatError(f"{where}: {what}: expected a list of {' or '.join(map(str, ranks))} integers in "
                               f"0..{MAX_DIM}, found {value!r:.80}")
    return value


@dataclass(frozen=True)
class _TensorInfo:
    name: str
    dtype: str  # one of _DTYPES
    shape: tuple[int, ...]
    begin: int
    end: int


@dataclass(frozen=True)
class _Header:
    meta: dict[str, str]
    container: str
    seqlen_offset: int
    user: dict[str, Any]
    entries: list[dict[str, Any]]
    tensors: list[_TensorInfo]  # in entry order, each layer's in its family's order
    checksum: str


def entry_tensor_names(entry: Mapping[str, Any]) -> tuple[str, ...]:
    """The tensor names of a checked layer entry (its family's, :data:`FAMILY_TENSORS`)."""
    return FAMILY_TENSORS["mamba3"] if entry["kind"] == "mamba3" else FAMILY_TENSORS["mamba1"]


def _check_entry(entry: Any, k: int, container: str, where: str, version: int = 1) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise StateFormatError(f"{where}: layer entry {k}: expected an object, found {entry!r:.60}")
    if entry.get("kind") == "mamba3":
        if "mamba3" not in _KINDS_OF_VERSION[version]:
            raise StateFormatError(f"{where}: layer entry {k} kind: expected one of "
                                   f"{list(_KINDS_OF_VERSION[version])} in a format_version {version} file, found "
                                   "'mamba3' (Mamba-3 layers are written as format_version 2)")
        return _check_mamba3_entry(entry, k, container, where)
    missing = [key for key in _ENTRY_KEYS if key not in entry]
    if missing:
        raise StateFormatError(f"{where}: layer entry {k}: expected keys {list(_ENTRY_KEYS)}, found {sorted(entry)} "
                               f"(missing {missing})")
    idx = entry["idx"]
    if container == "model" and not (_is_int(idx) and 0 <= idx <= MAX_DIM):
        raise StateFormatError(f"{where}: expected a non-negative int layer idx, found {idx!r:.40}")
    if container == "layer" and idx is not None:
        raise StateFormatError(f"{where}: expected layer idx null in a single-layer file, found {idx!r:.40}")
    name = idx if container == "model" else 0
    conv = _shape(entry["conv_shape"], (3,), f"layer {name} conv_shape", where)
    ssm = _shape(entry["ssm_shape"], (3, 4), f"layer {name} ssm_shape", where)
    for key in ("conv_dtype", "ssm_dtype"):
        if not isinstance(entry[key], str) or entry[key] not in _DTYPES:
            raise StateFormatError(f"{where}: layer {name} {key}: expected one of {sorted(_DTYPES)}, found "
                                   f"{entry[key]!r:.40}")
    # the kind is read from the tensors (ssm_state rank 3: Mamba-1, rank 4: Mamba-2); a file must agree
    kind = _KIND_OF_RANK[len(ssm)]
    if entry["kind"] != kind:
        raise StateFormatError(f"{where}: layer {name} kind: expected {kind!r} (ssm_state of shape {ssm}), found "
                               f"{entry['kind']!r:.40} in the metadata")
    _check_entry_device(entry["device"], name, where)
    return {**entry, "conv_shape": conv, "ssm_shape": ssm}


def _check_entry_device(device: Any, name: Any, where: str) -> None:
    try:
        if not isinstance(device, str):
            raise TypeError(type(device).__name__)
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise StateFormatError(f"{where}: layer {name} device: expected a device name such as 'cpu' or 'cuda:0', "
                               f"found {device!r:.40}") from None


def _check_mamba3_entry(entry: dict[str, Any], k: int, container: str, where: str) -> dict[str, Any]:
    """A Mamba-3 layer entry (format_version 2): its four tensors' shapes (ranks, agreeing sizes) and dtypes."""
    missing = [key for key in _MAMBA3_ENTRY_KEYS if key not in entry]
    if missing:
        raise StateFormatError(f"{where}: layer entry {k}: expected keys {list(_MAMBA3_ENTRY_KEYS)}, found "
                               f"{sorted(entry)} (missing {missing})")
    idx = entry["idx"]
    if container == "model" and not (_is_int(idx) and 0 <= idx <= MAX_DIM):
        raise StateFormatError(f"{where}: expected a non-negative int layer idx, found {idx!r:.40}")
    if container == "layer" and idx is not None:
        raise StateFormatError(f"{where}: expected layer idx null in a single-layer file, found {idx!r:.40}")
    name = idx if container == "model" else 0
    out = dict(entry)
    for _, field, rank in family_fields("mamba3"):
        out[f"{field}_shape"] = _shape(entry[f"{field}_shape"], (rank,), f"layer {name} {field}_shape", where)
        dtype = entry[f"{field}_dtype"]
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise StateFormatError(f"{where}: layer {name} {field}_dtype: expected one of {sorted(_DTYPES)}, found "
                                   f"{dtype!r:.40}")
    _check_entry_device(entry["device"], name, where)
    return out


def _check_tensor(header: Mapping[str, Any], key: str, dtype: str, shape: list[int], where: str) -> _TensorInfo:
    info = header.get(key)
    if not isinstance(info, dict):
        raise StateFormatError(f"{where}: expected tensor {key!r}, found none")
    if set(info) != _TENSOR_KEYS:
        raise StateFormatError(f"{where}: tensor {key!r}: expected keys {sorted(_TENSOR_KEYS)}, found {sorted(info)}")
    st_dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if st_dtype != dtype:
        raise StateFormatError(f"{where}: tensor {key!r}: expected dtype {dtype!r}, found {info['dtype']!r:.40}")
    found = info["shape"]
    # compared element by element as ints: [2.0, 6, 5] == [2, 6, 5] in Python
    if not (isinstance(found, list) and len(found) == len(shape) and all(_is_int(d) for d in found)
            and found == shape):
        raise StateFormatError(f"{where}: tensor {key!r}: expected shape {shape}, found {found!r:.80}")
    nbytes = _ITEMSIZE[dtype]
    for d in shape:
        nbytes *= d
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] and offsets[1] - offsets[0] == nbytes):
        raise StateFormatError(f"{where}: tensor {key!r}: expected data_offsets [begin, begin + {nbytes}] (shape "
                               f"{shape}, {dtype}), found {offsets!r:.80}")
    return _TensorInfo(key, dtype, tuple(shape), offsets[0], offsets[1])


def _check_header(header: Any, where: str, data_nbytes: int) -> _Header:
    """Every field of a parsed header, type-checked in its canonical form, and the tensors' byte ranges against
    the data section's size (``data_nbytes``, from the file's size): all before any data is read."""
    if not isinstance(header, dict):
        raise StateFormatError(f"{where}: expected a JSON object header, found {type(header).__name__}")
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise StateFormatError(
            f"{where}: expected a safetensors file with metadata format={FORMAT_NAME!r}, found "
            + (f"format={found!r:.60}" if found is not None else "a safetensors file of something else")
        )
    for key, value in meta.items():
        if not isinstance(value, str):  # safetensors metadata is str -> str
            raise StateFormatError(f"{where}: metadata {key!r:.40}: expected a string value, found "
                                   f"{type(value).__name__} {value!r:.40}")
    version = _canonical_int(meta, "format_version", where)
    if version > FORMAT_VERSION:
        raise StateFormatError(
            f"{where}: expected format_version <= {FORMAT_VERSION}, found {version} (written by mamba-state "
            f"{meta.get('library_version', '?')!r:.40}; upgrade mamba-state to read it)"
        )
    if version < 1:
        raise StateFormatError(f"{where}: expected format_version >= 1, found {version}")
    checksum = meta.get("checksum")
    if checksum is None:
        raise StateFormatError(f"{where}: expected a 'checksum' in the metadata, found none")
    if not _CHECKSUM.fullmatch(checksum):
        raise StateFormatError(f"{where}: expected checksum 'sha256:' and 64 hex digits, found {checksum!r:.80}")
    container = meta.get("container")
    if container not in ("model", "layer"):
        raise StateFormatError(f"{where}: expected container 'model' or 'layer', found {container!r:.40}")
    seqlen_offset = _canonical_int(meta, "seqlen_offset", where)
    if "layers" not in meta:
        raise StateFormatError(f"{where}: expected metadata key 'layers', found keys {sorted(meta)}")
    layers = loads_bounded(meta["layers"], f"{where}: metadata 'layers'")
    if (not isinstance(layers, list) or not layers or len(layers) > MAX_LAYERS
            or (container == "layer" and len(layers) != 1)):
        count = "exactly one" if container == "layer" else f"1..{MAX_LAYERS}"
        raise StateFormatError(f"{where}: expected a non-empty list of layers ({count}) in metadata, found "
                               f"{layers!r:.80}")
    user: Any = {}
    if "user_metadata" in meta:
        # NaN / Infinity allowed: json.dumps writes them, and 0.1.0 files may hold them
        user = loads_bounded(meta["user_metadata"], f"{where}: metadata 'user_metadata'", allow_constants=True)
        if not isinstance(user, dict):
            raise StateFormatError(f"{where}: metadata 'user_metadata': expected a JSON object, found "
                                   f"{type(user).__name__}")
    fingerprint = meta.get("model_fingerprint")
    if fingerprint is not None and not _FINGERPRINT.fullmatch(fingerprint):
        raise StateFormatError(f"{where}: metadata 'model_fingerprint': expected 16 hex digits, found "
                               f"{fingerprint!r:.40}")
    if "model_layout" in meta and not isinstance(loads_bounded(meta["model_layout"],
                                                               f"{where}: metadata 'model_layout'"), dict):
        raise StateFormatError(f"{where}: metadata 'model_layout': expected a JSON object, found another value")

    entries, tensors, seen = [], [], set()
    for k, raw_entry in enumerate(layers):
        entry = _check_entry(raw_entry, k, container, where, version)
        if entry["idx"] in seen:
            raise StateFormatError(f"{where}: expected each layer listed once, found layer {entry['idx']} twice")
        seen.add(entry["idx"])
        prefix = f"layers.{entry['idx']}." if container == "model" else ""
        for name in entry_tensor_names(entry):
            field = TENSOR_FIELDS[name]
            tensors.append(_check_tensor(header, f"{prefix}{name}", entry[f"{field}_dtype"],
                                         entry[f"{field}_shape"], where))
        entries.append(entry)
    extra = set(header) - {t.name for t in tensors} - {"__metadata__"}
    if extra:
        raise StateFormatError(f"{where}: expected only state tensors, found extra entries {sorted(extra)[:5]}")
    # the byte ranges tile the data section exactly, as safetensors requires: no gaps, no overlaps
    pos = 0
    for t in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if t.begin != pos:
            found = "a gap" if t.begin > pos else "an overlap with the previous tensor"
            raise StateFormatError(f"{where}: tensor {t.name!r}: expected its data to start at byte {pos}, found "
                                   f"{found} (data_offsets begin at {t.begin})")
        pos = t.end
    if pos != data_nbytes:
        raise StateFormatError(f"{where}: expected {pos} bytes of tensor data, found {data_nbytes} (truncated or "
                               "padded file)")
    return _Header(meta, container, seqlen_offset, user, entries, tensors, checksum)


def _read_validated(path: Any, with_tensors: bool) -> tuple[str, _Header, dict[str, torch.Tensor]]:
    """The one reading front: ``(where, header, tensors)``; every check done before any tensor exists."""
    with _Reader(path) as f:
        where = f.where
        if f.size < 8:
            raise StateFormatError(f"{where}: expected a mamba-state safetensors file, found "
                                   f"{_sniff(bytes(f.read(f.size, 'file')))} ({f.size} bytes)")
        prefix = bytes(f.read(8, "header length"))
        (n,) = struct.unpack("<Q", prefix)
        if n == 0 or n > f.size - 8:
            raise StateFormatError(f"{where}: expected a mamba-state safetensors file, found {_sniff(prefix)} "
                                   f"(a header length of {n} bytes in a file of {f.size})")
        if n > MAX_HEADER_BYTES:
            raise StateFormatError(f"{where}: expected a header of at most {MAX_HEADER_BYTES} bytes, found one of "
                                   f"{n} bytes")
        try:
            text = f.read(n, "header").decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StateFormatError(f"{where}: expected a UTF-8 JSON safetensors header, found unreadable bytes "
                                   f"({exc})") from None
        header_doc = loads_bounded(text, f"{where}: safetensors header")
        data_nbytes = f.size - 8 - n
        header = _check_header(header_doc, where, data_nbytes)
        data = f.read(data_nbytes, "tensor data")
        if not f.at_end():
            raise StateFormatError(f"{where}: expected {f.size} bytes, found more (the file grew while it was read)")
    unchecked = {k: (dict(v) if k == "__metadata__" else v) for k, v in header_doc.items()}
    unchecked["__metadata__"].pop("checksum")
    actual = _digest(unchecked, data)
    if header.checksum != actual:
        raise StateFormatError(f"{where}: expected checksum {header.checksum}, found {actual} (the file is corrupted)")
    tensors: dict[str, torch.Tensor] = {}
    if with_tensors:
        for t in header.tensors:
            dtype = _DTYPES[t.dtype]
            if t.end == t.begin:
                tensors[t.name] = torch.empty(t.shape, dtype=dtype)
                continue
            # a private, aligned copy per tensor (the data's offsets need not be aligned to the dtype); safetensors
            # is little-endian, as every platform torch runs on
            raw = torch.frombuffer(data, dtype=torch.uint8, count=t.end - t.begin, offset=t.begin).clone()
            tensors[t.name] = raw.view(dtype).reshape(t.shape)
    return where, header, tensors


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
        # the kind first: layouts of other families have other shape keys
        for key in ["kind"] + sorted(k for k in exp if k != "kind"):
            if got.get(key) != exp[key]:
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

    def named_layers(self) -> Iterator[tuple[int | None, dict[str, torch.Tensor]]]:
        """``(idx, {name: tensor})`` of each layer in file order (its family's named tensors), moved to its device
        one layer at a time."""
        for entry in self.entries:
            prefix = f"layers.{entry['idx']}." if self.container == "model" else ""
            # the warning points at the caller of the public load: this generator, the containers' reader and the
            # public function lie between
            dev = _resolve_device(str(entry.get("device", "cpu")), self.device, stacklevel=5)
            yield entry["idx"], {name: self.tensors[prefix + name].to(dev) for name in entry_tensor_names(entry)}

    def layers(self) -> Iterator[tuple[int | None, torch.Tensor, torch.Tensor]]:
        """``(idx, conv_state, ssm_state)`` of each layer in file order (the 0.1 form: Mamba-1/2 files only; a
        Mamba-3 layer raises ``StateCompatibilityError``, use :meth:`named_layers`)."""
        for idx, tensors in self.named_layers():
            if "conv_state" not in tensors:
                raise StateCompatibilityError(f"{self.where}: layer {idx}: expected a Mamba-1/2 layer for "
                                              "StateFile.layers(), found a mamba3 layer (use named_layers())")
            yield idx, tensors["conv_state"], tensors["ssm_state"]

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
    """Read and validate a state file (``device`` is checked first, before the file is read).

    Checks, in order: the path names a regular file; its header length is within the file and
    :data:`MAX_HEADER_BYTES`; the header is UTF-8 JSON within the limits (depth, size; no duplicate keys, no
    ``NaN``); ``format`` and ``format_version``; every metadata value in its canonical type and form; each layer
    listed once with tensors of the declared dtypes and shapes whose byte ranges tile the data section, whose size
    the file's size gives; then the data is read and the checksum verified. Raises ``StateFormatError``
    (``StateFileNotFoundError`` for a missing file, ``StateFileAccessError`` for an OS error) naming the file."""
    target = _check_device(device)  # an argument error, not the file's fault: checked before reading
    where, header, tensors = _read_validated(path, with_tensors=True)
    return StateFile(where, header.container, header.seqlen_offset, header.user, header.meta.get("model_fingerprint"),
                     header.entries, tensors, target)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of a state file, validated like :func:`read_state` (the checksum included) but without
    building tensors."""
    _, header, _ = _read_validated(path, with_tensors=False)
    out: dict[str, Any] = {k: v for k, v in header.meta.items() if k not in ("layers", "user_metadata", "model_layout")}
    out["layers"] = header.entries
    out["user_metadata"] = header.user
    return out
