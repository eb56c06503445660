"""Generation (issue 5): sampling semantics, streaming, the resume law (in process and across processes),
per-row EOS, branching, argument errors. Tiny random models on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings
import weakref

import pytest
import torch
from hypothesis import given, strategies as st

from mamba_state import load_model_state, save_model_state
from mamba_state.adapters import StatefulMambaLM
from mamba_state.errors import StateError, StateShapeError
from mamba_state.generation import SamplingConfig
from mamba_state.generation import decode as G
from mamba_state.generation.decode import GenerationOutput, _choose, _process, _Sampling, generate, step_seed, stream
from mamba_state.state import MambaModelState

VOCAB = 29  # padded to 32 in the head: sampling must never pick 29..31


def _cfg(**over):
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)
    cfg.update(over)
    return cfg


def _lm(seed=0, dtype=torch.float32, **over):
    torch.manual_seed(seed)
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    lm = StatefulMambaLM.from_config(_cfg(**over), dtype=dtype, state_dtype=sdt).eval()
    with torch.no_grad():  # norms and D away from 1 so that every parameter matters
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


def _ids(batch, seqlen, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g)


def _new(out, n_prompt):
    return out.sequences[:, n_prompt:]


# ---------------------------------------------------------------------------------------------- greedy
def test_greedy_matches_full_forward_argmax_float64():
    """Independent reference: re-run the whole sequence through the chunked forward and take the argmax."""
    lm = _lm(dtype=torch.float64)
    ids = _ids(3, 6)
    out = generate(lm, ids, max_new_tokens=8, temperature=0)
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(8):
            logits, _ = lm(seq)
            seq = torch.cat([seq, logits[:, -1, :VOCAB].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out.sequences, seq)
    assert out.state.seqlen_offset == seq.shape[1] - 1
    _, ref_state = lm(seq[:, :-1])
    assert out.state.allclose(ref_state, rtol=1e-9, atol=1e-10)


def test_top_k_1_and_tiny_top_p_equal_greedy(lm):
    ids = _ids(4, 5)
    greedy = generate(lm, ids, max_new_tokens=10, temperature=0)
    for kw in (dict(top_k=1), dict(top_k=1, temperature=1.7, seed=3), dict(top_p=1e-6), dict(top_p=1e-6, seed=9),
               dict(min_p=0.999999, temperature=0.5)):
        out = generate(lm, ids, max_new_tokens=10, **kw)
        assert torch.equal(out.sequences, greedy.sequences), kw
        assert out.state.allclose(greedy.state, rtol=0, atol=0)


def test_temperature_zero_is_greedy_and_sampling_differs(lm):
    ids = _ids(2, 4)
    g = generate(lm, ids, max_new_tokens=12, temperature=0, seed=1)
    g2 = generate(lm, ids, max_new_tokens=12, temperature=0, seed=2)
    assert torch.equal(g.sequences, g2.sequences)  # the seed plays no part in greedy decoding
    s1 = generate(lm, ids, max_new_tokens=12, temperature=2.0, seed=1)
    s2 = generate(lm, ids, max_new_tokens=12, temperature=2.0, seed=2)
    assert not torch.equal(s1.sequences, s2.sequences)
    assert not torch.equal(s1.sequences, g.sequences)


def test_padded_vocab_never_sampled(lm):
    out = generate(lm, _ids(8, 2), max_new_tokens=40, temperature=5.0, seed=0)
    assert int(_new(out, 2).max()) < VOCAB
    assert lm.lm_head.weight.shape[0] > VOCAB  # the head really is padded


# ---------------------------------------------------------------------------------------------- defaults (issue 15)
def _argmax_stepping(lm, ids, n):
    """Independent greedy reference: the chunked forward for the prompt, then ``lm.step`` and argmax per token."""
    with torch.no_grad():
        logits, state = lm(ids)
        tok = logits[:, -1, :VOCAB].argmax(-1)
        out = [tok]
        for _ in range(n - 1):
            logits, state = lm.step(tok, state)
            tok = logits[:, :VOCAB].argmax(-1)
            out.append(tok)
    return torch.cat([ids, torch.stack(out, 1)], 1)


def test_default_is_greedy_and_deterministic(lm):
    ids = _ids(3, 6)
    torch.manual_seed(0)
    a = generate(lm, ids, max_new_tokens=12)
    torch.manual_seed(1)  # the global generator plays no part
    b = lm.generate(ids, max_new_tokens=12)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.equal(a.sequences, generate(lm, ids, max_new_tokens=12, temperature=0).sequences)
    assert torch.equal(a.sequences, _argmax_stepping(lm, ids, 12))
    assert torch.equal(torch.stack(list(lm.stream(ids, max_new_tokens=12)), 1), _new(a, 6))


def test_any_sampling_option_turns_sampling_on(lm):
    """do_sample=None: a sampling option given (even at its neutral value) samples, exactly as do_sample=True."""
    ids = _ids(2, 4)
    greedy = generate(lm, ids, max_new_tokens=12)
    plain = generate(lm, ids, max_new_tokens=12, do_sample=True, seed=5)
    assert not torch.equal(plain.sequences, greedy.sequences)
    for kw in (dict(), dict(temperature=1.0), dict(top_k=0), dict(top_p=1.0), dict(top_p=0.0), dict(top_p=0),
               dict(min_p=0.0), dict(do_sample=True, top_p=0.0)):
        out = generate(lm, ids, max_new_tokens=12, seed=5, **kw)
        assert torch.equal(out.sequences, plain.sequences), kw
    torch.manual_seed(3)  # do_sample=True without a seed: the global generator, as before
    unseeded = generate(lm, ids, max_new_tokens=12, do_sample=True)
    torch.manual_seed(3)
    assert torch.equal(unseeded.sequences, generate(lm, ids, max_new_tokens=12, do_sample=True).sequences)


def test_top_p_zero_means_no_filter():
    logits = torch.randn(4, 40)
    off = G._check_sampling(None, None, None, 0.0, None, None, 1.0, 40)
    assert off == G._check_sampling(None, None, None, 1.0, None, None, 1.0, 40) and off.top_p == 1.0
    assert torch.equal(_process(logits, off, None), logits)  # nothing filtered


def test_do_sample_false_is_greedy_and_warns_about_ignored_options(lm):
    ids = _ids(2, 5)
    greedy = generate(lm, ids, max_new_tokens=8)
    for call in (lambda **k: generate(lm, ids, **k), lambda **k: lm.generate(ids, **k),
                 lambda **k: lm.stream(ids, **k)):
        with pytest.warns(UserWarning, match=r"do_sample=False decodes greedily; ignoring top_k=20, seed=3") as rec:
            out = call(max_new_tokens=8, do_sample=False, top_k=20, seed=3)
        assert rec[0].filename == __file__  # pointed at the caller, not at the library
        seqs = out.sequences if isinstance(out, GenerationOutput) else torch.cat([ids, torch.stack(list(out), 1)], 1)
        assert torch.equal(seqs, greedy.sequences)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored: no warning
        assert torch.equal(generate(lm, ids, max_new_tokens=8, do_sample=False).sequences, greedy.sequences)
        assert torch.equal(generate(lm, ids, max_new_tokens=8, do_sample=False, temperature=0,
                                    repetition_penalty=1.0).sequences, greedy.sequences)
    # repetition_penalty is not a sampling option: it applies to greedy decoding too
    pen = generate(lm, ids, max_new_tokens=8, repetition_penalty=3.0, output_scores=True)
    assert torch.equal(pen.sequences, generate(lm, ids, max_new_tokens=8, do_sample=False,
                                               repetition_penalty=3.0).sequences)
    assert torch.equal(torch.stack([s.argmax(-1) for s in pen.scores], 1), _new(pen, 5))


def test_max_length(lm):
    ids = _ids(2, 5)
    ref = generate(lm, ids, max_new_tokens=7)
    out = generate(lm, ids, max_length=12)
    assert out.sequences.shape == (2, 12) and torch.equal(out.sequences, ref.sequences)
    assert torch.equal(generate(lm, ids, max_length=12, max_new_tokens=7).sequences, ref.sequences)  # agreeing
    assert torch.equal(torch.stack(list(lm.stream(ids, max_length=12)), 1), _new(ref, 5))
    zero = generate(lm, ids, max_length=5)  # as max_new_tokens=0: consumes input_ids[:, :-1]
    assert torch.equal(zero.sequences, ids) and zero.state.seqlen_offset == 4
    # resuming: max_length counts the returned sequences (input_ids + new), not what the state consumed before
    first = generate(lm, ids, max_new_tokens=3)
    rest = generate(lm, first.sequences[:, -1:], state=first.state, max_length=5)
    assert rest.sequences.shape == (2, 5)
    assert torch.equal(torch.cat([first.sequences, rest.sequences[:, 1:]], 1), ref.sequences)
    with pytest.raises(StateError, match=r"expected max_length = len\(input_ids\) \+ max_new_tokens = 5 \+ 2 = 7, "
                                         r"found max_length=12"):
        generate(lm, ids, max_length=12, max_new_tokens=2)


# ---------------------------------------------------------------------------------------------- resuming (issue 15)
def test_resume_with_the_full_sequences_is_refused(lm, tmp_path, monkeypatch):
    ids = _ids(2, 5)
    kw = dict(seed=4, top_k=10)
    out = generate(lm, ids, max_new_tokens=6, **kw)
    rec = out.state.metadata[G._RECORD]
    assert rec["length"] == 11 and rec["batch"] == 2 and rec["seqlen_offset"] == out.state.seqlen_offset == 10
    msg = "expected only the tokens the state has not consumed yet.*pass only the new tokens"
    with pytest.raises(StateError, match=msg):
        generate(lm, out.sequences, state=out.state, max_new_tokens=4, **kw)
    with pytest.raises(StateError, match=msg):
        lm.stream(out.sequences, state=out.state, max_new_tokens=4)
    # the documented resume works, and its state refuses the whole conversation (which ends with its sequences)
    more = generate(lm, out.sequences[:, -1:], state=out.state, max_new_tokens=4, **kw)
    whole = torch.cat([out.sequences, more.sequences[:, 1:]], 1)
    assert torch.equal(whole, generate(lm, ids, max_new_tokens=10, **kw).sequences)
    with pytest.raises(StateError, match=msg):
        generate(lm, whole, state=more.state, max_new_tokens=4)
    # the record is saved with the state: refused in a later session too, and before any work
    save_model_state(out.state, tmp_path / "s.safetensors")
    loaded = load_model_state(tmp_path / "s.safetensors")
    with monkeypatch.context() as m, pytest.raises(StateError, match=msg):
        m.setattr(lm, "forward", lambda *a, **k: pytest.fail("work started"))
        generate(lm, out.sequences, state=loaded, max_new_tokens=4)
    # a closed stream's state is recorded as generate's is
    ts = lm.stream(ids, max_new_tokens=6, **kw)
    for _ in zip(range(3), ts):
        pass
    ts.close()
    assert ts.state.metadata[G._RECORD]["length"] == 8
    with pytest.raises(StateError, match=msg):
        generate(lm, ts.sequences, state=ts.state, max_new_tokens=2)


def test_genuinely_new_tokens_from_a_generated_state_still_work():
    lm64 = _lm(dtype=torch.float64)
    ids = _ids(2, 5)
    out = generate(lm64, ids, max_new_tokens=4)
    turn = _ids(2, 3, seed=9)
    # continuing a conversation: the pending token, then the next turn
    cont = generate(lm64, torch.cat([out.sequences[:, -1:], turn], 1), state=out.state, max_new_tokens=5)
    ref = generate(lm64, torch.cat([out.sequences, turn], 1), max_new_tokens=5)  # the whole text from zeros
    assert torch.equal(torch.cat([out.sequences[:, :-1], cont.sequences], 1), ref.sequences)
    assert cont.state.seqlen_offset == ref.state.seqlen_offset
    assert cont.state.allclose(ref.state, rtol=1e-9, atol=1e-10)
    # input of the same length but other tokens, or the last token alone: no refusal
    other = out.sequences.flip(1)
    assert not torch.equal(other, out.sequences)
    generate(lm64, other, state=out.state, max_new_tokens=1)
    generate(lm64, out.sequences[:, -1:], state=out.state, max_new_tokens=1)
    # the record holds only at its offset: after the state moved on, the same ids are new input again
    _, moved = lm64(out.sequences[:, -1:], state=out.state)
    assert G._RECORD in moved.metadata  # (metadata travels with the state) ...
    generate(lm64, out.sequences, state=moved, max_new_tokens=1)  # ... but no longer applies
    # a state that generate did not return (the forward's) records nothing: feeding its ids again is allowed
    _, fwd = lm64(out.sequences[:, :-1])
    assert G._RECORD not in fwd.metadata
    generate(lm64, out.sequences, state=fwd, max_new_tokens=1)
    # feeding the same tokens again on purpose: drop the record
    state = out.state.clone()
    del state.metadata[G._RECORD]
    generate(lm64, out.sequences, state=state, max_new_tokens=1)


def test_resume_record_bookkeeping(lm):
    ids = _ids(2, 4)
    _, s0 = lm(ids[:, :-1])
    s0.metadata["user"] = 1
    before = dict(s0.metadata)
    out = generate(lm, ids[:, -1:], state=s0, max_new_tokens=5)
    assert s0.metadata == before  # the caller's state is not modified
    assert out.state.metadata["user"] == 1 and out.state.metadata[G._RECORD]["length"] == 6
    ts = lm.stream(out.sequences[:, -1:], state=out.state, max_new_tokens=3)
    next(ts)
    assert G._RECORD not in ts.state.metadata  # mid-stream: the stale record is gone and no new one yet
    list(ts)
    assert ts.state.metadata[G._RECORD]["length"] == 4 and ts.state.metadata["user"] == 1
    assert ts.state is ts.state  # computed once
    # nothing that could be fed twice: one token, nothing generated
    assert G._RECORD not in generate(lm, ids[:, :1], max_new_tokens=0).state.metadata
    # a stream closed before it started has consumed nothing: no record (its ids are still new input)
    ts = lm.stream(ids, max_new_tokens=3)
    ts.close()
    assert G._RECORD not in ts.state.metadata


# ---------------------------------------------------------------------------------------------- sampling math
def test_exponential_race_draws_from_the_softmax():
    """argmax(p / Exp(1)) is a draw from p: frequencies over many rows within 5 sigma of p."""
    torch.manual_seed(0)
    logits = torch.randn(1, 6, dtype=torch.float64).repeat(40000, 1)
    cfg = _Sampling(1.0, 0, 1.0, 0.0, 1.0, 6)
    tok = _choose(_process(logits, cfg, None), cfg, 123, 7, torch.Generator())
    freq = torch.bincount(tok, minlength=6).double() / tok.numel()
    p = logits[0].softmax(-1)
    sigma = (p * (1 - p) / tok.numel()).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all(), (freq, p)
    # top_k=2 renormalises over the two largest
    cfg2 = _Sampling(1.0, 2, 1.0, 0.0, 1.0, 6)
    tok2 = _choose(_process(logits, cfg2, None), cfg2, 5, 7, torch.Generator())
    top = logits[0].topk(2).indices
    assert set(tok2.unique().tolist()) == set(top.tolist())
    p2 = logits[0, top].softmax(-1)
    f2 = (tok2 == top[0]).double().mean()
    assert abs(f2 - p2[0]) <= 5 * (p2[0] * (1 - p2[0]) / tok2.numel()).sqrt()


def _ref_filter(logits, temperature, top_k, top_p, min_p):
    """Float64 reference of the filters, written from their definitions (sets of kept tokens)."""
    x = logits.double() / temperature
    keep = torch.ones_like(x, dtype=torch.bool)
    for b in range(x.shape[0]):
        order = x[b].argsort(descending=True)
        if top_k:
            keep[b, order[top_k:]] = False
        xb = x[b].masked_fill(~keep[b], float("-inf"))
        p = xb.softmax(-1)
        if top_p < 1:
            mass, kept = 0.0, []
            for i in xb.argsort(descending=True).tolist():  # smallest most-likely set reaching top_p
                kept.append(i)
                mass += float(p[i])
                if mass >= top_p:
                    break
            mask = torch.zeros_like(keep[b])
            mask[kept] = True
            keep[b] &= mask
        xb = x[b].masked_fill(~keep[b], float("-inf"))
        if min_p:
            p = xb.softmax(-1)
            keep[b] &= p >= min_p * p.max()
    return keep


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 5, 1.0, 0.0), (0.7, 0, 0.5, 0.0), (1.3, 8, 0.8, 0.0), (1.0, 0, 1.0, 0.2), (0.9, 6, 0.9, 0.1)])
def test_filters_match_their_definitions(temperature, top_k, top_p, min_p):
    torch.manual_seed(1)
    logits = torch.randn(16, 40) * 2
    x = _process(logits, _Sampling(temperature, top_k, top_p, min_p, 1.0, 40), None)
    assert x.dtype == torch.float32
    assert torch.equal(torch.isfinite(x), _ref_filter(logits, temperature, top_k, top_p, min_p))
    fin = torch.isfinite(x)
    torch.testing.assert_close(x[fin], (logits.double() / temperature)[fin].float())


@pytest.mark.upstream
def test_filters_agree_with_upstream(upstream):
    from mamba_ssm.utils.generation import modify_logits_for_top_k_filtering, modify_logits_for_top_p_filtering

    torch.manual_seed(2)
    logits = torch.randn(8, 50)
    for k in (1, 3, 17):
        ref = logits.clone()
        modify_logits_for_top_k_filtering(ref, k)
        ours = _process(logits, _Sampling(1.0, k, 1.0, 0.0, 1.0, 50), None)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))
    for p in (0.1, 0.5, 0.95):
        ref = logits.clone()
        modify_logits_for_top_p_filtering(ref, p)
        ours = _process(logits, _Sampling(1.0, 0, p, 0.0, 1.0, 50), None)
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref))


def test_repetition_penalty_matches_upstream_formula():
    torch.manual_seed(3)
    logits = torch.randn(3, 20)
    prev = torch.randint(0, 20, (3, 7))
    seen = torch.zeros(3, 20, dtype=torch.bool).scatter_(1, prev, True)
    ours = _process(logits, _Sampling(0.0, 0, 1.0, 0.0, 1.8, 20), seen)
    score = logits.gather(1, prev)  # upstream's definition (mamba_ssm.utils.generation)
    ref = logits.clone().scatter_(1, prev, torch.where(score < 0, score * 1.8, score / 1.8))
    assert torch.equal(ours, ref)


def test_step_seed_depends_on_seed_and_position():
    vals = {step_seed(s, p) for s in range(4) for p in range(50)}
    assert len(vals) == 200 and all(0 <= v < 2 ** 63 for v in vals)


# ---------------------------------------------------------------------------------------------- stream
@pytest.mark.parametrize("kw", [dict(temperature=0), dict(seed=4, top_k=7), dict(seed=[1, 2, 3], top_p=0.8)])
def test_stream_equals_generate(lm, kw):
    ids = _ids(3, 5)
    ref = generate(lm, ids, max_new_tokens=9, output_scores=True, **kw)
    ts = lm.stream(ids, max_new_tokens=9, output_scores=True, **kw)
    toks = []
    for i, t in enumerate(ts):
        assert t.shape == (3,) and t.dtype == torch.long
        toks.append(t)
        assert ts.state.seqlen_offset == 5 + i  # before the token just yielded
    assert torch.equal(torch.stack(toks, 1), _new(ref, 5))
    assert torch.equal(ts.sequences, ref.sequences)
    assert ts.state.allclose(ref.state, rtol=0, atol=0) and ts.state.seqlen_offset == ref.state.seqlen_offset
    assert all(torch.equal(a, b) for a, b in zip(ts.scores, ref.scores))


def test_stream_closed_early_keeps_a_resumable_state(lm):
    ids = _ids(2, 4)
    ref = generate(lm, ids, max_new_tokens=10, temperature=0)
    ts = stream(lm, ids, max_new_tokens=10, temperature=0)
    for i, _ in zip(range(4), ts):
        pass
    ts.close()
    assert torch.equal(ts.sequences, ref.sequences[:, :8])
    rest = generate(lm, ts.sequences[:, -1:], state=ts.state, max_new_tokens=6, temperature=0)
    assert torch.equal(torch.cat([ts.sequences, rest.sequences[:, 1:]], 1), ref.sequences)


def test_lm_methods_delegate(lm):
    ids = _ids(2, 3)
    a = lm.generate(ids, max_new_tokens=5, seed=1)
    b = generate(lm, ids, max_new_tokens=5, seed=1)
    assert isinstance(a, GenerationOutput) and torch.equal(a.sequences, b.sequences)


# ---------------------------------------------------------------------------------------------- resume law
@given(n=st.integers(1, 9), kind=st.sampled_from(["greedy", "seeded", "row_seeds", "penalty"]))
def test_resume_law_in_process(lm, n, kind):
    kw = {"greedy": dict(temperature=0), "seeded": dict(seed=11, top_k=12, temperature=1.3),
          "row_seeds": dict(seed=[5, 6], min_p=0.05), "penalty": dict(seed=2, repetition_penalty=1.6)}[kind]
    ids = _ids(2, 6, seed=n)
    total = 10
    one = generate(lm, ids, max_new_tokens=total, **kw)
    first = generate(lm, ids, max_new_tokens=n, **kw)
    ctx = first.sequences[:, :-1] if kind == "penalty" else None
    second = generate(lm, first.sequences[:, -1:], state=first.state, max_new_tokens=total - n, context_ids=ctx,
                      **kw)
    assert torch.equal(torch.cat([first.sequences, second.sequences[:, 1:]], 1), one.sequences)
    assert second.state.allclose(one.state, rtol=0, atol=0)
    assert second.state.seqlen_offset == one.state.seqlen_offset


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from mamba_state import load_model_state
    from mamba_state.adapters import StatefulMambaLM
    model_dir, state_dir, last, m = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    lm = StatefulMambaLM.from_pretrained(model_dir).eval()
    res = {}
    for name, kw in (("greedy", dict(temperature=0)), ("seeded", dict(seed=77, top_p=0.9, temperature=1.2))):
        state = load_model_state(f"{state_dir}/{name}.safetensors")
        out = lm.generate(torch.tensor(last[name]), state=state, max_new_tokens=m, **kw)
        res[name] = out.sequences[:, 1:].tolist()
    print(json.dumps(res))
""")


