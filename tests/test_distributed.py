"""Two-process Gloo tests of mamba_state.distributed.

One group of two processes (spawned once per module) runs every transfer check in a fixed order and records
each check's outcome per rank; the test functions below then assert on those outcomes. Each check compares the
received state bit for bit with one the receiving rank rebuilds from the same seed (NaN, -0.0 and inf included,
compared as integer bit patterns).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import traceback
import zlib
from datetime import timedelta

import pytest
import torch
from hypothesis import given, settings
from _spawn import describe_failure, free_ports, read_rank_results, spawn_ranks
from hypothesis import strategies as st

from mamba_state import MambaInferenceState, MambaModelState, StateCompatibilityError, StateError, StateFormatError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
WORLD = 2


# ---------------------------------------------------------------------------------------------- state factories
def _fill(shape, dtype, gen):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    flat = t.view(-1)
    if flat.numel() >= 3:  # values whose bits a lossy path would change
        flat[0], flat[1], flat[2] = float("nan"), -0.0, float("inf")
    return t


def make_layer(kind: str, batch: int, dtype: torch.dtype, seed: int, conv_dtype=None) -> MambaInferenceState:
    gen = torch.Generator().manual_seed(seed)
    conv_dtype = conv_dtype or dtype
    if kind == "mamba1":  # d_inner 6, d_conv 4, d_state 3
        return MambaInferenceState(_fill((batch, 6, 4), conv_dtype, gen), _fill((batch, 6, 3), dtype, gen))
    if kind == "mamba3":  # nheads 2, headdim 3, d_state 4, 2 rotary angles; angle and ssm float32 as upstream
        return MambaInferenceState(ssm_state=_fill((batch, 2, 3, 4), torch.float32, gen),
                                   angle_dt_state=_fill((batch, 2, 2), torch.float32, gen),
                                   k_state=_fill((batch, 1, 2, 4), dtype, gen), v_state=_fill((batch, 2, 3), dtype, gen))
    # Mamba-2: nheads 2, headdim 3, d_state 2, ngroups 1 -> conv channels 6 + 2*1*2
    return MambaInferenceState(_fill((batch, 10, 4), conv_dtype, gen), _fill((batch, 2, 3, 2), dtype, gen))


def make_model(batch: int, dtype: torch.dtype, seed: int) -> MambaModelState:
    layers = {0: make_layer("mamba1", batch, dtype, seed),
              3: make_layer("mamba2", batch, dtype, seed + 1),
              7: make_layer("mamba1", batch, dtype, seed + 2, conv_dtype=torch.float32),
              9: make_layer("mamba3", batch, dtype, seed + 3)}
    return MambaModelState(layers, seqlen_offset=17 + seed % 5, metadata={"seed": seed, "note": "übertragen"})


def make(container: str, batch: int, dtype: torch.dtype, seed: int):
    if container == "model":
        return make_model(batch, dtype, seed)
    return make_layer(container, batch, dtype, seed)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = _INT_VIEW[a.element_size()]
    return torch.equal(a.cpu().contiguous().view(view), b.cpu().contiguous().view(view))


def assert_same_state(got, want) -> None:
    assert type(got) is type(want), (type(got), type(want))
    if isinstance(want, MambaModelState):
        assert got.layer_indices == want.layer_indices
        assert got.seqlen_offset == want.seqlen_offset and got.metadata == want.metadata
        pairs = [(got[i], want[i]) for i in want.layer_indices]
    else:
        pairs = [(got, want)]
    for g, w in pairs:
        assert g.tensor_names == w.tensor_names, (g.tensor_names, w.tensor_names)
        for name in w.tensor_names:
            assert same_bits(g.tensors[name], w.tensors[name]), f"{name} differs"


def expect_raise(cls, fn, match: str | None = None):
    try:
        fn()
    except cls as exc:
        if match is not None:
            assert match in str(exc), f"{match!r} not in {str(exc)!r}"
        return exc
    raise AssertionError(f"expected {cls.__name__}")


# ---------------------------------------------------------------------------------------------- the checks
# Every check runs on both ranks, in this order; each returns normally or raises AssertionError.
def check_p2p_round_trips(rank):
    import mamba_state.distributed as msd

    for k, dtype in enumerate(DTYPES):
        for j, container in enumerate(("mamba1", "mamba2", "mamba3", "model")):
            seed = 100 * k + 10 * j
            for sender in (0, 1):
                state = make(container, 2 + sender, dtype, seed + sender)
                if rank == sender:
                    msd.send_state(state, 1 - sender)
                else:
                    assert_same_state(msd.recv_state(sender), state)


def check_p2p_noncontiguous_and_empty_metadata(rank):
    import mamba_state.distributed as msd

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4, 3, 8, generator=gen)
    state = MambaInferenceState(base[:, :, :4], base[:, :, 4:7])  # views with strides of the base
    assert not state.ssm_state.is_contiguous()
    model = MambaModelState({2: state}, seqlen_offset=0, metadata={})
    if rank == 0:
        msd.send_state(state, 1)
        msd.send_state(model, 1)
    else:
        assert_same_state(msd.recv_state(0), state)
        got = msd.recv_state(0, device="cpu")
        assert_same_state(got, model)
        assert got.device == torch.device("cpu")


def check_recv_into_out(rank):
    import mamba_state.distributed as msd

    want = make_model(3, torch.bfloat16, 31)
    if rank == 0:
        msd.send_state(want, 1)
        msd.send_state(want, 1)
        expect_raise(StateCompatibilityError, lambda: msd.send_state(want, 1), "incompatible")
        expect_raise(StateCompatibilityError, lambda: msd.send_state(want, 1), "incompatible")
        msd.send_state(want.select(0), 1)
        return
    out = make_model(3, torch.bfloat16, 99)
    out.seqlen_offset, out.metadata = 0, {"old": True}
    ptrs = [t.data_ptr() for t in (out[0].conv_state, out[7].ssm_state)]
    got = msd.recv_state(0, out=out)
    assert got is out and [t.data_ptr() for t in (out[0].conv_state, out[7].ssm_state)] == ptrs  # written in place
    assert_same_state(out, want)
    # a non-contiguous destination is filled through a temporary
    strided = make_model(3, torch.bfloat16, 98)
    strided[0].ssm_state = strided[0].ssm_state.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided[0].ssm_state.is_contiguous()
    assert_same_state(msd.recv_state(0, out=strided), want)
    expect_raise(StateCompatibilityError, lambda: msd.recv_state(0, out=make_model(2, torch.bfloat16, 1)),
                 "expected batch size 3")
    expect_raise(StateError, lambda: msd.recv_state(0, out="nope"), "found str")
    single = make_model(1, torch.bfloat16, 5)
    assert_same_state(msd.recv_state(0, out=single), want.select(0))


def check_broadcast(rank):
    import mamba_state.distributed as msd

    for src, container, dtype in ((0, "model", torch.bfloat16), (1, "mamba2", torch.float16),
                                  (0, "mamba1", torch.float64), (1, "mamba3", torch.bfloat16)):
        want = make(container, 3, dtype, 7 + src)
        got = msd.broadcast_state(want if rank == src else None, src)
        if rank == src:
            assert got is want
        assert_same_state(got, want)


def check_all_gather_uneven(rank):
    import mamba_state.distributed as msd

    for container, dtype in (("model", torch.float32), ("mamba2", torch.bfloat16), ("mamba1", torch.float16),
                             ("mamba3", torch.bfloat16)):
        sizes = [3, 1]
        parts = [make(container, sizes[r], dtype, 40 + r) for r in range(WORLD)]
        got = msd.all_gather_states(parts[rank])
        assert_same_state(got, type(parts[0]).cat(parts))
        if container == "model":
            assert got.seqlen_offset == max(p.seqlen_offset for p in parts)
            assert got.metadata == parts[0].metadata


def check_all_gather_incompatible(rank):
    import mamba_state.distributed as msd

    mine = make_layer("mamba1", 2, torch.float32 if rank == 0 else torch.float16, 3)
    exc = expect_raise(StateCompatibilityError, lambda: msd.all_gather_states(mine), "group rank 1")
    assert "float16" in str(exc) and "float32" in str(exc)
    mine = make_model(1, torch.float32, 3) if rank == 0 else make_layer("mamba1", 1, torch.float32, 3)
    expect_raise(StateCompatibilityError, lambda: msd.all_gather_states(mine), "expected a model state")
    # a rank with something that is not a state: it raises its own error, the other names it
    mine = make_layer("mamba1", 1, torch.float32, 3) if rank == 0 else "not a state"
    expect_raise(StateError, lambda: msd.all_gather_states(mine), "rank 1" if rank == 0 else "found str")
    # still in step afterwards
    assert msd.all_gather_states(make_layer("mamba1", 1, torch.float32, rank)).batch_size == 2


def check_scatter(rank):
    import mamba_state.distributed as msd

    assert msd.even_sizes(5, 2) == [3, 2] and msd.even_sizes(10, 4) == [3, 3, 2, 2]
    assert msd.even_sizes(1, 3) == [1, 0, 0]
    for src, container, dtype, sizes in ((0, "model", torch.bfloat16, None), (1, "mamba1", torch.float32, [1, 4]),
                                         (0, "mamba2", torch.float64, [0, 5]), (1, "model", torch.float16, [5, 0]),
                                         (0, "mamba3", torch.float16, [2, 3])):
        full = make(container, 5, dtype, 60 + src)
        got = msd.scatter_state(full if rank == src else None, src, sizes=sizes if rank == src else [9, 9])
        parts = full.split(sizes or msd.even_sizes(5, WORLD))
        assert_same_state(got, parts[rank])


def check_scatter_bad_sizes(rank):
    import mamba_state.distributed as msd

    full = make_layer("mamba1", 4, torch.float32, 1)
    want = StateError
    match = "sizes: expected 2 non-negative ints" if rank == 0 else "sending rank rejected its own state"
    expect_raise(want, lambda: msd.scatter_state(full if rank == 0 else None, 0, sizes=[1, 2]), match)
    expect_raise(StateError, lambda: msd.broadcast_state(None, 0), "MambaInferenceState or MambaModelState"
                 if rank == 0 else "rejected its own state")
    assert_same_state(msd.scatter_state(full if rank == 0 else None, 0), full.split([2, 2])[rank])


def check_explicit_groups(rank):
    import mamba_state.distributed as msd

    both = torch.distributed.new_group([0, 1])
    only0 = torch.distributed.new_group([0])  # every rank must call new_group, members or not
    want = make_model(2, torch.float16, 77)
    if rank == 0:
        msd.send_state(want, 1, group=both)
    else:
        assert_same_state(msd.recv_state(0, group=both), want)
    parts = [make_layer("mamba2", 1 + r, torch.bfloat16, r) for r in range(WORLD)]
    assert_same_state(msd.all_gather_states(parts[rank], group=both), MambaInferenceState.cat(parts))
    if rank == 1:
        expect_raise(StateError, lambda: msd.all_gather_states(parts[rank], group=only0), "member of the group")
    else:
        assert_same_state(msd.all_gather_states(parts[0], group=only0), parts[0])  # a group of one


def check_sender_rejects_own_state(rank):
    import mamba_state.distributed as msd

    if rank == 0:
        expect_raise(StateError, lambda: msd.send_state({"not": "a state"}, 1), "found dict")
        msd.send_state(make_layer("mamba1", 1, torch.float32, 0), 1)  # the pair is still in step
    else:
        expect_raise(StateError, lambda: msd.recv_state(0), "rejected its own state")
        assert_same_state(msd.recv_state(0), make_layer("mamba1", 1, torch.float32, 0))


def _preamble(op=1, status=0, header=b"", data_nbytes=0, magic=None, version=1, check_delta=0):
    import mamba_state.distributed as msd

    words = [msd.MAGIC if magic is None else magic, version, op, status, len(header), zlib.crc32(header),
             data_nbytes]
    return torch.tensor(words + [zlib.crc32(struct.pack("<7q", *words)) + check_delta], dtype=torch.int64)


def check_bad_headers_p2p(rank):
    """Rank 0 writes the protocol by hand with one fault each time; rank 1's recv_state must refuse it."""
    import mamba_state.distributed as msd
    from mamba_state._packing import state_spec

    good = make_layer("mamba2", 2, torch.bfloat16, 9)
    header = msd._encode_header(state_spec(good))
    nbytes = state_spec(good).nbytes()
    bad_json = b'{"format": "mamba-state-transfer", "format_version": 1, "container": "mod'
    wrong_layout = header.replace(b'"conv_shape":[2,10,4]', b'"conv_shape":[2,11,4]')
    assert wrong_layout != header
    cases = [  # (preamble, header to send after an accepted preamble, expected code, expected message)
        (_preamble(header=header, data_nbytes=nbytes, magic=0x1234), None, msd.BAD_MAGIC, "magic"),
        (_preamble(header=header, data_nbytes=nbytes, check_delta=1), None, msd.BAD_PREAMBLE_CHECKSUM, "checksum"),
        (_preamble(header=header, data_nbytes=nbytes, version=2), None, msd.BAD_VERSION, "format version"),
        (_preamble(op=msd.OP_BROADCAST, header=header, data_nbytes=nbytes), None, msd.BAD_OPERATION, "broadcast"),
        (_preamble(header=b"", data_nbytes=nbytes), None, msd.BAD_HEADER_SIZE, "header of 1.."),
        (_preamble(header=header[:-1] + b" ", data_nbytes=nbytes), header, msd.BAD_HEADER_CHECKSUM,
         "header: expected checksum"),
        (_preamble(header=bad_json, data_nbytes=nbytes), bad_json, msd.BAD_HEADER, "JSON"),
        (_preamble(header=wrong_layout, data_nbytes=nbytes), wrong_layout, msd.BAD_HEADER, "invalid state"),
        (_preamble(header=header, data_nbytes=nbytes + 64), header, msd.BAD_HEADER, "disagrees with the preamble"),
    ]
    for pre, hdr, code, message in cases:
        if rank == 0:
            torch.distributed.send(pre, 1)
            ack = torch.empty(2, dtype=torch.int64)
            torch.distributed.recv(ack, 1)
            if hdr is not None:
                assert int(ack[0]) == msd.OK
                torch.distributed.send(torch.frombuffer(bytearray(hdr), dtype=torch.uint8), 1)
                torch.distributed.recv(ack, 1)
            assert int(ack[0]) == code, (int(ack[0]), code)
        else:
            expect_raise(StateFormatError, lambda: msd.recv_state(0), message)
    # the sender side: a hand-written receiver rejects the preamble, send_state must raise
    if rank == 0:
        expect_raise(StateFormatError, lambda: msd.send_state(good, 1), "header checksum mismatch")
        msd.send_state(good, 1)
    else:
        torch.distributed.recv(torch.empty(8, dtype=torch.int64), 0)
        torch.distributed.send(torch.tensor([msd.BAD_HEADER_CHECKSUM, 0]), 0)
        assert_same_state(msd.recv_state(0), good)


