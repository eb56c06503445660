"""The continuous-batching engine (issue 19): every request's tokens equal a solo ``generate`` with the same
options and seed whatever joins or leaves the batch, prefixes served from the cache, sessions resumed by the
resume law, cancellation, overload and argument errors. A tiny float64 model on the CPU (float64, so that the
last-bit differences of matrix kernels between batch sizes cannot flip a token)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, strategies as st

from mamba_state.adapters import StatefulMambaLM
from mamba_state.cache import StateCache
from mamba_state.errors import StateError
from mamba_state.generation import SamplingConfig, generate
from mamba_state.serve import Engine, EngineOverloadedError

VOCAB = 29


def _lm(seed=0):
    torch.manual_seed(seed)
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)
    lm = StatefulMambaLM.from_config(cfg, dtype=torch.float64, state_dtype=torch.float64).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
    return lm


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


@pytest.fixture(scope="module")
def lm():
    return _lm()


SAMPLINGS = [None, SamplingConfig(temperature=0.7), SamplingConfig(top_k=5, temperature=1.3),
             SamplingConfig(top_p=0.8), SamplingConfig(min_p=0.1), SamplingConfig(repetition_penalty=1.5),
             SamplingConfig(do_sample=True, top_k=3, repetition_penalty=0.8)]


def _solo(lm, prompt, k, sampling, seed, eos, state=None):
    out = generate(lm, torch.tensor([prompt]), state, max_new_tokens=k, sampling=sampling, seed=seed,
                   eos_token_id=eos)
    return out.sequences[0, len(prompt):].tolist(), out


request = st.tuples(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),  # prompt
                    st.integers(1, 10),  # max_new_tokens
                    st.integers(0, len(SAMPLINGS) - 1),
                    st.one_of(st.none(), st.integers(0, 2**40)),  # seed
                    st.one_of(st.none(), st.integers(0, VOCAB - 1)),  # eos
                    st.integers(0, 4))  # engine steps to run before submitting the next one


@given(st.lists(request, min_size=1, max_size=12), st.integers(1, 5), st.booleans())
def test_engine_equals_solo_generate_whatever_joins_or_leaves(lm, requests, max_batch, overlap):
    """Both ways of emitting: synchronous steps and steps whose tokens are emitted during the next one."""
    engine = Engine(lm, StateCache(lm), max_batch=max_batch, max_queue=100, overlap=overlap,
                    prefill_graphs=overlap, prefill_graph_tokens=8)
    handles = []
    for prompt, k, si, seed, eos, wait in requests:
        sampling = SAMPLINGS[si]
        if seed is None and sampling is not None and not sampling.do_sample:
            seed = 5  # unseeded sampling draws from the global generator: not reproducible, not comparable
        handles.append((prompt, k, sampling, seed, eos, engine.submit(prompt, max_new_tokens=k, sampling=sampling,
                                                                      seed=seed, eos_token_id=eos)))
        for _ in range(wait):
            engine.step()
    engine.run_until_idle()
    for prompt, k, sampling, seed, eos, h in handles:
        if sampling is not None and sampling.do_sample and seed is None:
            assert len(h.result()) <= k
            continue
        expected, _ = _solo(lm, prompt, k, sampling, seed, eos)
        assert h.result() == expected, (prompt, k, sampling, seed, eos)
        assert h.finish_reason == ("stop" if eos is not None and expected[-1] == eos else "length")


@pytest.mark.parametrize("overlap", [False, True])
def test_many_requests_through_growing_and_shrinking_buckets(lm, overlap):
    engine = Engine(lm, StateCache(lm), max_batch=8, overlap=overlap)
    g = torch.Generator().manual_seed(3)
    reqs = []
    for i in range(20):
        prompt = torch.randint(0, VOCAB, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
        k = 1 + (i * 7) % 13
        reqs.append((prompt, k, engine.submit(prompt, max_new_tokens=k, seed=i, sampling=SAMPLINGS[i % 7])))
        if i % 3 == 0:
            engine.step()
    capacities = set()
    while not engine.idle:
        engine.step()
        capacities.add(engine.batch.capacity)
    assert {1, 2, 4, 8} & capacities and max(capacities) <= 8
    for i, (prompt, k, h) in enumerate(reqs):
        assert h.result() == _solo(lm, prompt, k, SAMPLINGS[i % 7], i, None)[0]


@pytest.mark.parametrize("overlap,prefill_graphs", [(False, False), (True, True)])
def test_prefix_from_cache_gives_the_same_tokens(lm, overlap, prefill_graphs):
    """(prefill_graphs on the CPU: the tails run as the same power-of-two pieces, eagerly)"""
    cache = StateCache(lm)
    engine = Engine(lm, cache, cache_every=4, overlap=overlap, prefill_graphs=prefill_graphs, prefill_graph_tokens=4)
    system = list(range(1, 11))
    first = engine.submit(system + [3, 4], max_new_tokens=5, seed=1, sampling=SAMPLINGS[1])
    engine.run_until_idle()
    second = engine.submit(system + [7, 8, 9], max_new_tokens=5, seed=2, sampling=SAMPLINGS[2])
    engine.run_until_idle()
    assert second.cached_tokens == 8  # the state at 8 (every 4) of the shared 10 tokens
    assert second.result() == _solo(lm, system + [7, 8, 9], 5, SAMPLINGS[2], 2, None)[0]
    # a chat turn extending the first conversation starts from where it stopped
    convo = system + [3, 4] + first.result()
    third = engine.submit(convo + [5], max_new_tokens=4)
    engine.run_until_idle()
    assert third.cached_tokens == len(convo) - 1
    assert third.result() == _solo(lm, convo + [5], 4, None, None, None)[0]


@pytest.mark.parametrize("overlap", [False, True])
def test_session_resumes_by_the_resume_law(lm, tmp_path, overlap):
    cache = StateCache(lm, directory=tmp_path)
    engine = Engine(lm, cache, overlap=overlap)
    a = engine.submit([1, 2, 3, 4], max_new_tokens=6, seed=9, sampling=SAMPLINGS[1], session_id="chat")
    engine.run_until_idle()
    parked, extra = cache.get_session("chat")
    expected_a, out = _solo(lm, [1, 2, 3, 4], 6, SAMPLINGS[1], 9, None)
    assert parked.seqlen_offset == out.state.seqlen_offset and extra["pending"] == expected_a[-1]
    assert parked.allclose(out.state, rtol=1e-10, atol=1e-12)  # the state the solo call returns
    b = engine.submit([5, 6], max_new_tokens=5, seed=9, sampling=SAMPLINGS[1], session_id="chat")
    engine.run_until_idle()
    assert a.result() == expected_a
    nxt = torch.cat([out.sequences[:, -1:], torch.tensor([[5, 6]])], 1)
    resumed = generate(lm, nxt, out.state, max_new_tokens=5, sampling=SAMPLINGS[1], seed=9)
    assert b.result() == resumed.sequences[0, 3:].tolist() and b.cached_tokens == 4 + 6 - 1
    # an empty prompt continues the session from its last token; a restarted engine finds it on disk
    engine2 = Engine(lm, StateCache(lm, directory=tmp_path))
    c = engine2.submit([], max_new_tokens=3, session_id="chat")
    engine2.run_until_idle()
    again = generate(lm, resumed.sequences[:, -1:], resumed.state, max_new_tokens=3)
    assert c.result() == again.sequences[0, 1:].tolist()


def test_two_requests_of_one_session_run_one_after_the_other(lm):
    engine = Engine(lm, StateCache(lm))
    a = engine.submit([1, 2], max_new_tokens=4, session_id="s")
    b = engine.submit([3], max_new_tokens=4, session_id="s")
    engine.run_until_idle()
    _, out = _solo(lm, [1, 2], 4, None, None, None)
    ref = generate(lm, torch.cat([out.sequences[:, -1:], torch.tensor([[3]])], 1), out.state, max_new_tokens=4)
    assert b.result() == ref.sequences[0, 2:].tolist() and a.result() == out.sequences[0, 2:].tolist()


@pytest.mark.parametrize("overlap", [False, True])
def test_cancel_parks_the_state(lm, overlap):
    engine = Engine(lm, StateCache(lm), overlap=overlap)
    h = engine.submit([1, 2, 3], max_new_tokens=50, session_id="c")
    for _ in range(4):
        engine.step()
    h.cancel()
    engine.run_until_idle()
    got = h.result()
    assert h.finish_reason == "cancelled" and 0 < len(got) < 50
    full, _ = _solo(lm, [1, 2, 3], 50, None, None, None)
    assert got == full[:len(got)]
    consumed = [1, 2, 3] + got[:-1]  # the parked state's tokens, also cached as a prefix
    n, cached = engine.cache.lookup(consumed)
    with torch.no_grad():
        _, ref = lm(torch.tensor([consumed]))
    assert n == len(consumed) and cached.allclose(ref, rtol=1e-9, atol=1e-11)
    cont = engine.submit([], max_new_tokens=5, session_id="c")
    engine.run_until_idle()
    assert cont.result() == full[len(got):len(got) + 5]


def test_overload_and_bad_arguments(lm):
    engine = Engine(lm, StateCache(lm), max_queue=2)
    engine.submit([1], max_new_tokens=1)
    engine.submit([1], max_new_tokens=1)
    with pytest.raises(EngineOverloadedError, match="max_queue=2"):
        engine.submit([1], max_new_tokens=1)
    engine.run_until_idle()
    assert engine.stats()["rejected"] == 1 and engine.stats()["finished"] == 2
    with pytest.raises(StateError, match=r"prompt: expected token ids in \[0, 28\], found 29"):
        engine.submit([29], max_new_tokens=1)
    with pytest.raises(StateError, match="max_new_tokens: expected an int in"):
        engine.submit([1], max_new_tokens=0)
    with pytest.raises(StateError, match="at least one token"):
        engine.submit([], max_new_tokens=1)
    with pytest.raises(StateError, match="seed"):
        engine.submit([1], max_new_tokens=1, seed=1.5)
    with pytest.raises(StateError, match="eos_token_id"):
        engine.submit([1], max_new_tokens=1, eos_token_id=[99])
    h = engine.submit([], max_new_tokens=1, session_id="never-parked")
    engine.run_until_idle()
    with pytest.raises(StateError, match="expected a parked session or prompt tokens"):
        h.result()


def test_engine_thread_serves_concurrent_submitters(lm):
    import threading

    engine = Engine(lm, StateCache(lm), max_batch=4)
    engine.start()
    results: dict[int, list[int]] = {}

    def client(i):
        results[i] = list(engine.submit([i + 1, 2], max_new_tokens=6, seed=i, sampling=SAMPLINGS[1]))

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.stop()
    for i in range(10):
        assert results[i] == _solo(lm, [i + 1, 2], 6, SAMPLINGS[1], i, None)[0]


def test_serving_page_snippets_run(tmp_path, monkeypatch):
    """The ```python blocks of docs/serving.md run (in page order, one namespace)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "serving.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```[ \t]*$", text, re.S | re.M)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "docs_snippet_serving"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/serving.md[block {i}]", "exec"), namespace)