def test_resume_law_across_processes(lm, tmp_path):
    """Generate N, save the state, load it in a fresh process, generate M more == N+M in one call."""
    lm.save_pretrained(tmp_path / "model")
    ids, n, m = _ids(2, 5), 4, 7
    last, expect = {}, {}
    for name, kw in (("greedy", dict(temperature=0)), ("seeded", dict(seed=77, top_p=0.9, temperature=1.2))):
        one = generate(lm, ids, max_new_tokens=n + m, **kw)
        first = generate(lm, ids, max_new_tokens=n, **kw)
        save_model_state(first.state, tmp_path / f"{name}.safetensors")
        assert load_model_state(tmp_path / f"{name}.safetensors").allclose(first.state, rtol=0, atol=0)
        last[name] = first.sequences[:, -1:].tolist()
        expect[name] = _new(one, 5 + n).tolist()
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "model"), str(tmp_path), json.dumps(last),
                           str(m)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expect


# ---------------------------------------------------------------------------------------------- EOS
def test_per_row_eos_padding_and_early_stop(lm):
    ids = _ids(3, 4, seed=5)
    free = _new(generate(lm, ids, max_new_tokens=16, temperature=0), 4)
    # EOS ids: one token from rows 0 and 1 each, so that those rows finish at different steps
    eos = sorted({int(free[0, 2]), int(free[1, 5])})
    pad = next(t for t in range(VOCAB) if t not in eos)
    first_hit = []
    for r in range(3):
        hits = [i for i in range(16) if int(free[r, i]) in eos]
        first_hit.append(hits[0] if hits else None)
    out = generate(lm, ids, max_new_tokens=16, temperature=0, eos_token_id=eos, pad_token_id=pad)
    new = _new(out, 4)
    done_all = all(h is not None for h in first_hit)
    assert new.shape[1] == (max(first_hit) + 1 if done_all else 16)
    for r, h in enumerate(first_hit):
        stop = new.shape[1] if h is None else h + 1
        assert torch.equal(new[r, :stop], free[r, :stop])
        assert (new[r, stop:] == pad).all()
    assert out.state.seqlen_offset == 4 + new.shape[1] - 1
    # default pad id: the first EOS id
    out2 = generate(lm, ids, max_new_tokens=16, temperature=0, eos_token_id=eos)
    for r, h in enumerate(first_hit):
        if h is not None:
            assert (_new(out2, 4)[r, h + 1:] == eos[0]).all()