def check_bad_header_broadcast(rank):
    import mamba_state.distributed as msd

    if rank == 0:  # a corrupted preamble, then the agreement all-reduce by hand
        torch.distributed.broadcast(_preamble(op=msd.OP_BROADCAST, header=b"{}", magic=0x99), 0)
        status = torch.zeros(1, dtype=torch.int64)
        torch.distributed.all_reduce(status, op=torch.distributed.ReduceOp.MAX)
        assert int(status[0]) == msd.BAD_MAGIC
    else:
        expect_raise(StateFormatError, lambda: msd.broadcast_state(None, 0), "magic")
    # the real thing, a rank whose header check fails: rank 1 is told to expect another operation
    state = make_layer("mamba1", 1, torch.float32, 2)
    if rank == 0:
        expect_raise(StateFormatError, lambda: msd.broadcast_state(state, 0), "rejected it")
    else:
        expect_raise(StateFormatError, lambda: msd.scatter_state(None, 0), "expected operation scatter_state")


def _hand_send(pre, hdr):
    """Rank 0 plays a sender by hand: the preamble, then (when accepted) the header; returns the last ack code."""
    torch.distributed.send(pre, 1)
    ack = torch.empty(2, dtype=torch.int64)
    torch.distributed.recv(ack, 1)
    if int(ack[0]) == 0 and hdr is not None:
        torch.distributed.send(torch.frombuffer(bytearray(hdr), dtype=torch.uint8), 1)
        torch.distributed.recv(ack, 1)
    return int(ack[0])


