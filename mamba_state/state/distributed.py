"""Moving states between processes with ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs).

Functions (all take ``group=None``, meaning the default process group; ranks are global ranks, as in
``torch.distributed``; "rank order" is the order of ranks within ``group``):

* :func:`send_state` / :func:`recv_state`: point to point; the receiver needs no prior knowledge of the state.
* :func:`broadcast_state`: one rank's state to every rank of the group.
* :func:`all_gather_states`: every rank's state, concatenated along the batch in rank order (batch sizes may
  differ between ranks).
* :func:`scatter_state`: one rank's state split along the batch, one part per rank.

All work for :class:`~mamba_state.state.MambaInferenceState` and :class:`~mamba_state.state.MambaModelState`
with any floating dtype (float64/32/16, bfloat16, float8): tensors travel as raw bytes, so a round trip is bit
exact. Only ``torch.distributed`` collectives and point-to-point calls are used; there is no transport of our own.

Wire protocol (format version 1). Every transfer sends, in order:

1. a *preamble*: 8 int64 words ``[magic, format_version, operation, status, header_nbytes, header_crc32,
   data_nbytes, preamble_crc32]``; ``preamble_crc32`` covers the first seven words, ``status`` is 0, or 1 when
   the sending rank rejected its own state (the receivers then raise ``StateError`` instead of waiting);
2. a *header*: UTF-8 JSON describing the layout (container kind, layer indices, full shapes and dtypes,
   ``seqlen_offset``, user metadata, for a scatter the per-rank batch sizes), checked by ``header_crc32``. A layer
   entry is ``{idx, conv_shape, conv_dtype, ssm_shape, ssm_dtype}`` for Mamba-1/2 (as in 0.1), and ``{idx, kind:
   "mamba3", angle_shape, angle_dtype, ssm_shape, ssm_dtype, k_shape, k_dtype, v_shape, v_dtype}`` for Mamba-3
   (a 0.1 receiver refuses such an entry as a malformed header, which reaches the sender);
3. the *data*, as raw bytes: point to point, one message per tensor (each layer's named tensors in its family's
   order, layer by layer), posted
   together with ``batch_isend_irecv`` (no packing copy; NCCL groups them into one call); collectives, one
   ``uint8`` buffer with every tensor at a 64-byte aligned offset (see :mod:`mamba_state._packing`).

Receivers check the preamble and the header before any data moves, and the ranks agree on the outcome before
the next step (point to point: the receiver answers with a 2-word acknowledgement; collectives: an all-reduce of
the status), so a mismatched or corrupted header raises :class:`~mamba_state.errors.StateFormatError` on the
receiving rank, and the sending rank raises too, instead of one side waiting forever.

Bounds. A header is at most :data:`MAX_HEADER_BYTES` and its JSON within the file format's depth and size limits
(:func:`mamba_state.state.format.loads_bounded`); the announced data at most :data:`MAX_DATA_BYTES` and what
:func:`data_limit` gives for the receiving device. Buffers are allocated before a receiver acknowledges (point to
point) or the ranks agree (collectives): every receive-side failure, whatever raised it, reaches the sender, and
a sender refuses what receivers would before anything is sent.

Devices: with NCCL every tensor that travels (preamble, header, acknowledgement, data) is on the rank's current
CUDA device (``torch.cuda.current_device()``: call ``torch.cuda.set_device(local_rank)`` first); with Gloo it is
on the CPU. States on another device are copied to that device for the transfer.

Timeouts. What cannot be detected is a peer that never calls the matching function (or calls a different one):
the waiting rank blocks until the process group's timeout (``init_process_group(timeout=...)``; by default 30
minutes for Gloo, 10 minutes for NCCL). Gloo then raises ``RuntimeError`` on the waiting rank; NCCL's watchdog
aborts the communicator and, with the default ``TORCH_NCCL_ASYNC_ERROR_HANDLING``, ends the process. Argument
errors that make communication impossible (no process group, a rank outside the group, sending to oneself) raise
``StateError`` before anything is sent.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Callable, NoReturn, Sequence, TypeGuard, cast

import torch
import torch.distributed as dist

from ..errors import StateCompatibilityError, StateError, StateFormatError
from .containers import MambaInferenceState, MambaModelState
from .format import check_json_bounds, loads_bounded
from .layers import TENSOR_FIELDS, family_fields
from .packing import (LayerSpec, StateSpec, TensorSpec, build_state, dtype_from_name, dtype_name, pack_into, state_spec,
                      state_tensors, unpack)

__all__ = ["send_state", "recv_state", "broadcast_state", "all_gather_states", "scatter_state", "even_sizes",
           "MAGIC", "FORMAT_VERSION", "MAX_HEADER_BYTES", "MAX_DATA_BYTES", "data_limit"]

MAGIC = 0x4D414D4241535431  # b"MAMBAST1" read as a big-endian int64
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024 * 1024  # user metadata travels in the header; this bounds what a receiver allocates
# the most state data one transfer may announce; a receiver also refuses more than its device's total memory
MAX_DATA_BYTES = 1 << 40  # 1 TiB
_HEADER_FORMAT = "mamba-state-transfer"

# operations (word 2 of the preamble): a receiver of one kind refuses a preamble of another
OP_P2P, OP_BROADCAST, OP_ALL_GATHER, OP_SCATTER = 1, 2, 3, 4
_OP_NAMES = {OP_P2P: "send_state", OP_BROADCAST: "broadcast_state", OP_ALL_GATHER: "all_gather_states",
             OP_SCATTER: "scatter_state"}

# status / rejection codes (in the preamble's status word, acknowledgements and agreement all-reduces)
OK, SENDER_ABORT = 0, 1
BAD_MAGIC, BAD_VERSION, BAD_PREAMBLE_CHECKSUM, BAD_OPERATION, BAD_HEADER_SIZE = 2, 3, 4, 5, 6
BAD_HEADER_CHECKSUM, BAD_HEADER, INCOMPATIBLE, DATA_TOO_LARGE = 7, 8, 9, 10
_REASONS = {
    SENDER_ABORT: "the sending rank rejected its own state",
    BAD_MAGIC: "bad magic number (not a mamba-state transfer)",
    BAD_VERSION: "unsupported format version",
    BAD_PREAMBLE_CHECKSUM: "preamble checksum mismatch",
    BAD_OPERATION: "the ranks called different transfer functions",
    BAD_HEADER_SIZE: "header size out of range",
    BAD_HEADER_CHECKSUM: "header checksum mismatch",
    BAD_HEADER: "malformed header",
    INCOMPATIBLE: "incompatible states or sizes",
    DATA_TOO_LARGE: "announced data size beyond the receiver's limit, or its allocation failed",
}


class _Rejected(Exception):
    """A receiving-side check failed: ``code`` travels to the peers, ``message`` is raised locally."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------- group context