def test_all_rows_eos_stops_at_once(lm):
    ids = _ids(2, 3)
    free = _new(generate(lm, ids, max_new_tokens=3, temperature=0), 3)
    out = generate(lm, ids, max_new_tokens=20, temperature=0, eos_token_id=free[:, 0].tolist())
    assert out.sequences.shape[1] == 4


# ---------------------------------------------------------------------------------------------- branching
def test_branching_equals_independent_calls(lm):
    """Best-of-n: prefill once, expand the state n ways, one row-seeded batch == n separate calls."""
    prompt, n = _ids(1, 8), 4
    pre = generate(lm, prompt, max_new_tokens=0)
    assert torch.equal(pre.sequences, prompt) and pre.state.seqlen_offset == 7
    seeds = [10, 20, 30, 40]
    branched = generate(lm, prompt[:, -1:].expand(n, 1), state=MambaModelState.cat([pre.state] * n),
                        max_new_tokens=12, seed=seeds, top_k=10)
    for i, s in enumerate(seeds):
        alone = generate(lm, prompt[:, -1:], state=pre.state.clone(), max_new_tokens=12, seed=[s], top_k=10)
        assert torch.equal(alone.sequences, branched.sequences[i:i + 1])
        assert alone.state.allclose(branched.state.select(slice(i, i + 1)), rtol=1e-5, atol=1e-6)
    assert len({tuple(r) for r in branched.sequences.tolist()}) > 1  # the branches really differ