def check_hostile_headers_acknowledged(rank):
    """Headers that broke the receiver before it answered (deep JSON, sizes beyond int64, an absurd announced size)
    are acknowledged as rejections: both sides raise at once instead of the sender waiting out the timeout."""
    import time

    import mamba_state.distributed as msd
    from mamba_state._packing import state_spec

    good = make_layer("mamba1", 2, torch.float32, 9)
    header = msd._encode_header(state_spec(good))
    nbytes = state_spec(good).nbytes()
    doc = json.loads(header)
    doc["metadata"] = "DEEP"
    deep = json.dumps(doc, separators=(",", ":")).replace('"DEEP"', '{"a":' + "[" * 5000 + "]" * 5000 + "}").encode()
    huge = (header.replace(b'"conv_shape":[2,6,4]', b'"conv_shape":[0,9223372036854775808,4]')
            .replace(b'"ssm_shape":[2,6,3]', b'"ssm_shape":[0,9223372036854775808,3]')
            .replace(f'"data_nbytes":{nbytes}'.encode(), b'"data_nbytes":0'))
    assert huge.count(b"9223372036854775808") == 2 and b'"data_nbytes":0' in huge
    rows = 2**50 // 168  # a self-consistent 1 PiB state (mamba1, d_inner 6, d_conv 4, d_state 3, float32)
    absurd = MambaInferenceState(torch.empty(rows, 6, 4, device="meta"), torch.empty(rows, 6, 3, device="meta"))
    spec_absurd = state_spec(absurd)
    doc = json.loads(header)
    doc["layers"][0]["conv_shape"], doc["layers"][0]["ssm_shape"] = [rows, 6, 4], [rows, 6, 3]
    doc["data_nbytes"] = spec_absurd.nbytes()
    absurd_header = json.dumps(doc, separators=(",", ":")).encode()
    cases = [(_preamble(header=deep, data_nbytes=nbytes), deep, msd.BAD_HEADER, "nesting at most"),
             (_preamble(header=huge, data_nbytes=0), huge, msd.BAD_HEADER, "invalid state"),
             (_preamble(header=absurd_header, data_nbytes=spec_absurd.nbytes()), absurd_header, msd.DATA_TOO_LARGE,
              "MAX_DATA_BYTES")]
    for pre, hdr, code, message in cases:
        if rank == 0:
            assert _hand_send(pre, hdr) == code
        else:
            t0 = time.perf_counter()
            expect_raise(StateFormatError, lambda: msd.recv_state(0), message)
            assert time.perf_counter() - t0 < 20
    # the sender refuses what receivers would: metadata nested too deep, before anything is sent
    nested: dict = {}
    for _ in range(100):
        nested = {"a": nested}
    deep_state = MambaModelState({0: make_layer("mamba1", 1, torch.float32, 0)}, metadata=nested)
    if rank == 0:
        expect_raise(StateError, lambda: msd.send_state(deep_state, 1), "nesting at most")
        msd.send_state(good, 1)
    else:
        expect_raise(StateError, lambda: msd.recv_state(0), "rejected its own state")
        assert_same_state(msd.recv_state(0), good)


