"""Asynchronous device-to-host offload of states into pinned memory, the way back, and a pool of parked states.

A server holding thousands of idle streams keeps their states on the host and brings one back when its stream
resumes. ``state.to("cpu", non_blocking=True)`` alone is not enough for that: PyTorch does copy into pinned
memory then, but on the current stream (in line with the model's own work), into one pinned block per tensor
(each rounded up to a power of two by the pinned-memory allocator), and it returns host tensors that hold
unspecified bytes until someone synchronises, with nothing that says when; nothing stops the source from being
overwritten before the copy has read it either. Here:

* :func:`offload_state` copies a CUDA state into **one pinned host buffer** (all tensors at 64-byte aligned
  offsets of a single allocation, see :mod:`mamba_state._packing`), with ``non_blocking=True`` copies on a
  **side stream** that first waits for the current stream (so the copy sees every write already enqueued
  there), records a CUDA **event** after the copies, marks the source tensors with ``record_stream`` and keeps
  references to them until the copy is known to be done. It returns an :class:`OffloadHandle`.
* :func:`restore_state` copies a host state back to a device, ``non_blocking`` on the target stream; a state
  produced by :func:`offload_state` (one pinned buffer) goes back in a single copy.
* :class:`HostStatePool` parks states by key and brings them back without blocking the host when it can.

Synchronisation rules (CUDA source):

1. **Reading the host copy**: only after ``handle.wait()`` has returned or ``handle.ready()`` has returned
   ``True``. Before that the host tensors hold unspecified bytes. (``handle.state`` is available at once so that
   it can be handed around, but must not be read early.)
2. **Writing the source in place** (e.g. the next decode step updating the same cache): only after the copy has
   read it. Either ``handle.wait()`` (blocks the host), or ``handle.wait_stream(stream)`` (no host block: work
   enqueued on ``stream`` afterwards runs after the copy). Work already enqueued on *other* streams that writes
   the source is not ordered with the copy: make the current stream wait for it before calling
   :func:`offload_state`.
3. **Freeing the source** (dropping the last reference) is safe at any time: ``record_stream`` stops the CUDA
   caching allocator from handing the memory to anyone else before the side stream's copy ends.
4. **Restoring**: the restored tensors may be used at once by work on the stream they were restored on (the
   current stream by default); another stream must first ``wait_stream`` that one. The host state must not be
   *written* until the copy has completed (synchronise that stream, or record and wait on an event); dropping
   it is safe (PyTorch's pinned-memory allocator does not reuse a block before the copies using it complete).
5. A CPU source, or a machine without CUDA: copies are plain synchronous copies into ordinary memory (pinning
   needs CUDA), the handle is ready at once and the rules above hold trivially.

Nothing here is thread-safe: use one pool per thread or a lock.
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator

import torch

from ..errors import StateError
from .containers import MambaInferenceState, MambaModelState
from .packing import build_state, byte_offsets, pack_into, state_spec, state_tensors, unpack

__all__ = ["OffloadHandle", "offload_state", "restore_state", "HostStatePool"]

_SIDE_STREAMS: dict[int, Any] = {}


def _side_stream(device: torch.device):
    """One side stream per CUDA device, created on first use (reused: creating streams is not free)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE_STREAMS:
        _SIDE_STREAMS[index] = torch.cuda.Stream(device=index)
    return _SIDE_STREAMS[index]


def _state_device(state: Any, where: str) -> torch.device:
    state_spec(state, where)  # container check
    return state.device  # raises StateError for a model state spread over several devices


def _packed_buffer(state: MambaInferenceState | MambaModelState) -> torch.Tensor | None:
    """The flat ``uint8`` buffer behind ``state`` when its tensors are exactly the packed layout of one
    allocation (as :func:`offload_state` and :func:`restore_state` produce), else ``None``."""
    tensors = state_tensors(state)
    storage = tensors[0].untyped_storage()
    offsets, total = byte_offsets(state_spec(state).tensor_specs())
    base = tensors[0].storage_offset() * tensors[0].element_size()
    if base != 0 or storage.nbytes() < total:
        return None
    for t, off in zip(tensors, offsets):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or not t.is_contiguous()
                or t.storage_offset() * t.element_size() != off):
            return None
    return torch.empty(0, dtype=torch.uint8, device=tensors[0].device).set_(storage, 0, (total,), (1,))