# ---------------------------------------------------------------------------------------------- misc semantics
def test_scores_shape_and_content(lm):
    out = generate(lm, _ids(3, 4), max_new_tokens=6, top_k=5, seed=0, output_scores=True)
    assert len(out.scores) == 6
    for s, tok in zip(out.scores, _new(out, 4).T):
        assert s.shape == (3, VOCAB) and s.dtype == torch.float32
        assert (torch.isfinite(s).sum(-1) == 5).all()
        assert torch.isfinite(s.gather(1, tok[:, None])).all()  # chosen tokens survived the filter
    assert generate(lm, _ids(3, 4), max_new_tokens=2, seed=0).scores is None


def test_zero_new_tokens_and_chunk_size(lm):
    ids = _ids(2, 9)
    out = generate(lm, ids, max_new_tokens=0)
    _, ref = lm(ids[:, :-1])
    assert torch.equal(out.sequences, ids) and out.state.seqlen_offset == 8
    assert out.state.allclose(ref, rtol=1e-5, atol=1e-6)
    a = generate(lm, ids, max_new_tokens=6, temperature=0, prefill_chunk_size=2)
    b = generate(lm, ids, max_new_tokens=6, temperature=0)
    assert torch.equal(a.sequences, b.sequences) and a.state.allclose(b.state, rtol=1e-5, atol=1e-6)
    one = generate(lm, ids[:, :1], max_new_tokens=0)  # one token, nothing to generate: nothing consumed
    assert one.state.seqlen_offset == 0 and torch.equal(one.sequences, ids[:, :1])