def check_receiver_cannot_hold_the_data(rank):
    """A rank that cannot hold the announced data (beyond its limit, or a failed allocation) rejects before any
    data moves, and every rank raises: point to point, broadcast, scatter and all-gather, still in step after."""
    import mamba_state.distributed as msd

    state = make_model(3, torch.float32, 5)
    real_limit = msd.data_limit
    if rank == 1:
        msd.data_limit = lambda device: 64  # this rank holds 64 bytes at most
    try:
        if rank == 0:
            expect_raise(StateFormatError, lambda: msd.send_state(state, 1), "rejected it")
        else:
            expect_raise(StateFormatError, lambda: msd.recv_state(0), "at most 64 bytes")
        expect_raise(StateFormatError, lambda: msd.broadcast_state(state if rank == 0 else None, 0),
                     "rejected it" if rank == 0 else "at most 64 bytes")
        expect_raise(StateFormatError, lambda: msd.scatter_state(state if rank == 0 else None, 0),
                     "rejected it" if rank == 0 else "at most 64 bytes")
        expect_raise(StateFormatError, lambda: msd.all_gather_states(state),
                     "rejected it" if rank == 0 else "at most 64 bytes")
    finally:
        msd.data_limit = real_limit
    got = msd.broadcast_state(state if rank == 0 else None, 0)
    assert_same_state(got, state)