@dataclass
class _Comm:
    group: Any
    backend: str
    device: torch.device  # where tensors must be to travel
    rank: int  # global rank of this process
    group_rank: int
    ranks: list[int]  # global ranks of the group, in group-rank order

    @property
    def size(self) -> int:
        return len(self.ranks)


def _comm(group: Any, where: str) -> _Comm:
    if not dist.is_available() or not dist.is_initialized():
        raise StateError(f"{where}: expected an initialised torch.distributed process group, found none "
                         "(call torch.distributed.init_process_group first)")
    pg = group if group is not None else dist.group.WORLD
    group_rank = dist.get_rank(pg)
    if group_rank < 0:
        raise StateError(f"{where}: expected this process (rank {dist.get_rank()}) to be a member of the group, "
                         "found it is not")
    backend = str(dist.get_backend(pg)).lower()
    if "nccl" in backend:
        if not torch.cuda.is_available():
            raise StateError(f"{where}: expected CUDA for the NCCL backend, found no CUDA device")
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return _Comm(pg, backend, device, dist.get_rank(), group_rank, list(dist.get_process_group_ranks(pg)))


def _check_peer(comm: _Comm, peer: Any, name: str, where: str, allow_self: bool) -> int:
    if not isinstance(peer, int) or isinstance(peer, bool):
        raise StateError(f"{where}: expected an int {name} (a global rank), found {type(peer).__name__} {peer!r}")
    if peer not in comm.ranks:
        raise StateError(f"{where}: expected {name} among the group's ranks {comm.ranks}, found {peer}")
    if not allow_self and peer == comm.rank:
        raise StateError(f"{where}: expected {name} to be another rank than this one, found {peer} (this rank)")
    return peer


# ---------------------------------------------------------------------------------------------- header encoding
def _encode_header(spec: StateSpec, extra: dict[str, Any] | None = None) -> bytes:
    from .. import __version__

    layers = []
    for l in spec.layers:
        entry: dict[str, Any] = {"idx": l.idx}
        if "conv_state" not in l.names:  # Mamba-3; Mamba-1/2 entries stay as 0.1 sent them (no kind)
            entry["kind"] = "mamba3"
        for name, t in l.tensors:
            entry[f"{TENSOR_FIELDS[name]}_shape"] = list(t.shape)
            entry[f"{TENSOR_FIELDS[name]}_dtype"] = dtype_name(t.dtype)
        layers.append(entry)
    doc = {"format": _HEADER_FORMAT, "format_version": FORMAT_VERSION, "library_version": __version__,
           "container": spec.container, "seqlen_offset": spec.seqlen_offset, "metadata": spec.metadata,
           "layers": layers, "data_nbytes": spec.nbytes(), **(extra or {})}
    try:
        text = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        raise StateError(f"metadata: expected JSON-serialisable values, found {str(exc)[:200]}") from None
    # refused here, before anything is sent, what every receiver would refuse
    too_big = check_json_bounds(text)
    if too_big is not None:
        raise StateError(f"metadata: expected JSON with {too_big}")
    if len(text) > MAX_HEADER_BYTES:
        raise StateError(f"metadata: expected a transfer header of at most {MAX_HEADER_BYTES} bytes, found "
                         f"{len(text)}")
    if spec.nbytes() > MAX_DATA_BYTES:
        raise StateError(f"state: expected at most {MAX_DATA_BYTES} bytes of data per transfer, found "
                         f"{spec.nbytes()}")
    return text


def _is_count(x: Any) -> TypeGuard[int]:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _shape(value: Any, ranks: tuple[int, ...], what: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) not in ranks or not all(_is_count(v) for v in value):
        raise _Rejected(BAD_HEADER, f"{what}: expected a list of {' or '.join(map(str, ranks))} non-negative ints, "
                                    f"found {value!r:.80}")
    return tuple(value)