def test_input_state_is_not_modified(lm):
    ids = _ids(2, 5)
    _, state = lm(ids)
    before = state.clone()
    generate(lm, ids[:, -1:], state=state, max_new_tokens=5, seed=1)
    assert state.allclose(before, rtol=0, atol=0) and state.seqlen_offset == before.seqlen_offset


def test_mamba2_model_generates_and_resumes():
    lm = _lm(ssm_cfg={"layer": "Mamba2", "d_state": 8, "headdim": 8, "chunk_size": 4}, d_model=16)
    ids = _ids(2, 6)
    one = generate(lm, ids, max_new_tokens=6, temperature=0)
    first = generate(lm, ids, max_new_tokens=2, temperature=0)
    rest = generate(lm, first.sequences[:, -1:], state=first.state, max_new_tokens=4, temperature=0)
    assert torch.equal(torch.cat([first.sequences, rest.sequences[:, 1:]], 1), one.sequences)


# ---------------------------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kw,words", [
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(top_p=-0.1), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(min_p=1.0), "min_p"), (dict(min_p=-0.1), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(eos_token_id=-3), "eos_token_id"), (dict(eos_token_id=VOCAB), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"), (dict(seed="x"), "seed"), (dict(seed=[1, 2, 3]), "seed"),
    (dict(prefill_chunk_size=0), "prefill_chunk_size"), (dict(context_ids=torch.zeros(3, 2, dtype=torch.long)),
                                                           "context_ids"),
    (dict(do_sample="yes"), "do_sample"), (dict(do_sample=1), "do_sample"),
    (dict(do_sample=True, temperature=0), "temperature with do_sample=True"),
    (dict(max_new_tokens=None), "max_new_tokens.*or max_length"),
    (dict(max_length=2), "max_length: expected an int >= 3"),
    (dict(max_new_tokens=None, max_length=4.0), "max_length"),
    (dict(max_length=7), r"max_length = len\(input_ids\) \+ max_new_tokens = 3 \+ 3 = 6, found max_length=7"),
])
def test_bad_arguments_raise_before_any_work(lm, monkeypatch, kw, words):
    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    kw = {"max_new_tokens": 3, **kw}
    monkeypatch.setattr(lm, "step", boom)
    monkeypatch.setattr(lm, "forward", boom)
    with pytest.raises(StateError, match=words) as info:
        generate(lm, _ids(2, 3), **kw)
    assert "expected" in str(info.value) and "found" in str(info.value)
    with pytest.raises(StateError, match=words):
        stream(lm, _ids(2, 3), **kw)