def test_prefill_pieces():
    from mamba_state.serve.prefill_graphs import pieces

    assert pieces(96, 256) == [64, 32] and pieces(1, 4) == [1] and pieces(7, 4) == [4, 2, 1]
    assert all(sum(pieces(n, 8)) == n for n in range(1, 9))


# ---------------------------------------------------------------------------------------------- packed prefill
def _count_solo_prefills(engine):
    """Wrap the engine's one-request prefill: returns the list of feed lengths prefilled alone, per step."""
    calls: list[int] = []
    solo = engine._prefill_one

    def spy(req, state):
        calls.append(len(req.feed))
        return solo(req, state)

    engine._prefill_one = spy
    return calls


def _cached_prefixes(cache, sequences):
    """Every prefix of ``sequences`` that ``cache`` holds, with its state (a lookup of exactly that prefix)."""
    out = {}
    for seq in sequences:
        for n in range(1, len(seq) + 1):
            ids = tuple(seq[:n])
            if list(ids) in cache:
                got, state = cache.lookup(list(ids))
                assert got == n
                out[ids] = state
    return out


packed_request = st.tuples(st.one_of(st.none(), st.integers(0, 2)),  # which cached prefix the prompt extends
                           st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=9),  # the rest of the prompt
                           st.integers(1, 6),  # max_new_tokens
                           st.integers(0, len(SAMPLINGS) - 1),
                           st.integers(0, 2**40))  # seed