def _decode_header(data: bytes) -> tuple[StateSpec, dict[str, Any]]:
    """Parse and check a header; raises :class:`_Rejected` naming the first problem."""
    try:
        doc = loads_bounded(data.decode("utf-8"), "header")
    except UnicodeDecodeError as exc:
        raise _Rejected(BAD_HEADER, f"header: expected UTF-8 JSON, found unreadable bytes ({exc})") from None
    except StateFormatError as exc:  # invalid JSON, or deeper / larger than the limits of a state file's JSON
        raise _Rejected(BAD_HEADER, str(exc)) from None
    if not isinstance(doc, dict) or doc.get("format") != _HEADER_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise _Rejected(BAD_HEADER, f"header: expected format {_HEADER_FORMAT!r}, found {found!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise _Rejected(BAD_VERSION, f"header: expected format_version {FORMAT_VERSION}, found "
                                     f"{doc.get('format_version')!r}")
    container = doc.get("container")
    if container not in ("model", "layer"):
        raise _Rejected(BAD_HEADER, f"header: expected container 'model' or 'layer', found {container!r}")
    entries = doc.get("layers")
    if not isinstance(entries, list) or not entries or (container == "layer" and len(entries) != 1):
        count = "one" if container == "layer" else "any number"
        raise _Rejected(BAD_HEADER, f"header: expected a non-empty list of layers ({count} for a {container} "
                                    f"state), found {entries!r:.80}")
    seqlen_offset, metadata = doc.get("seqlen_offset"), doc.get("metadata")
    if not _is_count(seqlen_offset):
        raise _Rejected(BAD_HEADER, f"header: expected a non-negative int seqlen_offset, found {seqlen_offset!r}")
    if container == "model" and not isinstance(metadata, dict):
        raise _Rejected(BAD_HEADER, f"header: expected a metadata object, found {type(metadata).__name__}")
    layers, previous = [], -1
    for k, e in enumerate(entries):
        if not isinstance(e, dict):
            raise _Rejected(BAD_HEADER, f"header: layer {k}: expected an object, found {e!r:.60}")
        idx = e.get("idx")
        if container == "model" and not (_is_count(idx) and idx > previous):
            raise _Rejected(BAD_HEADER, f"header: layer {k}: expected a non-negative int idx above {previous}, "
                                        f"found {idx!r}")
        if container == "layer" and idx is not None:
            raise _Rejected(BAD_HEADER, f"header: single-layer state: expected idx null, found {idx!r}")
        previous = cast(int, idx) if container == "model" else previous  # an int: checked above for a model
        kind = e.get("kind")
        if kind is None:  # Mamba-1/2 (the kind follows from the rank of ssm_state)
            fields = [("conv_state", "conv", (3,)), ("ssm_state", "ssm", (3, 4))]
        elif kind == "mamba3":
            fields = [(name, field, (rank,)) for name, field, rank in family_fields("mamba3")]
        else:
            raise _Rejected(BAD_HEADER, f"header: layer {idx}: expected kind absent (Mamba-1/2) or 'mamba3', found "
                                        f"{kind!r:.40}")
        specs: dict[str, TensorSpec] = {}
        for tname, name, ranks in fields:
            shape = _shape(e.get(f"{name}_shape"), ranks, f"header: layer {idx}: {name}_shape")
            dtype = dtype_from_name(e.get(f"{name}_dtype"))
            if dtype is None:
                raise _Rejected(BAD_HEADER, f"header: layer {idx}: {name}_dtype: expected a floating torch dtype "
                                            f"name, found {e.get(f'{name}_dtype')!r}")
            specs[tname] = TensorSpec(shape, dtype)
        layers.append(LayerSpec(idx, tensors=specs))
    spec = StateSpec(container, tuple(layers), seqlen_offset, metadata if container == "model" else None)
    try:  # the containers' own checks (batch agreement, channel counts), on meta tensors: no memory touched
        build_state(spec, [torch.empty(t.shape, dtype=t.dtype, device="meta") for t in spec.tensor_specs()])
    except (StateError, RuntimeError, OverflowError, TypeError, ValueError) as exc:  # torch: sizes beyond int64
        raise _Rejected(BAD_HEADER, f"header: describes an invalid state: {exc}") from None
    if doc.get("data_nbytes") != spec.nbytes():
        raise _Rejected(BAD_HEADER, f"header: expected data_nbytes {spec.nbytes()} for its layout, found "
                                    f"{doc.get('data_nbytes')!r}")
    return spec, doc


# ---------------------------------------------------------------------------------------------- preamble
def _preamble_words(op: int, status: int, header: bytes, data_nbytes: int) -> list[int]:
    words = [MAGIC, FORMAT_VERSION, op, status, len(header), zlib.crc32(header), data_nbytes]
    return words + [zlib.crc32(struct.pack("<7q", *words))]