def test_bad_state_and_input(lm):
    with pytest.raises(StateShapeError, match="batch size: expected 2.*found 3"):
        generate(lm, _ids(2, 3), state=lm.new_state(3), max_new_tokens=2)
    with pytest.raises(StateError, match="state"):
        generate(lm, _ids(2, 3), state="nope", max_new_tokens=2)
    with pytest.raises(StateShapeError, match="input_ids"):
        generate(lm, torch.zeros(2, 3), max_new_tokens=2)
    with pytest.raises(StateError, match="input_ids device: expected cpu"):
        generate(lm, torch.zeros(2, 3, dtype=torch.long, device="meta"), max_new_tokens=2)
    other = _lm(n_layer=3)
    with pytest.raises(StateError, match="layers"):
        generate(lm, _ids(1, 2), state=other.new_state(1), max_new_tokens=2)


# ---------------------------------------------------------------------------------------------- graph bookkeeping
class _EagerGraph(G._GraphStep):
    """A CPU stand-in for the CUDA graph: same static buffers, 'replay' runs the eager step into them."""

    captures = 0

    def _capture(self, lm, warmups):
        self._lm = weakref.ref(lm)  # as the real graph: the cache must not keep the model alive
        self._step_into_state(lm)  # a warm-up step, as the real capture runs (errors surface here)
        self.logits = torch.empty(self.ids.shape[0], lm.lm_head.weight.shape[0])
        type(self).captures += 1

    def _replay(self):
        self.logits.copy_(self._step_into_state(self._lm()))


@pytest.fixture
def fake_graphs(monkeypatch):
    monkeypatch.setattr(G, "_graphs_supported", lambda device: True)
    monkeypatch.setattr(G, "_GraphStep", _EagerGraph)
    _EagerGraph.captures = 0
    yield
    G.clear_graph_cache()


def test_graph_path_bookkeeping(lm, fake_graphs):
    """Static-buffer decoding (as on CUDA) == eager: tokens, states, offsets, mid-stream states, reuse, release."""
    ids = _ids(3, 5)
    for kw in (dict(temperature=0), dict(seed=8, top_k=9)):
        eager = generate(lm, ids, max_new_tokens=9, cuda_graph=False, **kw)
        graph = generate(lm, ids, max_new_tokens=9, **kw)
        assert torch.equal(graph.sequences, eager.sequences)
        assert graph.state.allclose(eager.state, rtol=0, atol=0)
        assert graph.state.seqlen_offset == eager.state.seqlen_offset
        one_tok = generate(lm, ids[:, -1:], state=lm(ids[:, :-1])[1], max_new_tokens=4, **kw)  # 1-token path
        ref = generate(lm, ids[:, -1:], state=lm(ids[:, :-1])[1], max_new_tokens=4, cuda_graph=False, **kw)
        assert torch.equal(one_tok.sequences, ref.sequences)
    assert _EagerGraph.captures == 1  # one batch size, one capture
    g = next(iter(G._GRAPHS[lm].values()))
    assert not g.busy
    assert all(graph.state[i].ssm_state.data_ptr() != s.ssm_state.data_ptr() for i, s in g.state.items())
    # mid-stream states are copies at the right offset, and resuming from one continues exactly
    ts = stream(lm, ids, max_new_tokens=9, temperature=0)
    toks = [next(ts) for _ in range(4)]
    mid = ts.state
    assert mid.seqlen_offset == 5 + 3 and g.busy
    rest = generate(lm, torch.stack(toks, 1)[:, -1:], state=mid, max_new_tokens=5, temperature=0, cuda_graph=False)
    ts.close()
    assert not g.busy
    assert torch.equal(torch.cat([ids, torch.stack(toks, 1), rest.sequences[:, 1:]], 1),
                       generate(lm, ids, max_new_tokens=9, temperature=0).sequences)
    # two live streams of one batch size: the second decodes eagerly, both right
    a, b = stream(lm, ids, max_new_tokens=6, temperature=0), stream(lm, _ids(3, 5, seed=4), max_new_tokens=6, seed=1)
    for _ in zip(a, b):
        pass
    b.close()
    assert torch.equal(a.sequences, generate(lm, ids, max_new_tokens=6, temperature=0, cuda_graph=False).sequences)
    assert torch.equal(b.sequences, generate(lm, _ids(3, 5, seed=4), max_new_tokens=6, seed=1,
                                             cuda_graph=False).sequences)
    assert not g.busy and _EagerGraph.captures == 1


def test_failed_capture_falls_back_to_eager(lm, monkeypatch):
    class Broken(G._GraphStep):
        def _capture(self, lm, warmups):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(G, "_graphs_supported", lambda device: True)
    monkeypatch.setattr(G, "_GraphStep", Broken)
    ids = _ids(2, 4)
    with pytest.warns(RuntimeWarning, match="capture of the model decode step failed"):
        out = generate(lm, ids, max_new_tokens=5, temperature=0)
    assert torch.equal(out.sequences, generate(lm, ids, max_new_tokens=5, temperature=0, cuda_graph=False).sequences)
    G.clear_graph_cache()


def test_branching_example_runs(capsys):
    import runpy
    from pathlib import Path

    mod = runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "branching.py"))
    assert mod["main"](["--n", "3", "--new", "5", "--prompt", "16"]) == 0
    assert "re-generated alone: identical" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- fused decode step
# (its Triton kernels run in Triton's interpreter here: TRITON_INTERPRET=1 is set by conftest on CPU machines)
@pytest.mark.parametrize("over", [dict(), dict(residual_in_fp32=False),
                                  dict(ssm_cfg={"d_state": 5, "d_conv": 3, "conv_bias": False}, d_model=24)])