@given(st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=10), min_size=3, max_size=3),
       st.lists(packed_request, min_size=2, max_size=9), st.integers(1, 3), st.integers(1, 8),
       st.one_of(st.none(), st.integers(1, 5)), st.booleans())
def test_requests_admitted_together_equal_solo_generate(lm, prefixes, requests, running, chunk, every, overlap):
    """Several requests admitted in one step (cached prefixes of different lengths or none, tails of 1 or more
    tokens, prompts cut into packed forwards of ``chunk`` tokens, cache fills every ``every``) while others
    decode: each one's tokens equal a solo generate, and they are prefilled together (at most one request of a
    step alone: the lone member of its group)."""
    cache = StateCache(lm)
    for p in prefixes:
        cache.fill(lm, p)  # the state after the whole prefix
    engine = Engine(lm, cache, max_batch=16, prefill_chunk_size=chunk, cache_every=every, overlap=overlap,
                    prefill_graphs=overlap, prefill_graph_tokens=4)
    early = [engine.submit([i + 1, 2, 3], max_new_tokens=8, seed=i, sampling=SAMPLINGS[1]) for i in range(running)]
    engine.step()
    solo_prefills = _count_solo_prefills(engine)
    handles = []
    for which, tail, k, si, seed in requests:
        prompt = (prefixes[which] if which is not None else []) + tail
        handles.append((prompt, k, SAMPLINGS[si], seed, engine.submit(prompt, max_new_tokens=k,
                                                                      sampling=SAMPLINGS[si], seed=seed)))
    while engine.stats()["waiting"]:
        before = len(solo_prefills)
        engine.step()
        assert len(solo_prefills) - before <= 1
    engine.run_until_idle()
    for i, h in enumerate(early):
        assert h.result() == _solo(lm, [i + 1, 2, 3], 8, SAMPLINGS[1], i, None)[0]
    for prompt, k, sampling, seed, h in handles:
        assert h.result() == _solo(lm, prompt, k, sampling, seed, None)[0], (prompt, k, sampling, seed)
    stats = engine.stats()
    assert stats["prefill_batch_sequences"] >= stats["prefill_batches"]