def _check_preamble(words: Sequence[int], op: int) -> None:
    """Raise :class:`_Rejected` for a preamble that is not a valid one of operation ``op``."""
    magic, version, got_op, status, header_nbytes, _, data_nbytes, check = words
    if magic != MAGIC:
        raise _Rejected(BAD_MAGIC, f"preamble: expected magic {MAGIC:#x}, found {magic & (2**64 - 1):#x} "
                                   "(the peer is not sending a mamba-state transfer)")
    if zlib.crc32(struct.pack("<7q", *words[:7])) != check:
        raise _Rejected(BAD_PREAMBLE_CHECKSUM, f"preamble: expected checksum "
                                               f"{zlib.crc32(struct.pack('<7q', *words[:7])):#x}, found {check:#x}")
    if version != FORMAT_VERSION:
        raise _Rejected(BAD_VERSION, f"preamble: expected format version {FORMAT_VERSION}, found {version} "
                                     "(the ranks run different mamba-state versions)")
    if got_op != op:
        raise _Rejected(BAD_OPERATION, f"preamble: expected operation {_OP_NAMES[op]}, found "
                                       f"{_OP_NAMES.get(got_op, got_op)!r} (the ranks called different functions)")
    if status == SENDER_ABORT:
        raise _Rejected(SENDER_ABORT, "the sending rank rejected its own state (see the error raised there)")
    if status != OK:
        raise _Rejected(BAD_HEADER, f"preamble: expected status 0 or 1, found {status}")
    if not 0 < header_nbytes <= MAX_HEADER_BYTES:
        raise _Rejected(BAD_HEADER_SIZE, f"preamble: expected a header of 1..{MAX_HEADER_BYTES} bytes, found "
                                         f"{header_nbytes}")
    if data_nbytes < 0:
        raise _Rejected(BAD_HEADER, f"preamble: expected non-negative data_nbytes, found {data_nbytes}")
    if data_nbytes > MAX_DATA_BYTES:
        raise _Rejected(DATA_TOO_LARGE, f"preamble: expected at most {MAX_DATA_BYTES} bytes of data (MAX_DATA_BYTES), "
                                        f"found {data_nbytes}")


def data_limit(device: torch.device) -> int:
    """The most data bytes a receiver on ``device`` accepts: :data:`MAX_DATA_BYTES`, or the device's total memory
    (host memory for the CPU) when that is smaller and known."""
    total: int | None = None
    try:
        if device.type == "cuda":
            total = int(torch.cuda.get_device_properties(device).total_memory)
        elif hasattr(os, "sysconf"):
            total = int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError, RuntimeError, AssertionError):
        total = None
    return MAX_DATA_BYTES if total is None or total <= 0 else min(MAX_DATA_BYTES, total)