def test_fused_step_matches_model_step(over):
    from mamba_state.fused_decode import FusedDecoder, fused_unsupported_reason

    lm = _lm(**over)
    with torch.no_grad():
        _, state = lm(_ids(3, 6))
        assert fused_unsupported_reason(lm, state) is None
        fused = FusedDecoder(lm)
        own = fused.own(state)
        ids = _ids(3, 1, seed=2)[:, 0]
        for _ in range(4):
            ref, state = lm.step(ids, state)
            got = fused.step(ids, own)
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
            for i in state.layer_indices:
                torch.testing.assert_close(own[i].conv_state, state[i].conv_state, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(own[i].ssm_state, state[i].ssm_state, rtol=1e-5, atol=1e-6)
            ids = ref.argmax(-1)


def test_fused_step_bf16_within_rounding():
    from mamba_state.fused_decode import FusedDecoder

    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(_cfg(d_model=48, ssm_cfg={"d_state": 16}), dtype=torch.bfloat16).eval()
    with torch.no_grad():
        _, state = lm(_ids(2, 5))
        fused = FusedDecoder(lm)
        own = fused.own(state)
        ids = _ids(2, 1)[:, 0]
        for _ in range(3):
            ref, state = lm.step(ids, state)
            got = fused.step(ids, own)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), ref.float(), rtol=2e-2, atol=1e-2)
            ids = ref.argmax(-1)


def test_generate_with_fused_step(lm, fake_graphs):
    ids = _ids(2, 5)
    ref = generate(lm, ids, max_new_tokens=6, temperature=0, fused_step=False, cuda_graph=False)
    _, state = lm(ids[:, :-1])
    before = state.clone()
    for graph in (False, True):
        out = generate(lm, ids, max_new_tokens=6, temperature=0, fused_step=True, cuda_graph=graph)
        assert torch.equal(out.sequences, ref.sequences)
        assert out.state.allclose(ref.state, rtol=1e-5, atol=1e-6)
        assert out.state.seqlen_offset == ref.state.seqlen_offset
        # one-token input from a caller's state: decoded in place on a private copy, the caller's state untouched
        one = generate(lm, ids[:, -1:], state=state, max_new_tokens=6, temperature=0, fused_step=True,
                       cuda_graph=graph)
        assert torch.equal(one.sequences[:, 1:], ref.sequences[:, 5:])
        assert state.allclose(before, rtol=0, atol=0)
        # resume law within the fused path, seeded
        kw = dict(seed=3, top_k=10, fused_step=True, cuda_graph=graph)
        whole = generate(lm, ids, max_new_tokens=7, **kw)
        first = generate(lm, ids, max_new_tokens=3, **kw)
        rest = generate(lm, first.sequences[:, -1:], state=first.state, max_new_tokens=4, **kw)
        assert torch.equal(torch.cat([first.sequences, rest.sequences[:, 1:]], 1), whole.sequences)
    assert any(k[-1] for k in G._GRAPHS[lm])  # a fused graph was built


def test_fused_step_refusals(lm):
    with pytest.raises(StateError, match="fused_step=True: expected .* found that .*fused_add_norm"):
        generate(_lm(fused_add_norm=False), _ids(1, 2), max_new_tokens=2, fused_step=True)
    with pytest.raises(StateError, match="fused_step: expected None, True or False"):
        generate(lm, _ids(1, 2), max_new_tokens=2, fused_step="yes")
    # auto: not on CPU tensors (the model step is used there)
    assert G._fused_decoder(lm, None, _ids(1, 2), None) is None


def test_graph_cache_does_not_keep_the_model_alive(fake_graphs):
    import gc

    model = _lm()
    generate(model, _ids(1, 3), max_new_tokens=3, temperature=0, fused_step=True)
    generate(model, _ids(1, 3), max_new_tokens=3, temperature=0)
    assert len(G._GRAPHS[model]) == 2
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_graph_constants_follow_weight_changes_between_calls(fake_graphs):
    model = _lm()
    ids = _ids(2, 4)
    kw = dict(max_new_tokens=5, temperature=0, fused_step=True, output_scores=True)
    before = generate(model, ids, **kw)  # captures, with A, D, dt_bias as static buffers
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.A_log.mul_(1.5)
            layer.mixer.D.add_(0.25)
    after = generate(model, ids, **kw)
    fresh = generate(model, ids, cuda_graph=False, **kw)
    assert _EagerGraph.captures == 1
    assert all(torch.equal(a, b) for a, b in zip(after.scores, fresh.scores))
    assert not torch.equal(after.scores[-1], before.scores[-1])


@pytest.mark.parametrize("graph", [False, True])
def test_auto_fused_step_that_fails_falls_back_to_model_step(lm, fake_graphs, monkeypatch, graph):
    from mamba_state.fused_decode import FusedDecoder

    def broken(self, ids, state, consts=None):
        raise RuntimeError("no kernel image is available")

    ids = _ids(2, 4)
    ref = generate(lm, ids, max_new_tokens=5, temperature=0, fused_step=False, cuda_graph=False)
    monkeypatch.setattr(FusedDecoder, "step", broken)
    monkeypatch.setattr(G, "_fused_decoder", lambda lm_, state, ids_, flag: FusedDecoder(lm_))  # as on CUDA
    with pytest.warns(RuntimeWarning, match="fused decode step failed"):
        out = generate(lm, ids, max_new_tokens=5, temperature=0, cuda_graph=graph)
    assert torch.equal(out.sequences, ref.sequences) and out.state.allclose(ref.state, rtol=0, atol=0)
    if graph:
        assert all(not g.fused for g in G._GRAPHS[lm].values() if g is not None)
    with pytest.raises(RuntimeError, match="no kernel image"):  # asked for explicitly: no silent fallback
        generate(lm, ids, max_new_tokens=5, temperature=0, cuda_graph=False, fused_step=True)


def test_lm_methods_show_the_full_signatures():
    """``lm.generate`` / ``lm.stream`` spell out every parameter (help() and IDEs see them) with the defaults of
    the module functions they call, so the two cannot drift apart."""
    import inspect

    import mamba_state.generation.decode as G
    from mamba_state.adapters import StatefulMambaLM

    for method, fn in ((StatefulMambaLM.generate, G.generate), (StatefulMambaLM.stream, G.stream)):
        ours = list(inspect.signature(method).parameters.values())[1:]
        theirs = list(inspect.signature(fn).parameters.values())[1:]
        assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]


# ---------------------------------------------------------------------------------------------- SamplingConfig