@pytest.mark.parametrize("chunk", [3, 64])
def test_packed_prefill_fills_the_cache_as_one_at_a_time(lm, chunk):
    """The same requests through a packed engine and through one that prefills one request at a time: the same
    tokens, the same cached prefixes (states equal), the same cached_tokens per request; a prompt that would
    start from a state another request of its step is about to cache waits one step for it."""
    system = [3, 1, 4, 1, 5, 9, 2, 6]
    prompts = [system + [5, 3], system + [5, 3, 5, 8, 9], [7, 7], system[:5] + [8, 8, 8, 8], [2],
               system + [1] * 9, [4, 4, 4]]
    results = {}
    for packed in (True, False):
        cache = StateCache(lm)
        cache.fill(lm, system[:4])
        engine = Engine(lm, cache, cache_every=3, prefill_chunk_size=chunk, packed_prefill=packed)
        hs = [engine.submit(p, max_new_tokens=3, seed=i, sampling=SAMPLINGS[i % 7]) for i, p in enumerate(prompts)]
        engine.run_until_idle()
        stats = engine.stats()
        outs = [h.result() for h in hs]
        keys = _cached_prefixes(cache, [p + o for p, o in zip(prompts, outs)])
        results[packed] = (outs, [h.cached_tokens for h in hs], keys, stats)
    (outs, cached, keys, stats), (outs1, cached1, keys1, stats1) = results[True], results[False]
    assert outs == outs1 == [_solo(lm, p, 3, SAMPLINGS[i % 7], i, None)[0] for i, p in enumerate(prompts)]
    assert cached == cached1
    assert cached[1] == 10  # system + [5, 3] cached by the first request (its end), in the step after it
    assert keys.keys() == keys1.keys()
    for ids, state in keys.items():
        assert state.allclose(keys1[ids], rtol=1e-10, atol=1e-12), ids
    assert stats["prefill_batches"] >= 1 and stats["prefill_batch_sequences"] >= 3
    assert stats1["prefill_batches"] == 0 and stats["prefill_tokens"] == stats1["prefill_tokens"]
    from mamba_state.serve.metrics import render_metrics

    text = render_metrics(stats)
    assert f"mamba_state_prefill_batches_total {stats['prefill_batches']}\n" in text
    assert f"mamba_state_prefill_batch_sequences_total {stats['prefill_batch_sequences']}\n" in text