def _will_pin(device: torch.device, pin_memory: bool | None) -> bool:
    """Pin by default for a CUDA source; never without CUDA (page-locking goes through the CUDA driver)."""
    if pin_memory is None:
        pin_memory = device.type == "cuda"
    return bool(pin_memory) and torch.cuda.is_available()


def _host_nbytes(state: MambaInferenceState | MambaModelState, pinned: bool) -> int:
    """Host bytes an offload of ``state`` holds: one padded buffer when pinned, the tensors' bytes otherwise."""
    return state_spec(state).nbytes() if pinned else state.nbytes


class OffloadHandle:
    """An offload in flight (or finished).

    Attributes:
        state: the host copy (same container, dtypes, shapes, layer indices, ``seqlen_offset`` and metadata;
            when pinned, its tensors are views of one host buffer). Read it only once :meth:`ready` or
            :meth:`wait` says so.
        event: the CUDA event recorded after the copies (``None`` for a CPU source).
        pinned: whether the host buffer is page-locked.
        source_device: where the state came from.
        nbytes: host bytes held (pinned: the one buffer, tensor bytes plus alignment padding).
    """

    __slots__ = ("state", "event", "pinned", "source_device", "nbytes", "_sources", "_stream")

    def __init__(self, state, event, pinned: bool, source_device: torch.device, sources, stream, nbytes: int):
        self.state = state
        self.nbytes = nbytes
        self.event = event
        self.pinned = pinned
        self.source_device = source_device
        self._sources = sources  # keeps the source tensors alive until the copy is known to be done
        self._stream = stream

    def ready(self) -> bool:
        """True when the copy has completed (the host copy may be read, the source written). Never blocks."""
        if self.event is None or self.event.query():
            self._sources = None
            return True
        return False

    def wait(self) -> MambaInferenceState | MambaModelState:
        """Block the host until the copy has completed; returns :attr:`state`."""
        if self.event is not None:
            self.event.synchronize()
        self._sources = None
        return self.state

    def wait_stream(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current stream of the source device) wait for the copy, without
        blocking the host: work enqueued there afterwards (an in-place update of the source, a restore of this
        host copy) runs after the copy. A no-op for a CPU source."""
        if self.event is None:
            return
        stream = stream if stream is not None else torch.cuda.current_stream(self.source_device)
        stream.wait_event(self.event)

    def __repr__(self) -> str:
        status = "ready" if self.event is None or self.event.query() else "in flight"
        return f"OffloadHandle({status}, nbytes={self.nbytes}, pinned={self.pinned}, from={self.source_device})"


def offload_state(state: MambaInferenceState | MambaModelState, stream: Any = None,
                  pin_memory: bool | None = None) -> OffloadHandle:
    """Start copying ``state`` to host memory; returns at once with an :class:`OffloadHandle`.

    Args:
        state: a :class:`MambaInferenceState` or :class:`MambaModelState` on one device (any floating dtypes).
        stream: the CUDA stream for the copies (default: a side stream of the source device, shared by all
            offloads from that device). It is made to wait for the current stream first.
        pin_memory: page-lock the host buffer (default: yes for a CUDA source; needs CUDA, silently off
            without it). Without pinning the copies are plain synchronous ``.to("cpu")`` copies, one host tensor
            each, and the handle is ready at once.

    The host copy holds the same bytes (bit exact). See the module docstring for when it may be read and when
    the source may be written.
    """
    where = "offload_state"
    device = _state_device(state, where)
    if stream is not None and not isinstance(stream, torch.cuda.Stream):
        raise StateError(f"{where}: expected a torch.cuda.Stream for stream=, found {type(stream).__name__}")
    pin_memory = _will_pin(device, pin_memory)
    spec = state_spec(state)
    tensors = [t.detach() for t in state_tensors(state)]
    if not pin_memory:  # plain synchronous copies, one host tensor each (no large buffer to fault in)
        host_state = build_state(spec, [t.to("cpu", copy=True) for t in tensors])
        return OffloadHandle(host_state, None, False, device, None, None, _host_nbytes(host_state, False))
    total = spec.nbytes()
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    host_state = build_state(spec, unpack(host, spec.tensor_specs()))
    if device.type != "cuda":
        pack_into(host, tensors)
        return OffloadHandle(host_state, None, True, device, None, None, total)

    side = stream if stream is not None else _side_stream(device)
    side.wait_stream(torch.cuda.current_stream(device))  # the copy must see writes already enqueued there
    flat = _packed_buffer(state)
    with torch.cuda.stream(side):
        if flat is not None:  # one copy for a state that already is one packed allocation
            host.copy_(flat, non_blocking=True)
        else:
            pack_into(host, tensors, non_blocking=True)
        event = torch.cuda.Event()
        event.record(side)
    for t in tensors:  # the caching allocator must not recycle the source before the side stream read it
        t.record_stream(side)
    return OffloadHandle(host_state, event, pin_memory, device, tensors, side, total)


def restore_state(host_state: MambaInferenceState | MambaModelState, device: torch.device | str,
                  non_blocking: bool = True, stream: Any = None) -> MambaInferenceState | MambaModelState:
    """Copy a (host) state to ``device``; returns a new state (bit exact, same container and metadata).

    On CUDA the copies are enqueued on ``stream`` (default: the current stream of ``device``) with
    ``non_blocking``; work on that stream may use the result at once. A state whose tensors are one packed
    pinned buffer (what :func:`offload_state` returns) moves in a single copy and comes back as views of one
    device allocation. On the CPU the result is a copy. See the module docstring for when the host state may
    be written again.
    """
    where = "restore_state"
    src_device = _state_device(host_state, where)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise StateError(f"{where}: expected a torch device, found {device!r} ({exc})") from None
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    spec = state_spec(host_state)
    if device.type != "cuda":
        return host_state.to(device).clone() if src_device == device else host_state.to(device)
    if stream is not None and not isinstance(stream, torch.cuda.Stream):
        raise StateError(f"{where}: expected a torch.cuda.Stream for stream=, found {type(stream).__name__}")
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    flat = _packed_buffer(host_state) if src_device.type == "cpu" else None
    with torch.cuda.device(device), torch.cuda.stream(stream):
        if flat is not None:
            buf = torch.empty(flat.numel(), dtype=torch.uint8, device=device)
            buf.copy_(flat, non_blocking=non_blocking)
            return build_state(spec, unpack(buf, spec.tensor_specs()))
        out = [torch.empty(t.shape, dtype=t.dtype, device=device) for t in state_tensors(host_state)]
        for dst, src in zip(out, state_tensors(host_state)):
            dst.copy_(src.detach(), non_blocking=non_blocking)
        return build_state(spec, out)


class HostStatePool:
    """States parked in host memory by key, e.g. one per idle stream of a server.

    ``park(key, state)`` starts an asynchronous offload and returns at once; the caller may drop or reuse the
    device state under the rules of :func:`offload_state` (in short: free it at once; write it in place only
    after ``handle.wait_stream()`` or ``handle.wait()``). ``fetch(key)`` brings it back to its original device
    (or ``device=``) and removes it from the pool; on CUDA the restore waits for the offload on the GPU, not on
    the host. ``max_bytes`` bounds the host memory the pool may hold (``StateError`` when a park would exceed
    it: the caller chooses what to evict).
    """

    def __init__(self, max_bytes: int | None = None, stream: Any = None, pin_memory: bool | None = None):
        if max_bytes is not None and (not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0):
            raise StateError(f"max_bytes: expected a non-negative int or None, found {max_bytes!r}")
        self.max_bytes = max_bytes
        self._stream = stream
        self._pin = pin_memory
        self._parked: dict[Hashable, OffloadHandle] = {}

    # ------------------------------------------------------------------ mapping-like view
    def __contains__(self, key: Hashable) -> bool:
        return key in self._parked

    def __len__(self) -> int:
        return len(self._parked)

    def __iter__(self) -> Iterator[Hashable]:
        return iter(list(self._parked))

    def keys(self) -> list[Hashable]:
        return list(self._parked)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the parked states (tensor bytes plus alignment padding; PyTorch's pinned-memory
        allocator may round each buffer up further)."""
        return sum(h.nbytes for h in self._parked.values())

    def handle(self, key: Hashable) -> OffloadHandle:
        return self._get(key, "handle")

    def _get(self, key: Hashable, where: str) -> OffloadHandle:
        try:
            return self._parked[key]
        except KeyError:
            raise StateError(f"HostStatePool.{where}: expected a parked key, found {key!r} "
                             f"({len(self._parked)} parked)") from None
        except TypeError:
            raise StateError(f"HostStatePool.{where}: expected a hashable key, found {type(key).__name__}") from None

    # ------------------------------------------------------------------ park / fetch
    def park(self, key: Hashable, state: MambaInferenceState | MambaModelState, replace: bool = False
             ) -> OffloadHandle:
        """Start offloading ``state`` under ``key``; returns its :class:`OffloadHandle`.

        Raises ``StateError`` (parking nothing) for a key already parked (unless ``replace``), an invalid state
        or a park that would exceed ``max_bytes``."""
        try:
            hash(key)
        except TypeError:
            raise StateError(f"HostStatePool.park: expected a hashable key, found {type(key).__name__}") from None
        if key in self._parked and not replace:
            raise StateError(f"HostStatePool.park: expected a new key, found {key!r} already parked "
                             "(pass replace=True to overwrite)")
        device = _state_device(state, "HostStatePool.park")
        if self.max_bytes is not None:
            held = self.nbytes - (self._parked[key].nbytes if key in self._parked else 0)
            need = _host_nbytes(state, _will_pin(device, self._pin))
            if held + need > self.max_bytes:
                raise StateError(f"HostStatePool.park: expected at most max_bytes={self.max_bytes} parked, found "
                                 f"{held} held + {need} for {key!r}")
        handle = offload_state(state, stream=self._stream, pin_memory=self._pin)
        self._parked[key] = handle
        return handle

    def get(self, key: Hashable) -> MambaInferenceState | MambaModelState:
        """The parked host state (waits for its offload to finish; stays parked). Do not write it."""
        return self._get(key, "get").wait()

    def fetch(self, key: Hashable, device: torch.device | str | None = None, non_blocking: bool = True,
              stream: Any = None) -> MambaInferenceState | MambaModelState:
        """Bring ``key``'s state back to ``device`` (default: where it was parked from) and unpark it.

        On CUDA the restore is enqueued on ``stream`` (default: the device's current stream) after a GPU-side
        wait for the offload; the host is not blocked, and the result may be used on that stream at once."""
        handle = self._get(key, "fetch")
        target = torch.device(device) if device is not None else handle.source_device
        if target.type == "cuda":
            if stream is None:
                stream = torch.cuda.current_stream(target)
            handle.wait_stream(stream)  # GPU-side order: offload copy, then restore copy
            out = restore_state(handle.state, target, non_blocking=non_blocking, stream=stream)
        else:
            out = restore_state(handle.wait(), target)
        del self._parked[key]
        return out

    def discard(self, key: Hashable) -> None:
        """Drop ``key``'s parked state (safe even while its offload is in flight)."""
        self._get(key, "discard")
        del self._parked[key]

    def wait_all(self) -> None:
        """Block until every offload in flight has completed."""
        for h in self._parked.values():
            h.wait()

    def clear(self) -> None:
        self._parked.clear()

    def __repr__(self) -> str:
        return f"HostStatePool({len(self)} parked, nbytes={self.nbytes}, max_bytes={self.max_bytes})"