@pytest.mark.parametrize("kw,words", [
    (dict(do_sample="yes"), "do_sample"), (dict(do_sample=1), "do_sample"),
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="1"), "temperature"), (dict(top_k=-1), "top_k"), (dict(top_k=2.0), "top_k"),
    (dict(top_p=-0.1), "top_p"), (dict(top_p=1.5), "top_p"), (dict(min_p=1.0), "min_p"), (dict(min_p=-0.1), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=None), "repetition_penalty"),
    (dict(do_sample=True, temperature=0), "temperature with do_sample=True"),
])
def test_sampling_config_is_checked_when_made(kw, words):
    with pytest.raises(StateError, match=words) as info:
        SamplingConfig(**kw)
    assert "expected" in str(info.value) and "found" in str(info.value)


def test_sampling_config_is_frozen_and_compares_by_value():
    import dataclasses

    cfg = SamplingConfig(temperature=0.8, top_k=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.temperature = 2.0  # type: ignore[misc]
    assert cfg == SamplingConfig(temperature=0.8, top_k=5) and hash(cfg) == hash(SamplingConfig(temperature=0.8,
                                                                                              top_k=5))
    assert dataclasses.replace(cfg, top_p=0.9).top_p == 0.9
    with pytest.raises(StateError, match="top_p"):  # a changed copy is checked too
        dataclasses.replace(cfg, top_p=2.0)
    import mamba_state as ms

    assert ms.SamplingConfig is SamplingConfig and "SamplingConfig" in ms.__all__


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.7, top_k=6, top_p=0.9, min_p=0.05),
                                dict(do_sample=True, repetition_penalty=1.4), dict(temperature=0),
                                dict(repetition_penalty=1.5), dict(do_sample=False, top_k=3)])
def test_sampling_config_decodes_as_the_keywords(lm, kw):
    ids = _ids(2, 5)
    cfg = SamplingConfig(**kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # do_sample=False warns about top_k, both ways
        want = generate(lm, ids, max_new_tokens=10, seed=11, output_scores=True, **kw)
        for got in (generate(lm, ids, max_new_tokens=10, seed=11, output_scores=True, sampling=cfg),
                    lm.generate(ids, max_new_tokens=10, seed=11, output_scores=True, sampling=cfg)):
            assert torch.equal(got.sequences, want.sequences), kw
            assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores))
        ts = lm.stream(ids, max_new_tokens=10, seed=11, sampling=cfg)
        assert torch.equal(torch.stack(list(ts), 1), _new(want, 5))
        ts = stream(lm, ids, max_new_tokens=10, seed=11, sampling=cfg)
        assert torch.equal(torch.stack(list(ts), 1), _new(want, 5))
    # without a seed the same rule holds: an empty config is greedy, as no keyword is
    assert torch.equal(generate(lm, ids, max_new_tokens=6, sampling=SamplingConfig()).sequences,
                       generate(lm, ids, max_new_tokens=6).sequences)


def test_sampling_config_and_a_disagreeing_keyword_raise_before_any_work(lm, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    ids = _ids(2, 3)
    cfg = SamplingConfig(temperature=0.8, top_k=4, repetition_penalty=1.2)
    ok = generate(lm, ids, max_new_tokens=3, seed=2, sampling=cfg)
    # keywords at their defaults, or equal to the config's value, are not a conflict
    same = generate(lm, ids, max_new_tokens=3, seed=2, sampling=cfg, temperature=0.8, top_k=4, repetition_penalty=1.2)
    assert torch.equal(same.sequences, ok.sequences)
    monkeypatch.setattr(lm, "step", boom)
    monkeypatch.setattr(lm, "forward", boom)
    for kw, words in ((dict(temperature=0.5), r"temperature=0\.5 and sampling\.temperature=0\.8"),
                      (dict(top_p=0.9), r"top_p=0\.9 and sampling\.top_p=None"),
                      (dict(do_sample=False), "do_sample=False and sampling.do_sample=None"),
                      (dict(repetition_penalty=1.0 + 1e-9), "repetition_penalty"),
                      (dict(top_k=True), "top_k=True")):
        for call in (lambda **k: generate(lm, ids, **k), lambda **k: stream(lm, ids, **k),
                     lambda **k: lm.generate(ids, **k), lambda **k: lm.stream(ids, **k)):
            with pytest.raises(StateError, match=words) as info:
                call(max_new_tokens=3, sampling=cfg, **kw)
            assert "given twice" in str(info.value) and "expected" in str(info.value) and "found" in str(info.value)
    with pytest.raises(StateError, match="sampling: expected None or a mamba_state.SamplingConfig, found dict"):
        generate(lm, ids, max_new_tokens=3, sampling={"temperature": 0.8})


def test_sampling_config_do_sample_false_warns_about_what_it_ignores(lm):
    ids = _ids(1, 4)
    with pytest.warns(UserWarning, match=r"ignoring top_k=3, seed=1") as rec:
        out = generate(lm, ids, max_new_tokens=4, seed=1, sampling=SamplingConfig(do_sample=False, top_k=3))
    assert rec[0].filename == __file__  # pointed at the caller, not at the library
    assert torch.equal(out.sequences, generate(lm, ids, max_new_tokens=4).sequences)


def test_the_sampling_keywords_are_the_fields_of_sampling_config():
    """One list of sampling options: the keywords of generate / stream (and so of the LM methods, see
    test_lm_methods_show_the_full_signatures) named like SamplingConfig's fields have its defaults, and each
    option of the config is a keyword."""
    import dataclasses
    import inspect

    fields = {f.name: f.default for f in dataclasses.fields(SamplingConfig)}
    for fn in (G.generate, G.stream):
        params = inspect.signature(fn).parameters
        assert {k: params[k].default for k in fields if k in params} == fields
        assert params["sampling"].default is None


def test_lm_methods_forward_every_argument(lm, monkeypatch):
    import inspect

    import mamba_state.generation as generation

    for name in ("generate", "stream"):
        seen = {}

        def record(*args, **kwargs):
            seen.update(args=args, kwargs=kwargs)

        monkeypatch.setattr(generation, name, record)
        params = list(inspect.signature(getattr(G, name)).parameters)[3:]  # after lm, input_ids, state
        values = {p: object() for p in params}  # a distinct value per keyword
        ids, state = object(), object()
        getattr(lm, name)(ids, state, **values)
        assert seen["args"] == (lm, ids, state) and seen["kwargs"] == values, name