def test_packed_prefill_falls_back_by_capability(lm, monkeypatch):
    """A model that refuses cu_seqlens (StateCompatibilityError, as a model with Mamba-3 mixers does) is
    prefilled one request at a time; one that refuses states at positions with cu_seqlens (as Mamba-2's packed
    path does) packs only the requests with no cache fill inside their prompt. Tokens and cache as always."""
    from mamba_state.errors import StateCompatibilityError
    from mamba_state.serve.packed_prefill import packed_capabilities

    assert packed_capabilities(lm) == (True, True)
    run_packed = lm._run_packed
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [3, 3, 3], [5, 6, 7, 8, 9, 10, 11, 12]]

    def run(refuse):
        def patched(input_ids, state, reset, num_last_tokens, return_states_at, cu_seqlens):
            if refuse == "all":
                raise StateCompatibilityError("cu_seqlens: expected mixers that run packed sequences, found Mamba3")
            if refuse == "positions" and return_states_at is not None:
                raise StateError("return_states_at: not supported with cu_seqlens for these layers")
            return run_packed(input_ids, state, reset, num_last_tokens, return_states_at, cu_seqlens)

        monkeypatch.setattr(lm, "_run_packed", patched)
        try:
            engine = Engine(lm, StateCache(lm), cache_every=4)
            solo = _count_solo_prefills(engine)
            hs = [engine.submit(p, max_new_tokens=4, seed=i, sampling=SAMPLINGS[2]) for i, p in enumerate(prompts)]
            engine.run_until_idle()
            return [h.result() for h in hs], solo, engine
        finally:
            monkeypatch.setattr(lm, "_run_packed", run_packed)

    expected = [_solo(lm, p, 4, SAMPLINGS[2], i, None)[0] for i, p in enumerate(prompts)]
    outs, solo, engine = run("all")
    assert outs == expected and solo == [7, 2, 3, 8] and engine._pack_caps == (False, False)
    assert engine.stats()["prefill_batches"] == 0
    outs, solo, engine = run("positions")
    # 7 and 8 tokens from zero cross the multiple 4: alone (fill at 4 inside); [8, 9] and [3, 3, 3] packed
    assert outs == expected and solo == [7, 8] and engine._pack_caps == (True, False)
    assert engine.stats()["prefill_batches"] == 1 and engine.stats()["prefill_batch_sequences"] == 2
    for p in prompts:
        assert p in engine.cache and (len(p) <= 4 or p[:4] in engine.cache)


def test_packed_prefill_with_sessions_and_cancellation(lm):
    """Two sessions resumed in one step (one parked with its history, one a new turn of several tokens) and a
    request cancelled while waiting: each session continues by the resume law."""
    engine = Engine(lm, StateCache(lm))
    a = engine.submit([1, 2, 3], max_new_tokens=4, seed=1, sampling=SAMPLINGS[1], session_id="a")
    b = engine.submit([4, 5, 6, 7, 8], max_new_tokens=3, session_id="b")
    engine.run_until_idle()
    _, out_a = _solo(lm, [1, 2, 3], 4, SAMPLINGS[1], 1, None)
    _, out_b = _solo(lm, [4, 5, 6, 7, 8], 3, None, None, None)
    assert a.result() == out_a.sequences[0, 3:].tolist() and b.result() == out_b.sequences[0, 5:].tolist()
    solo = _count_solo_prefills(engine)
    batches = engine.stats()["prefill_batches"]
    a2 = engine.submit([9, 10, 11], max_new_tokens=5, seed=1, sampling=SAMPLINGS[1], session_id="a")
    gone = engine.submit([1, 2, 3, 4], max_new_tokens=5)
    gone.cancel()
    b2 = engine.submit([12], max_new_tokens=3, session_id="b")  # pending token + 1: two tokens to feed
    c = engine.submit([6, 5, 4, 3], max_new_tokens=2)
    engine.run_until_idle()
    assert solo == [] and gone.finish_reason == "cancelled" and gone.result() == []
    ra = generate(lm, torch.cat([out_a.sequences[:, -1:], torch.tensor([[9, 10, 11]])], 1), out_a.state,
                  max_new_tokens=5, sampling=SAMPLINGS[1], seed=1)
    rb = generate(lm, torch.cat([out_b.sequences[:, -1:], torch.tensor([[12]])], 1), out_b.state, max_new_tokens=3)
    assert a2.result() == ra.sequences[0, 4:].tolist() and a2.cached_tokens == 3 + 4 - 1
    assert b2.result() == rb.sequences[0, 2:].tolist()
    assert c.result() == _solo(lm, [6, 5, 4, 3], 2, None, None, None)[0]
    assert engine.stats()["prefill_batches"] == batches + 1 and engine.stats()["prefill_batch_sequences"] == 2 + 3