def _allocate_tensors(specs: Sequence[tuple[Any, torch.dtype]], device: torch.device, what: str
                      ) -> list[torch.Tensor]:
    """Empty tensors of the given shapes and dtypes, bounded and checked as :func:`_allocate`."""
    total = sum(torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size() for shape, dtype in specs)
    limit = data_limit(device)
    if total > limit:
        raise _Rejected(DATA_TOO_LARGE, f"{what}: expected at most {limit} bytes of data on {device}, found "
                                        f"{total} announced")
    try:
        return [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs]
    except (RuntimeError, MemoryError) as exc:
        raise _Rejected(DATA_TOO_LARGE, f"{what}: expected to allocate {total} bytes on {device}, found "
                                        f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _allocate(nbytes: int, device: torch.device, what: str) -> torch.Tensor:
    """A ``uint8`` buffer for received data; :class:`_Rejected` (acknowledged to the sender) when it is beyond
    :func:`data_limit` or the allocation fails."""
    limit = data_limit(device)
    if nbytes > limit:
        raise _Rejected(DATA_TOO_LARGE, f"{what}: expected at most {limit} bytes of data on {device}, found "
                                        f"{nbytes} announced")
    try:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        raise _Rejected(DATA_TOO_LARGE, f"{what}: expected to allocate {nbytes} bytes on {device}, found "
                                        f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _check_header_bytes(words: Sequence[int], header: bytes) -> tuple[StateSpec, dict[str, Any]]:
    if zlib.crc32(header) != words[5]:
        raise _Rejected(BAD_HEADER_CHECKSUM, f"header: expected checksum {words[5]:#x} (from the preamble), found "
                                             f"{zlib.crc32(header):#x}")
    try:
        spec, doc = _decode_header(header)
    except _Rejected:
        raise
    except Exception as exc:  # whatever else a header makes fail is still acknowledged as a rejection
        raise _Rejected(BAD_HEADER, f"header: expected a valid transfer header, found {type(exc).__name__}: "
                                    f"{str(exc)[:200]}") from None
    if doc["data_nbytes"] != words[6]:
        raise _Rejected(BAD_HEADER, f"header: data_nbytes {doc['data_nbytes']} disagrees with the preamble's "
                                    f"{words[6]}")
    return spec, doc


def _raise(rej: _Rejected, where: str) -> NoReturn:
    cls = StateError if rej.code == SENDER_ABORT else (StateCompatibilityError if rej.code == INCOMPATIBLE
                                                       else StateFormatError)
    raise cls(f"{where}: {rej.message}") from None


def _peer_rejected(code: int, who: str, where: str) -> NoReturn:
    cls = StateCompatibilityError if code == INCOMPATIBLE else StateFormatError
    raise cls(f"{where}: expected {who} to accept the transfer, found it rejected it: "
              f"{_REASONS.get(code, f'code {code}')} (error raised there too)")


# ---------------------------------------------------------------------------------------------- tensor helpers
def _int_tensor(words: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(words), dtype=torch.int64, device=device)


def _bytes_tensor(data: bytes, device: torch.device) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device) if data else \
        torch.empty(0, dtype=torch.uint8, device=device)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _wire_view(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as a flat ``uint8`` tensor on ``device`` (no copy when it already is contiguous there): bytes
    travel, whatever the dtype, and a received tensor is written through this view."""
    t = t.detach()
    if t.device != device or not t.is_contiguous():
        t = t.to(device=device, memory_format=torch.contiguous_format)
    return t.reshape(-1).view(torch.uint8)


def _exchange(ops: list) -> None:
    """Run point-to-point ops together (NCCL: one grouped call; Gloo: all posted, then waited for)."""
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()


def _result(spec: StateSpec, buf: torch.Tensor, device: torch.device | None
            ) -> MambaInferenceState | MambaModelState:
    state = build_state(spec, unpack(buf, spec.tensor_specs()))
    return state if device is None or torch.device(device) == buf.device else state.to(device)


def _resolve_device(device: Any, where: str) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StateError(f"{where}: expected a torch device for device=, found {device!r} ({exc})") from None


def _local_spec(state: Any, where: str) -> StateSpec:
    spec = state_spec(state, where)
    if isinstance(state, MambaModelState):
        state.device  # noqa: B018  raises StateError when layers sit on different devices
    return spec


# ---------------------------------------------------------------------------------------------- point to point
def send_state(state: MambaInferenceState | MambaModelState, dst: int, group: Any = None) -> None:
    """Send ``state`` to rank ``dst``, which must call :func:`recv_state` with ``src`` = this rank.

    Blocks until ``dst`` has accepted the header (one small acknowledgement) and the data send has been issued
    (with NCCL, enqueued on the current CUDA stream, as ``torch.distributed.send`` does). The state is not
    modified. Raises ``StateError`` for bad arguments (before anything is sent; a bad state is announced to the
    receiver with a one-word abort notice so that it raises too) and ``StateFormatError`` when the receiver
    rejects the header.
    """
    where = "send_state"
    comm = _comm(group, where)
    _check_peer(comm, dst, "dst", where, allow_self=False)
    try:
        spec = _local_spec(state, where)
        header = _encode_header(spec)
    except StateError:
        dist.send(_int_tensor(_preamble_words(OP_P2P, SENDER_ABORT, b"", 0), comm.device), dst, group=comm.group)
        raise
    dist.send(_int_tensor(_preamble_words(OP_P2P, OK, header, spec.nbytes()), comm.device), dst, group=comm.group)
    ack = torch.empty(2, dtype=torch.int64, device=comm.device)
    dist.recv(ack, dst, group=comm.group)
    if int(ack[0]) != OK:
        _peer_rejected(int(ack[0]), f"rank {dst}", where)
    dist.send(_bytes_tensor(header, comm.device), dst, group=comm.group)
    dist.recv(ack, dst, group=comm.group)
    if int(ack[0]) != OK:
        _peer_rejected(int(ack[0]), f"rank {dst}", where)
    _exchange([dist.P2POp(dist.isend, _wire_view(t, comm.device), dst, group=comm.group)
               for t in state_tensors(state) if t.numel()])


def _check_out(out_spec: StateSpec, spec: StateSpec) -> None:
    if out_spec.layout_key() != spec.layout_key():
        raise _Rejected(INCOMPATIBLE, f"out: expected a state of the incoming layout, found "
                                      f"{_layout_difference(spec, out_spec)} (the incoming one)")
    if out_spec.batch_size != spec.batch_size:
        raise _Rejected(INCOMPATIBLE, f"out: expected batch size {spec.batch_size} (incoming), found "
                                      f"{out_spec.batch_size}")


def recv_state(src: int, device: torch.device | str | None = None, group: Any = None,
               out: MambaInferenceState | MambaModelState | None = None) -> MambaInferenceState | MambaModelState:
    """Receive a state sent by rank ``src`` with :func:`send_state`; no prior knowledge of it is needed.

    ``device``: where the result lands (default: the communication device: the current CUDA device under NCCL,
    the CPU under Gloo). Dtypes, shapes, layer indices, ``seqlen_offset`` and metadata are the sender's, bit for
    bit; every tensor is a fresh contiguous allocation.

    ``out``: an existing state to receive into instead (``device`` is then ignored). The incoming layout must
    match it exactly (container, layer indices, shapes with the batch, dtypes), else both ranks raise
    ``StateCompatibilityError`` before any data moves. Tensors of ``out`` that are contiguous on the
    communication device are written directly (no allocation: the cheapest way to receive states of one shape
    again and again); others through a temporary. ``out``'s ``seqlen_offset`` and metadata are replaced by the
    sender's. Returns ``out``.

    Raises ``StateFormatError`` for a bad preamble or header (the sender is told and raises too) and
    ``StateError`` when the sender rejected its own state. Waits up to the process group's timeout for the sender.
    """
    where = "recv_state"
    comm = _comm(group, where)
    _check_peer(comm, src, "src", where, allow_self=False)
    device = _resolve_device(device, where)
    out_error: StateError | None = None
    out_spec = None
    if out is not None:
        try:
            out_spec = _local_spec(out, f"{where}: out")
        except StateError as exc:  # reported after the preamble, so that the sender hears of it too
            out_error = exc
    pre = torch.empty(8, dtype=torch.int64, device=comm.device)
    dist.recv(pre, src, group=comm.group)
    words = pre.tolist()
    ack = torch.zeros(2, dtype=torch.int64, device=comm.device)
    try:
        _check_preamble(words, OP_P2P)
    except _Rejected as rej:
        if rej.code != SENDER_ABORT:  # an aborting sender waits for nothing
            ack[0] = rej.code
            dist.send(ack, src, group=comm.group)
        _raise(rej, where)
    if out_error is not None:
        ack[0] = INCOMPATIBLE
        dist.send(ack, src, group=comm.group)
        raise out_error
    dist.send(ack, src, group=comm.group)
    header = torch.empty(words[4], dtype=torch.uint8, device=comm.device)
    dist.recv(header, src, group=comm.group)
    try:
        spec, _ = _check_header_bytes(words, _to_bytes(header))
        if out_spec is not None:
            _check_out(out_spec, spec)
        # allocated before the acknowledgement: a size this rank cannot hold is refused while the sender listens
        if out is None:
            tensors = _allocate_tensors([(t.shape, t.dtype) for t in spec.tensor_specs()], comm.device, "recv")
        else:
            tensors = [t if t.device == comm.device and t.is_contiguous() else _allocate_tensors(
                [(t.shape, t.dtype)], comm.device, "recv")[0] for t in state_tensors(out)]
    except _Rejected as rej:
        ack[0] = rej.code
        dist.send(ack, src, group=comm.group)
        _raise(rej, where)
    dist.send(ack, src, group=comm.group)
    _exchange([dist.P2POp(dist.irecv, _wire_view(t, comm.device), src, group=comm.group) for t in tensors if t.numel()])
    if out is not None:
        for dst, got in zip(state_tensors(out), tensors):
            if dst is not got:
                dst.copy_(got)
        if isinstance(out, MambaModelState):
            out.seqlen_offset, out.metadata = spec.seqlen_offset, dict(spec.metadata)
        return out
    state = build_state(spec, tensors)
    return state if device is None or device == comm.device else state.to(device)


# ---------------------------------------------------------------------------------------------- collectives
def _agree(comm: _Comm, code: int) -> int:
    """The largest status code over the group (every rank learns whether any rank rejected)."""
    t = _int_tensor([code], comm.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.group)
    return int(t[0])


def _broadcast_header(comm: _Comm, src: int, op: int, where: str, preamble: list[int] | None,
                      header: bytes | None, allocate: Callable[[StateSpec | None, dict[str, Any] | None],
                                                               list[torch.Tensor]] | None = None,
                      buffers: list[torch.Tensor] | None = None
                      ) -> tuple[list[int], StateSpec, dict[str, Any]] | None:
    """Broadcast preamble and header from ``src``; every rank checks, then all agree. Returns the parsed header
    on receiving ranks (``None`` on ``src``); raises on every rank when any rank rejected.

    ``allocate(spec, doc)`` (``None, None`` on ``src``) makes each rank's buffers for the data, appended to
    ``buffers``, before the ranks agree: a rank that cannot hold the data rejects, and every rank raises, instead
    of the others waiting in the data collective."""
    is_src = comm.rank == src
    pre = (_int_tensor(cast(list[int], preamble), comm.device) if is_src  # src always passes its preamble
           else torch.empty(8, dtype=torch.int64, device=comm.device))
    dist.broadcast(pre, src, group=comm.group)
    words = pre.tolist()
    local: _Rejected | None = None
    if not is_src:
        try:
            _check_preamble(words, op)
        except _Rejected as rej:
            local = rej
    code = _agree(comm, local.code if local else (words[3] if is_src else OK))
    if code != OK:
        if local is not None:
            _raise(local, where)
        if code == SENDER_ABORT:
            if is_src:
                return None  # the caller re-raises its own error
            raise StateError(f"{where}: {_REASONS[SENDER_ABORT]} (rank {src})")
        _peer_rejected(code, "every rank", where)
    hdr = (_bytes_tensor(cast(bytes, header), comm.device) if is_src  # and its header
           else torch.empty(words[4], dtype=torch.uint8, device=comm.device))
    dist.broadcast(hdr, src, group=comm.group)
    parsed: tuple[StateSpec, dict[str, Any]] | None = None
    if not is_src:
        try:
            parsed = _check_header_bytes(words, _to_bytes(hdr))
            if op == OP_SCATTER:
                _check_sizes_field(parsed[1], parsed[0], comm.size)
        except _Rejected as rej:
            local = rej
    if allocate is not None and buffers is not None and local is None:
        try:
            buffers.extend(allocate(*(parsed if parsed is not None else (None, None))))
        except _Rejected as rej:
            local = rej
    code = _agree(comm, local.code if local else OK)
    if code != OK:
        if local is not None:
            _raise(local, where)
        _peer_rejected(code, "every rank", where)
    if is_src:
        return None
    parsed = cast("tuple[StateSpec, dict[str, Any]]", parsed)  # set: a rejection raised above
    return words, parsed[0], parsed[1]


def broadcast_state(state_or_none: MambaInferenceState | MambaModelState | None, src: int, group: Any = None,
                    device: torch.device | str | None = None) -> MambaInferenceState | MambaModelState:
    """Every rank of the group gets rank ``src``'s state.

    On ``src`` pass the state (it is returned as is, not copied); elsewhere pass ``None`` (anything passed is
    ignored). ``device``: where the result lands on the receiving ranks (default: the communication device).
    Raises on every rank, together, when ``src``'s state is invalid (``StateError``) or a header is rejected
    (``StateFormatError``).
    """
    where = "broadcast_state"
    comm = _comm(group, where)
    _check_peer(comm, src, "src", where, allow_self=True)
    device = _resolve_device(device, where)
    error: StateError | None = None
    preamble = header = spec = None
    if comm.rank == src:
        try:
            spec = _local_spec(state_or_none, where)
            header = _encode_header(spec)
            preamble = _preamble_words(OP_BROADCAST, OK, header, spec.nbytes())
        except StateError as exc:
            error, header = exc, b""
            preamble = _preamble_words(OP_BROADCAST, SENDER_ABORT, b"", 0)
    def allocate(got: StateSpec | None, _doc: Any) -> list[torch.Tensor]:  # got: None on src, which knows spec
        return [_allocate(cast(StateSpec, got if got is not None else spec).nbytes(), comm.device, where)]

    buffers: list[torch.Tensor] = []
    parsed = _broadcast_header(comm, src, OP_BROADCAST, where, preamble, header, allocate, buffers)
    if error is not None:
        raise error
    buf = buffers[0]
    if comm.rank == src:  # no error: _local_spec accepted the state, so it and spec are set
        src_state = cast("MambaInferenceState | MambaModelState", state_or_none)
        pack_into(buf, state_tensors(src_state))
        dist.broadcast(buf, src, group=comm.group)
        return src_state
    _, spec, _ = cast("tuple[list[int], StateSpec, dict[str, Any]]", parsed)  # a receiving rank's parsed header
    dist.broadcast(buf, src, group=comm.group)
    return _result(spec, buf, device)


def even_sizes(batch_size: int, parts: int) -> list[int]:
    """Split ``batch_size`` rows into ``parts`` sizes as even as possible, the larger ones first
    (``even_sizes(10, 4) == [3, 3, 2, 2]``; ranks get 0 rows when ``batch_size < parts``)."""
    base, extra = divmod(batch_size, parts)
    return [base + 1 if r < extra else base for r in range(parts)]


def _check_sizes_field(doc: dict[str, Any], spec: StateSpec, world: int) -> list[int]:
    sizes = doc.get("sizes")
    if (not isinstance(sizes, list) or len(sizes) != world or not all(_is_count(s) for s in sizes)
            or sum(sizes) != spec.batch_size):
        raise _Rejected(INCOMPATIBLE, f"header: expected {world} non-negative batch sizes summing to "
                                      f"{spec.batch_size}, found {sizes!r:.80}")
    return sizes


def scatter_state(state_or_none: MambaInferenceState | MambaModelState | None, src: int, group: Any = None,
                  sizes: Sequence[int] | None = None, device: torch.device | str | None = None
                  ) -> MambaInferenceState | MambaModelState:
    """Split rank ``src``'s state along the batch; group rank ``r`` gets rows ``sum(sizes[:r]) ..``.

    On ``src`` pass the state and optionally ``sizes`` (one non-negative int per rank of the group, in rank
    order, summing to the batch size); without ``sizes`` the split is :func:`even_sizes` (as even as possible,
    the first ``B % world`` ranks get one row more). Other ranks pass ``None``; their ``sizes`` is ignored (the
    source's travels in the header). Every part keeps the layer indices, ``seqlen_offset`` and metadata.
    ``device``: where the part lands (default: the source state's device on ``src``, the communication device
    elsewhere). Parts travel padded to the largest part (one ``torch.distributed.scatter``).
    """
    where = "scatter_state"
    comm = _comm(group, where)
    _check_peer(comm, src, "src", where, allow_self=True)
    device = _resolve_device(device, where)
    error: StateError | None = None
    preamble = header = spec = None
    if comm.rank == src:
        try:
            spec = _local_spec(state_or_none, where)
            if sizes is None:
                sizes = even_sizes(spec.batch_size, comm.size)
            sizes = list(sizes)
            if (len(sizes) != comm.size or not all(_is_count(s) for s in sizes)
                    or sum(sizes) != spec.batch_size):
                raise StateError(f"{where}: sizes: expected {comm.size} non-negative ints (one per rank) summing "
                                 f"to the batch size {spec.batch_size}, found {sizes}")
            header = _encode_header(spec, {"sizes": sizes})
            preamble = _preamble_words(OP_SCATTER, OK, header, spec.nbytes())
        except StateError as exc:
            error, header = exc, b""
            preamble = _preamble_words(OP_SCATTER, SENDER_ABORT, b"", 0)
    def allocate(got: StateSpec | None, doc: dict[str, Any] | None) -> list[torch.Tensor]:
        # each rank's part, and on src the padded parts of every rank, before the ranks agree
        full_spec, part_sizes = (got, doc["sizes"]) if got is not None and doc is not None else (spec, sizes)
        chunk = max(cast(StateSpec, full_spec).with_batch(n).nbytes() for n in cast("list[int]", part_sizes))
        bufs = [_allocate(chunk, comm.device, where)]
        if got is None:
            bufs.append(_allocate(comm.size * chunk, comm.device, where).view(comm.size, chunk))
        return bufs

    buffers: list[torch.Tensor] = []
    parsed = _broadcast_header(comm, src, OP_SCATTER, where, preamble, header, allocate, buffers)
    if error is not None:
        raise error
    if parsed is not None:
        _, spec, doc = parsed
        sizes = doc["sizes"]
    spec, sizes = cast(StateSpec, spec), cast("list[int]", sizes)  # set on every rank by now (src: checked above)
    parts = [spec.with_batch(n) for n in sizes]
    out = buffers[0]
    scatter_list = None
    if comm.rank == src:
        full = buffers[1]
        src_state = cast("MambaInferenceState | MambaModelState", state_or_none)  # accepted by _local_spec
        tensors, start = state_tensors(src_state), 0
        for r, n in enumerate(sizes):
            pack_into(full[r], [t[start:start + n] for t in tensors])
            start += n
        scatter_list = list(full.unbind(0))
        if device is None:
            device = src_state.device
    dist.scatter(out, scatter_list, src=src, group=comm.group)
    return _result(parts[comm.group_rank], out, device)


def _layout_difference(a: StateSpec, b: StateSpec) -> str:
    if a.container != b.container:
        return f"a {b.container} state, expected a {a.container} state"
    ia, ib = [l.idx for l in a.layers], [l.idx for l in b.layers]
    if ia != ib:
        return f"layers {ib}, expected {ia}"
    for la, lb in zip(a.layers, b.layers):
        if la.names != lb.names:
            return f"layer {la.idx} with tensors {list(lb.names)}, expected {list(la.names)}"
        for name, ta in la.tensors:
            tb = lb.get(name)
            if ta.shape[1:] != tb.shape[1:] or ta.dtype != tb.dtype:
                return (f"layer {la.idx} {name} of [B, {', '.join(map(str, tb.shape[1:]))}] {tb.dtype}, "
                        f"expected [B, {', '.join(map(str, ta.shape[1:]))}] {ta.dtype}")
    return "a different layout"


def all_gather_states(state: MambaInferenceState | MambaModelState, group: Any = None
                      ) -> MambaInferenceState | MambaModelState:
    """Every rank gets all ranks' states concatenated along the batch in group-rank order.

    Batch sizes may differ between ranks; layouts (container, layer indices, non-batch shapes, dtypes) must
    agree, else every rank raises ``StateCompatibilityError`` naming the first rank that differs. Model states
    combine as :meth:`MambaModelState.cat` does (largest ``seqlen_offset``, metadata of group rank 0). The result
    is on this rank's state's device. A rank with an invalid state raises its ``StateError`` and the others
    raise ``StateError`` naming it.
    """
    where = "all_gather_states"
    comm = _comm(group, where)
    error: StateError | None = None
    try:
        spec = _local_spec(state, where)
        header = _encode_header(spec)
        mine = _preamble_words(OP_ALL_GATHER, OK, header, spec.nbytes())
    except StateError as exc:
        error, spec, header = exc, None, b""
        mine = _preamble_words(OP_ALL_GATHER, SENDER_ABORT, b"", 0)

    pres = torch.empty(comm.size, 8, dtype=torch.int64, device=comm.device)
    dist.all_gather(list(pres.unbind(0)), _int_tensor(mine, comm.device), group=comm.group)
    words = pres.tolist()  # every rank sees the same words, so every rank reaches the same verdict below
    if error is not None:
        raise error
    for r, w in enumerate(words):
        try:
            _check_preamble(w, OP_ALL_GATHER)
        except _Rejected as rej:
            if rej.code == SENDER_ABORT:
                raise StateError(f"{where}: expected a valid state from every rank, found group rank {r} "
                                 f"(global rank {comm.ranks[r]}) rejected its own") from None
            _raise(_Rejected(rej.code, f"group rank {r}: {rej.message}"), where)

    hmax = max(w[4] for w in words)
    headers = torch.zeros(comm.size, hmax, dtype=torch.uint8, device=comm.device)
    padded = torch.zeros(hmax, dtype=torch.uint8, device=comm.device)
    padded[:len(header)] = _bytes_tensor(header, comm.device)
    dist.all_gather(list(headers.unbind(0)), padded, group=comm.group)
    host = headers.cpu()
    specs = []
    for r, w in enumerate(words):
        try:
            specs.append(_check_header_bytes(w, host[r, :w[4]].numpy().tobytes())[0])
        except _Rejected as rej:
            _raise(_Rejected(rej.code, f"group rank {r}: {rej.message}"), where)
    for r, s in enumerate(specs[1:], start=1):
        if s.layout_key() != specs[0].layout_key():
            raise StateCompatibilityError(f"{where}: group rank {r} (global rank {comm.ranks[r]}) has "
                                          f"{_layout_difference(specs[0], s)} (group rank 0's)")

    dmax = max(w[6] for w in words)
    local: _Rejected | None = None
    try:  # every rank allocates, then all agree: one that cannot hold the data must not leave the others waiting
        data = _allocate(comm.size * dmax, comm.device, where).view(comm.size, dmax)
        mine_buf = _allocate(dmax, comm.device, where)
    except _Rejected as rej:
        local = rej
    code = _agree(comm, local.code if local else OK)
    if code != OK:
        if local is not None:
            _raise(local, where)
        _peer_rejected(code, "every rank", where)
    pack_into(mine_buf, state_tensors(state))  # state is valid here: a rank whose own state was rejected raised
    dist.all_gather(list(data.unbind(0)), mine_buf, group=comm.group)
    parts = [build_state(s, unpack(data[r], s.tensor_specs())) for r, s in enumerate(specs)]
    # the layouts agree, so every part is of one container type
    out: MambaInferenceState | MambaModelState = (
        MambaModelState.cat(cast("list[MambaModelState]", parts)) if isinstance(parts[0], MambaModelState)
        else MambaInferenceState.cat(cast("list[MambaInferenceState]", parts)))
    return out if out.device == state.device else out.to(state.device)