def check_timeout(rank):
    """A receiver whose peer never sends gives up after the group's timeout (Gloo: an exception, no hang)."""
    import time

    import mamba_state.distributed as msd

    short = torch.distributed.new_group([0, 1], timeout=timedelta(seconds=2))
    if rank == 1:
        t0 = time.perf_counter()
        expect_raise(RuntimeError, lambda: msd.recv_state(0, group=short))
        assert 1.5 < time.perf_counter() - t0 < 30


def check_argument_errors(rank):
    import mamba_state.distributed as msd

    state = make_layer("mamba1", 1, torch.float32, 0)
    expect_raise(StateError, lambda: msd.send_state(state, rank), "another rank")
    expect_raise(StateError, lambda: msd.send_state(state, 5), "among the group's ranks")
    expect_raise(StateError, lambda: msd.recv_state(True), "expected an int src")
    expect_raise(StateError, lambda: msd.broadcast_state(state, -1), "among the group's ranks")
    expect_raise(StateError, lambda: msd.recv_state(1 - rank, device="nowhere"), "device=")


CHECKS = [check_p2p_round_trips, check_p2p_noncontiguous_and_empty_metadata, check_recv_into_out, check_broadcast,
          check_all_gather_uneven, check_all_gather_incompatible, check_scatter, check_scatter_bad_sizes,
          check_explicit_groups, check_sender_rejects_own_state, check_bad_headers_p2p, check_bad_header_broadcast,
          check_hostile_headers_acknowledged, check_receiver_cannot_hold_the_data, check_timeout,
          check_argument_errors]