def test_packed_prefill_of_mamba2_mixers_equals_solo_generate():
    """An LM of Mamba-2 mixers: packed where its layers run packed sequences (asked of the model), one at a time
    otherwise; either way every request's tokens equal a solo generate, cache fills included."""
    torch.manual_seed(2)
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8,
               ssm_cfg={"d_state": 8, "layer": "Mamba2", "headdim": 8, "chunk_size": 4})
    lm2 = StatefulMambaLM.from_config(cfg, dtype=torch.float64, state_dtype=torch.float64).eval()
    engine = Engine(lm2, StateCache(lm2), cache_every=3, prefill_chunk_size=5)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [3, 3], [5, 6, 7, 8, 9, 10, 11, 12], [4]]
    hs = [engine.submit(p, max_new_tokens=4, seed=i, sampling=SAMPLINGS[i % 7]) for i, p in enumerate(prompts)]
    engine.run_until_idle()
    for i, (p, h) in enumerate(zip(prompts, hs)):
        assert h.result() == _solo(lm2, p, 4, SAMPLINGS[i % 7], i, None)[0]
    packed, _ = engine._pack_caps
    assert (engine.stats()["prefill_batches"] > 0) == packed


def test_prefill_packing_plan():
    from mamba_state.serve.packed_prefill import cache_positions, first_insert, plan_forwards

    plan = plan_forwards([3, 5, 0, 2], 4)
    assert [[(p.seq, p.lo, p.hi) for p in f] for f in plan] == [[(0, 0, 3), (1, 0, 1)], [(1, 1, 5)], [(3, 0, 2)]]
    for lengths in ([1] * 9, [9], [4, 4], [2, 7, 1]):
        for chunk in (1, 3, 4, 16):
            forwards = plan_forwards(lengths, chunk)
            assert all(sum(p.hi - p.lo for p in f) <= chunk for f in forwards)
            for s, n in enumerate(lengths):  # each feed covered once, in order
                covered = [(p.lo, p.hi) for f in forwards for p in f if p.seq == s]
                assert [lo for lo, _ in covered] == [0] + [hi for _, hi in covered[:-1]] and covered[-1][1] == n
    assert cache_positions(2, 0, 5, 9, 3) == [3, 6, 7][:2] and cache_positions(2, 5, 9, 9, 3) == [9, 11]
    assert cache_positions(0, 0, 4, 4, None) == [4] and cache_positions(0, 0, 3, 4, None) == []
    assert first_insert(2, 9, 3) == 3 and first_insert(2, 9, None) == 11 and first_insert(10, 1, 4) == 11


@pytest.mark.parametrize("packed", [False, True])
def test_repetition_penalty_sees_the_cached_prefix(lm, packed):
    """generate's penalty covers the whole prompt: so does the engine's when the prompt starts from a cached
    prefix (a one-token tail, as a decode step, and longer tails, prefilled alone or packed)."""
    cache = StateCache(lm)
    cache.fill(lm, [0, 1])
    engine = Engine(lm, cache, packed_prefill=packed)
    prompts = [[0, 1, 0], [0, 1, 0, 2], [0, 1, 7, 7, 1]]
    hs = [engine.submit(p, max_new_tokens=3, sampling=SAMPLINGS[6], seed=1) for p in prompts]
    engine.run_until_idle()
    assert [h.cached_tokens for h in hs] == [2, 2, 2]
    assert [h.result() for h in hs] == [_solo(lm, p, 3, SAMPLINGS[6], 1, None)[0] for p in prompts]


