"""The state cache (issue 19): longest prefix, LRU eviction by bytes over the tiers, byte accounting, fingerprint
isolation, the disk tier across processes, corrupted disk entries, sessions, filling from one forward, thread
safety and argument errors. Tiny states and a tiny model on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from mamba_state.adapters import StatefulMambaLM
from mamba_state.cache import CacheCorruptionWarning, StateCache, model_fingerprint
from mamba_state.cache.keys import prefix_key
from mamba_state.errors import StateError, StateShapeError
from mamba_state.state import MambaInferenceState, MambaModelState

VOCAB = 29
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg():
    return dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
                fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)


def _lm(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    return StatefulMambaLM.from_config(_cfg(), dtype=dtype, state_dtype=sdt).eval()


def _state(tokens, tag: float | None = None) -> MambaModelState:
    """A small two-layer state after ``tokens`` whose values identify it (``tag``, else a hash of the tokens)."""
    n = len(tokens)
    v = float(tag if tag is not None else (sum((i + 1) * (t + 1) for i, t in enumerate(tokens)) % 9973))
    conv = torch.full((1, 6, 4), v)
    ssm = torch.arange(6 * 3, dtype=torch.float32).reshape(1, 6, 3) + v
    return MambaModelState({0: MambaInferenceState(conv, ssm), 1: MambaInferenceState(conv * 2, ssm * 2)},
                           seqlen_offset=n)


NBYTES = _state([1]).nbytes


# ---------------------------------------------------------------------------------------------- longest prefix
def test_longest_prefix_and_whole_match():
    c = StateCache(fingerprint="t")
    c.insert([1, 2], _state([1, 2]))
    c.insert([1, 2, 3, 4], _state([1, 2, 3, 4]))
    c.insert([5], _state([5]))
    n, s = c.lookup([1, 2, 3, 4, 9, 9])
    assert n == 4 and s.allclose(_state([1, 2, 3, 4]), rtol=0, atol=0) and s.seqlen_offset == 4
    n, s = c.lookup(torch.tensor([1, 2, 3]))
    assert n == 2 and s.allclose(_state([1, 2]), rtol=0, atol=0)
    assert c.lookup([1, 2, 3, 4])[0] == 4  # a whole-length match counts
    assert c.lookup([2, 1]) == (0, None)
    assert c.lookup([]) == (0, None)
    st_ = c.stats()
    assert (st_["hits"], st_["misses"], st_["hit_tokens"]) == (3, 2, 10)
    assert [1, 2] in c and [1, 3] not in c


def test_lookup_returns_a_copy():
    c = StateCache(fingerprint="t")
    c.insert([1, 2], _state([1, 2]))
    _, s = c.lookup([1, 2])
    s.zero_()
    assert c.lookup([1, 2])[1].allclose(_state([1, 2]), rtol=0, atol=0)


@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=6), min_size=1, max_size=12),
       st.lists(st.integers(0, 2), max_size=8))
def test_longest_prefix_law(inserted, query):
    """matched_len is the longest inserted sequence that is a prefix of the query, and its state is that one's."""
    c = StateCache(fingerprint="t")
    for seq in inserted:
        c.insert(seq, _state(seq))
    prefixes = [seq for seq in inserted if query[:len(seq)] == seq]
    n, s = c.lookup(query)
    if not prefixes:
        assert (n, s) == (0, None)
    else:
        best = max(prefixes, key=len)
        assert n == len(best) and s.allclose(_state(best), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- eviction, bytes
def test_lru_eviction_order_and_byte_accounting():
    c = StateCache(fingerprint="t", device_bytes=3 * NBYTES, host_bytes=0)
    for i in range(3):
        c.insert([i], _state([i]))
    assert c.stats()["bytes"]["device"] == 3 * NBYTES
    assert c.lookup([0])[0] == 1  # 0 is now the most recently used: 1 is the oldest
    c.insert([3], _state([3]))
    assert [0] in c and [1] not in c and [2] in c and [3] in c
    s = c.stats()
    assert s["evictions"] == 1 and s["bytes"]["device"] == 3 * NBYTES and s["entries"]["device"] == 3
    c.insert([2], _state([2], tag=7.0))  # replacing an entry keeps the bytes right
    assert c.stats()["bytes"]["device"] == 3 * NBYTES
    assert c.lookup([2])[1].allclose(_state([2], tag=7.0), rtol=0, atol=0)


def test_demotion_to_host_then_eviction():
    c = StateCache(fingerprint="t", device_bytes=2 * NBYTES, host_bytes=2 * NBYTES)
    for i in range(5):
        c.insert([i], _state([i]))
    s = c.stats()
    assert s["entries"] == {"device": 2, "host": 2, "disk": 0} and s["evictions"] == 1 and s["demotions"] == 3
    assert [0] not in c and all([i] in c for i in range(1, 5))
    assert s["bytes"]["device"] == 2 * NBYTES and s["bytes"]["host"] >= 2 * NBYTES
    n, st_ = c.lookup([1, 7])  # from the host tier, bit for bit
    assert n == 1 and st_.allclose(_state([1]), rtol=0, atol=0)


def test_too_large_for_every_tier_is_not_kept():
    c = StateCache(fingerprint="t", device_bytes=NBYTES - 1, host_bytes=0)
    c.insert([1], _state([1]))
    assert len(c) == 0 and c.stats()["evictions"] == 1 and c.stats()["bytes"]["device"] == 0


# ---------------------------------------------------------------------------------------------- fingerprints
def test_fingerprint_isolation_in_memory_and_on_disk(tmp_path):
    a, b = _lm(0), _lm(1)
    fa, fb = model_fingerprint(a), model_fingerprint(b)
    assert fa != fb and fa == model_fingerprint(_lm(0))
    with torch.no_grad():
        next(a.parameters())[0, 0] += 1e-3  # one weight changed: another model
    assert model_fingerprint(a) != fa
    ca = StateCache(fingerprint=fa, directory=tmp_path)
    ca.insert([1, 2], _state([1, 2]))
    cb = StateCache(fingerprint=fb, directory=tmp_path)
    assert cb.lookup([1, 2]) == (0, None) and len(cb) == 0
    cb.insert([1, 2], _state([1, 2], tag=3.0))
    assert StateCache(fingerprint=fa, directory=tmp_path).lookup([1, 2])[1].allclose(_state([1, 2]), rtol=0, atol=0)
    assert len(os.listdir(tmp_path)) == 2  # neither cache touched the other's file


# ---------------------------------------------------------------------------------------------- disk tier
def test_disk_tier_survives_a_new_process(tmp_path):
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
        from test_cache import _state
        from mamba_state.cache import StateCache
        c = StateCache(fingerprint="proc", directory={str(tmp_path)!r})
        c.insert([3, 1, 4], _state([3, 1, 4]))
        c.insert([3, 1, 4, 1, 5], _state([3, 1, 4, 1, 5]))
        c.put_session("chat-1", _state([9, 9], tag=2.5), {{"pending": 7}})
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    c = StateCache(fingerprint="proc", directory=tmp_path)
    assert c.stats()["entries"]["disk"] == 3 and c.stats()["entries"]["device"] == 0
    n, s = c.lookup([3, 1, 4, 1, 5, 9])
    assert n == 5 and s.allclose(_state([3, 1, 4, 1, 5]), rtol=0, atol=0) and s.dtype == torch.float32
    assert c.stats()["entries"]["device"] == 1  # a disk hit comes back into memory
    state, extra = c.get_session("chat-1")
    assert extra == {"pending": 7} and state.allclose(_state([9, 9], tag=2.5), rtol=0, atol=0)


def _flip_last_byte(path):
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        b = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupted_disk_entries_are_dropped_and_reported(tmp_path):
    c = StateCache(fingerprint="t", directory=tmp_path)
    c.insert([1, 2], _state([1, 2]))
    c.insert([1, 2, 3], _state([1, 2, 3]))
    names = os.listdir(tmp_path)
    target = os.path.join(tmp_path, prefix_key("t", np.array([1, 2, 3])) + ".safetensors")
    assert os.path.basename(target) in names
    _flip_last_byte(target)
    with pytest.warns(CacheCorruptionWarning):
        fresh = StateCache(fingerprint="t", directory=tmp_path)
    assert fresh.stats()["corrupted"] == 1 and fresh.problems and fresh.problems[0][0] == target
    assert os.path.exists(target + ".corrupt") and not os.path.exists(target)
    n, s = fresh.lookup([1, 2, 3])  # never served: the shorter prefix answers
    assert n == 2 and s.allclose(_state([1, 2]), rtol=0, atol=0)
    # an entry corrupted after the scan: dropped at the hit, the lookup goes on
    other = StateCache(fingerprint="t", directory=tmp_path)
    _flip_last_byte(os.path.join(tmp_path, prefix_key("t", np.array([1, 2])) + ".safetensors"))
    with pytest.warns(CacheCorruptionWarning):
        assert other.lookup([1, 2, 3]) == (0, None)
    assert other.stats()["corrupted"] == 1 and len(other) == 0


def test_renamed_file_is_corrupted(tmp_path):
    c = StateCache(fingerprint="t", directory=tmp_path)
    c.insert([4, 4], _state([4, 4]))
    (name,) = os.listdir(tmp_path)
    os.rename(tmp_path / name, tmp_path / ("0" * 64 + ".safetensors"))
    with pytest.warns(CacheCorruptionWarning, match="hash to the file name"):
        fresh = StateCache(fingerprint="t", directory=tmp_path)
    assert len(fresh) == 0


def test_disk_budget_deletes_oldest_files(tmp_path):
    c = StateCache(fingerprint="t", directory=tmp_path, device_bytes=0, host_bytes=0)
    c.insert([1], _state([1]))
    size = c.stats()["bytes"]["disk"]
    c2 = StateCache(fingerprint="t", directory=tmp_path / "b", disk_bytes=2 * size, device_bytes=0, host_bytes=0)
    for i in range(3):
        c2.insert([i], _state([i]))
    assert [0] not in c2 and [1] in c2 and [2] in c2
    assert len(os.listdir(tmp_path / "b")) == 2 and c2.stats()["bytes"]["disk"] == 2 * size
    assert c2.lookup([2])[1].allclose(_state([2]), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- sessions
def test_sessions_park_get_drop(tmp_path):
    c = StateCache(fingerprint="t", directory=tmp_path)
    assert c.get_session("s1") is None
    c.put_session("s1", _state([1, 2, 3]), {"pending": 4})
    state, extra = c.get_session("s1")
    assert extra == {"pending": 4} and state.seqlen_offset == 3
    assert c.lookup([1, 2, 3]) == (0, None)  # sessions are not prefixes
    assert c.drop_session("s1") and not c.drop_session("s1") and os.listdir(tmp_path) == []
    with pytest.raises(StateError, match="session_id"):
        c.put_session("bad id", _state([1]))


# ---------------------------------------------------------------------------------------------- fill
def test_fill_inserts_states_of_one_forward():
    lm = _lm(dtype=torch.float64)
    c = StateCache(lm)
    ids = torch.randint(0, VOCAB, (21,), generator=torch.Generator().manual_seed(0))
    logits, final = c.fill(lm, ids, every=8)
    assert len(c) == 3  # 8, 16 and 21
    for n in (8, 16, 21):
        with torch.no_grad():
            _, ref = lm(ids[None, :n])
        got_n, got = c.lookup(ids[:n])
        assert got_n == n and got.allclose(ref, rtol=1e-10, atol=1e-12)
    # continue from a cached prefix: the same logits as the whole forward
    n, s = c.lookup(torch.cat([ids[:16], torch.tensor([1, 2, 3])]))
    ext = torch.cat([ids[:16], torch.tensor([1, 2, 3])])
    tail, _ = c.fill(lm, ext, state=s, start=n, insert_end=True)
    with torch.no_grad():
        whole, _ = lm(ext[None])
    torch.testing.assert_close(tail, whole[:, n:], rtol=1e-9, atol=1e-10)
    with pytest.raises(StateError, match="start"):
        c.fill(lm, ids, state=s, start=0)


# ---------------------------------------------------------------------------------------------- threads
def test_thread_safety_keeps_bytes_consistent():
    c = StateCache(fingerprint="t", device_bytes=20 * NBYTES, host_bytes=10 * NBYTES)
    errors = []

    def work(k):
        try:
            rng = np.random.default_rng(k)
            for _ in range(150):
                seq = rng.integers(0, 3, rng.integers(1, 5)).tolist()
                if rng.random() < 0.5:
                    c.insert(seq, _state(seq))
                else:
                    n, s = c.lookup(seq + [0])
                    if s is not None:
                        assert s.allclose(_state((seq + [0])[:n]), rtol=0, atol=0)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    s = c.stats()
    assert s["bytes"]["device"] == s["entries"]["device"] * NBYTES <= 20 * NBYTES
    assert s["entries"]["device"] + s["entries"]["host"] == len(c)


# ---------------------------------------------------------------------------------------------- errors
def test_bad_input_raises_naming_expected_and_found():
    c = StateCache(fingerprint="t")
    two = MambaModelState.cat([_state([1]), _state([1])])
    with pytest.raises(StateShapeError, match="batch size 1.*found batch size 2"):
        c.insert([1], two)
    with pytest.raises(StateError, match="seqlen_offset == len.*= 2.*found seqlen_offset 1"):
        c.insert([1, 2], _state([1]))
    with pytest.raises(StateError, match="integer token ids, found a torch.float32"):
        c.insert(torch.tensor([1.0]), _state([1]))
    with pytest.raises(StateError, match="non-negative token ids, found -1"):
        c.lookup([-1])
    with pytest.raises(StateShapeError, match="at least one token"):
        c.insert([], _state([1]))
    with pytest.raises(StateError, match="expected a MambaModelState, found dict"):
        c.insert([1], {})
    with pytest.raises(StateError, match="device_bytes: expected a non-negative int"):
        StateCache(fingerprint="t", device_bytes=-1)
    with pytest.raises(StateError, match="fingerprint"):
        StateCache(fingerprint="has space")
    assert len(c) == 0  # nothing half-inserted


def test_no_warning_for_clean_directory(tmp_path):
    c = StateCache(fingerprint="t", directory=tmp_path)
    c.insert([1], _state([1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(StateCache(fingerprint="t", directory=tmp_path)) == 1


def test_every_tier_off_keeps_nothing_and_counts_it():
    """device_bytes=0, host_bytes=0 and no directory (the serving benchmark's 'without the cache'): an insert is
    still checked (bad input raises), keeps nothing, and counts as an insertion and an eviction, as a state
    that fits in no tier does with tiers on."""
    c = StateCache(fingerprint="t", device_bytes=0, host_bytes=0)
    for n in (3, 5):
        c.insert(list(range(n)), _state(list(range(n))))
    s = c.stats()
    assert (s["insertions"], s["evictions"], s["total_entries"]) == (2, 2, 0)
    assert s["bytes"] == {"device": 0, "host": 0, "disk": 0}
    assert c.lookup(list(range(6))) == (0, None)
    with pytest.raises(StateError, match="seqlen_offset"):
        c.insert([1, 2], _state([1, 2, 3]))
    with pytest.raises(StateShapeError):
        c.insert([], _state([1]))
    tiers_on = StateCache(fingerprint="t", device_bytes=1, host_bytes=0)  # too small for any state: same count
    tiers_on.insert([0, 1, 2], _state([0, 1, 2]))
    on = tiers_on.stats()
    assert (on["insertions"], on["evictions"]) == (1, 1)