# the checks that use only library calls (the hand-written protocol above sends CPU tensors, which NCCL refuses)
NCCL_CHECKS = [check_p2p_round_trips, check_p2p_noncontiguous_and_empty_metadata, check_recv_into_out,
               check_broadcast, check_all_gather_uneven, check_all_gather_incompatible, check_scatter,
               check_scatter_bad_sizes, check_explicit_groups, check_sender_rejects_own_state]


def _worker(rank: int, init_method: str, out_dir: str, backend: str = "gloo") -> None:
    checks = CHECKS
    torch.set_num_threads(1)  # two ranks share the cores: oversubscribed OpenMP threads make copies crawl
    if backend == "nccl":
        torch.cuda.set_device(rank)
        checks = NCCL_CHECKS
    torch.distributed.init_process_group(backend, init_method=init_method, rank=rank, world_size=WORLD,
                                         timeout=timedelta(seconds=60))
    results = {}
    try:
        for check in checks:
            try:
                check(rank)
                results[check.__name__] = "ok"
            except Exception:  # recorded per check; the test for that check fails with this text
                results[check.__name__] = traceback.format_exc()
            torch.distributed.barrier()  # keep the ranks in step between checks
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        torch.distributed.destroy_process_group()


def _run_group(backend: str) -> dict:
    with tempfile.TemporaryDirectory() as out_dir:
        init = f"tcp://127.0.0.1:{free_ports(1)[0]}"
        hung, exitcodes = spawn_ranks(_worker, lambda r: (r, init, out_dir, backend), WORLD)
        per_rank = read_rank_results(out_dir, WORLD)
    return {"hung": hung, "exitcodes": exitcodes, "ranks": per_rank}


def _assert_outcome(outcomes: dict, check: str) -> None:
    assert not outcomes["hung"], describe_failure(outcomes["hung"], outcomes["exitcodes"], outcomes["ranks"])
    for r, res in enumerate(outcomes["ranks"]):
        assert check in res, f"rank {r} never ran {check} (exit codes {outcomes['exitcodes']})"
        assert res[check] == "ok", f"rank {r}:\n{res[check]}"


@pytest.fixture(scope="module")
def outcomes():
    return _run_group("gloo")


@pytest.fixture(scope="module")
def nccl_outcomes():
    if torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available():
        pytest.skip("needs two CUDA GPUs and NCCL")
    return _run_group("nccl")


@pytest.mark.parametrize("check", [c.__name__ for c in CHECKS])
def test_transfer(outcomes, check):
    _assert_outcome(outcomes, check)


@pytest.mark.gpu
@pytest.mark.parametrize("check", [c.__name__ for c in NCCL_CHECKS])
def test_transfer_nccl(nccl_outcomes, check):
    """The same checks over NCCL between two GPUs (states arrive on each rank's current CUDA device)."""
    _assert_outcome(nccl_outcomes, check)


# ---------------------------------------------------------------------------------------------- single process
def test_header_round_trip_and_rejections():
    """Header encoding alone (no process group): every field survives; bad fields are named."""
    import mamba_state.distributed as msd
    from mamba_state._packing import state_spec

    state = make_model(3, torch.bfloat16, 1)
    spec, doc = msd._decode_header(msd._encode_header(state_spec(state), {"sizes": [1, 2]}))
    assert spec == state_spec(state) and doc["sizes"] == [1, 2]
    with pytest.raises(msd._Rejected, match="floating torch dtype"):
        msd._decode_header(msd._encode_header(state_spec(state)).replace(b'"bfloat16"', b'"int32"', 1))
    with pytest.raises(msd._Rejected, match="idx above"):
        msd._decode_header(msd._encode_header(state_spec(state)).replace(b'"idx":3', b'"idx":0', 1))