def test_failed_packed_forward_fails_its_requests_only(lm, monkeypatch):
    """A packed forward that raises ends the requests it was prefilling with that error (their sessions freed);
    a request already decoding and the requests after it are served as usual."""
    engine = Engine(lm, StateCache(lm))
    assert engine._packing() == (True, True)
    early = engine.submit([1, 2, 3], max_new_tokens=6)
    engine.step()

    def broken(*args, **kwargs):
        raise RuntimeError("device lost")

    monkeypatch.setattr(lm, "_run_packed", broken)
    failing = [engine.submit([4, 5, 6], max_new_tokens=3, session_id="s"), engine.submit([7, 8], max_new_tokens=3)]
    engine.step()
    monkeypatch.undo()
    for h in failing:
        with pytest.raises(RuntimeError, match="device lost"):
            h.result(timeout=1)
    again = engine.submit([9, 9], max_new_tokens=3, session_id="s")
    engine.run_until_idle()
    assert early.result() == _solo(lm, [1, 2, 3], 6, None, None, None)[0]
    assert again.result() == _solo(lm, [9, 9], 3, None, None, None)[0]


def test_freeze_gc_moves_the_long_lived_objects_out_of_garbage_collections(lm):
    """``freeze_gc=True`` freezes what is alive when the engine is built (the model included), so full
    collections during decoding skip it; the default on the CPU leaves the collector as it is. Tokens are the
    same either way."""
    import gc

    gc.unfreeze()
    try:
        plain = Engine(lm, StateCache(lm))
        assert gc.get_freeze_count() == 0
        frozen = Engine(lm, StateCache(lm), freeze_gc=True)
        assert gc.get_freeze_count() > 0
        weight = next(lm.parameters())  # frozen: no longer among the objects the collections walk
        assert gc.is_tracked(weight) and not any(o is weight for o in gc.get_objects())
        outs = []
        for engine in (plain, frozen):
            h = engine.submit([1, 2, 3, 4], max_new_tokens=5, seed=3, sampling=SAMPLINGS[1])
            engine.run_until_idle()
            outs.append(h.result())
        assert outs[0] == outs[1] == _solo(lm, [1, 2, 3, 4], 5, SAMPLINGS[1], 3, None)[0]
    finally:
        gc.unfreeze()


def test_choose_device_with_only_the_rows_that_need_their_own_choice(lm):
    """``choose_device(logits, rows, vocab=)``: unlisted rows take the argmax over the vocabulary (their greedy
    token, from half logits as from float32 ones); a bad ``vocab`` is refused."""
    from mamba_state.serve.sampler import RowSampler, choose_device

    g = torch.Generator().manual_seed(11)
    logits = torch.randn(5, VOCAB + 3, generator=g).to(torch.bfloat16)
    logits[:, VOCAB:] = 100.0  # padding columns past the vocabulary never win
    sampler = RowSampler.make(SAMPLINGS[2], 7, VOCAB, [1, 2], torch.device("cpu"))
    got = choose_device(logits, [(3, sampler, 9)], vocab=VOCAB)
    want = logits[:, :VOCAB].float().argmax(-1)
    assert torch.equal(got[[0, 1, 2, 4]], want[[0, 1, 2, 4]])
    solo = RowSampler.make(SAMPLINGS[2], 7, VOCAB, [1, 2], torch.device("cpu"))
    assert got[3] == solo.choose(logits[3:4], 9)[0]
    for bad in (0, VOCAB + 4, 2.0, True):
        with pytest.raises(StateError, match="vocab: expected an int"):
            choose_device(logits, [], vocab=bad)
    with pytest.raises(StateError, match="freeze_gc: expected None, True or False"):
        Engine(lm, StateCache(lm), freeze_gc="yes")