def _empty_layer(kind, batch, cd, sd):
    if kind == "mamba3":
        return MambaInferenceState(ssm_state=torch.empty(batch, 2, 3, 4, dtype=sd),
                                   angle_dt_state=torch.empty(batch, 2, 2, dtype=sd),
                                   k_state=torch.empty(batch, 1, 2, 4, dtype=cd), v_state=torch.empty(batch, 2, 3, dtype=cd))
    return MambaInferenceState(torch.empty((batch, 6, 4) if kind == "mamba1" else (batch, 10, 4), dtype=cd),
                               torch.empty((batch, 6, 3) if kind == "mamba1" else (batch, 2, 3, 2), dtype=sd))


@given(layers=st.lists(st.tuples(st.sampled_from(["mamba1", "mamba2", "mamba3"]), st.sampled_from(DTYPES),
                                 st.sampled_from(DTYPES)), min_size=1, max_size=4),
       batch=st.integers(0, 3), container=st.sampled_from(["model", "layer"]), offset=st.integers(0, 10**6),
       note=st.text(max_size=20), data=st.data())
def test_header_properties(layers, batch, container, offset, note, data):
    """Any layout round-trips through the header; any single corrupted byte of the preamble or the header is
    refused (CRC-32 catches every single-byte error)."""
    import mamba_state.distributed as msd
    from mamba_state._packing import state_spec

    built = {3 * k: _empty_layer(kind, batch, cd, sd) for k, (kind, cd, sd) in enumerate(layers)}
    state = (MambaModelState(built, seqlen_offset=offset, metadata={"note": note}) if container == "model"
             else built[0])
    spec = state_spec(state)
    header = msd._encode_header(spec)
    words = msd._preamble_words(msd.OP_P2P, msd.OK, header, spec.nbytes())
    msd._check_preamble(words, msd.OP_P2P)
    assert msd._check_header_bytes(words, header)[0] == spec
    pos = data.draw(st.integers(0, len(header) - 1))
    flip = data.draw(st.integers(1, 255))
    bad = bytearray(header)
    bad[pos] ^= flip
    with pytest.raises(msd._Rejected) as info:
        msd._check_header_bytes(words, bytes(bad))
    assert info.value.code == msd.BAD_HEADER_CHECKSUM
    raw = bytearray(struct.pack("<8q", *words))
    pos = data.draw(st.integers(0, len(raw) - 1))
    raw[pos] ^= flip
    with pytest.raises(msd._Rejected):
        msd._check_preamble(list(struct.unpack("<8q", bytes(raw))), msd.OP_P2P)


def test_without_process_group():
    import mamba_state.distributed as msd

    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(StateError, match="init_process_group"):
        msd.send_state(make_layer("mamba1", 1, torch.float32, 0), 1)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=settings().max_examples * 10)
@given(container=st.sampled_from(["model", "mamba1", "mamba2", "mamba3"]), where=st.sampled_from(["doc", "layer"]),
       value=_json_values, big=st.integers(2**62, 2**70), data=st.data())
def test_any_header_is_accepted_or_rejected_never_crashes(container, where, value, big, data):
    """A receiver's header check either accepts a header or raises ``_Rejected`` (which is acknowledged to the
    sender): never another exception, which would leave the sender waiting out the group's timeout."""
    import mamba_state.distributed as msd
    from mamba_state._packing import state_spec

    doc = json.loads(msd._encode_header(state_spec(make(container, 2, torch.float32, 1))))
    if where == "doc":
        doc[data.draw(st.sampled_from(sorted(doc) + ["extra"]))] = value
    else:
        entry = data.draw(st.sampled_from(doc["layers"]))
        key = data.draw(st.sampled_from(sorted(entry)))
        # a shape dimension beyond int64 half the time: torch itself refuses those sizes
        entry[key] = [0, big, 4] if key.endswith("_shape") and data.draw(st.booleans()) else value
    header = json.dumps(doc).encode()
    words = msd._preamble_words(msd.OP_P2P, msd.OK, header, doc.get("data_nbytes") if isinstance(
        doc.get("data_nbytes"), int) and 0 <= doc["data_nbytes"] < 2**62 else 0)
    try:
        msd._check_header_bytes(words, header)
    except msd._Rejected:
        pass
