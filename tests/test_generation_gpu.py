"""Generation on CUDA: the CUDA-graph decode step gives the same tokens, scores and states as the eager step;
the graph is captured once per batch size and reused; the resume law holds on the GPU (in process, and
through a state file read by a fresh process). Run on a GPU machine: ``pytest -m gpu tests/test_generation_gpu.py``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from mamba_state import load_model_state, save_model_state
from mamba_state.adapters import StatefulMambaLM
from mamba_state.generation import decode as G
from mamba_state.state import MambaModelState

pytestmark = pytest.mark.gpu

VOCAB = 101


def _cfg():
    return dict(d_model=64, n_layer=3, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 16}, rms_norm=True,
                fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)


def _lm(dtype):
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(_cfg(), device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight", ".D")):
                p.uniform_(0.5, 1.5)
    return lm


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def lm(request):
    model = _lm(request.param)
    yield model
    G.clear_graph_cache(model)


def _ids(batch, seqlen, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seqlen), generator=g).cuda()


def _graphs(lm):
    return [g for g in G._GRAPHS.get(lm, {}).values() if g is not None]


KINDS = {"greedy": dict(temperature=0), "seeded": dict(seed=123, top_k=40, top_p=0.95, temperature=0.9),
         "row_seeds": None}


@pytest.mark.parametrize("fused", [None, False], ids=["fused", "model_step"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", list(KINDS))
def test_graph_equals_eager(lm, batch, kind, fused):
    kw = dict(KINDS[kind]) if kind != "row_seeds" else dict(seed=list(range(7, 7 + batch)), min_p=0.02)
    kw["fused_step"] = fused
    ids = _ids(batch, 37)
    eager = G.generate(lm, ids, max_new_tokens=24, cuda_graph=False, output_scores=True, **kw)
    graph = G.generate(lm, ids, max_new_tokens=24, cuda_graph=True, output_scores=True, **kw)
    assert any(g.ids.shape[0] == batch and g.fused == (fused is None) for g in _graphs(lm)), \
        "the CUDA graph was not captured"
    assert torch.equal(graph.sequences, eager.sequences)
    # the same kernels run with and without the graph: expected bit-identical, checked to float32 rounding
    for a, b in zip(graph.scores, eager.scores):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert graph.state.allclose(eager.state, rtol=1e-6, atol=1e-7)
    assert graph.state.seqlen_offset == eager.state.seqlen_offset == 37 + 24 - 1
    # the returned state is a copy, not the graph's static buffers
    for g in _graphs(lm):
        for i, s in g.state.items():
            assert s.ssm_state.data_ptr() != graph.state[i].ssm_state.data_ptr()


def test_fused_step_is_the_default_on_cuda_and_matches_model_step(lm):
    from mamba_state.fused_decode import FusedDecoder

    assert G._fused_decoder(lm, None, _ids(1, 1), None) is not None
    with torch.no_grad():
        _, state = lm(_ids(4, 30))
        fused = FusedDecoder(lm)
        own = fused.own(state)
        ids = _ids(4, 1, seed=5)[:, 0]
        fp32 = lm.lm_head.weight.dtype == torch.float32
        tol = dict(rtol=1e-4, atol=1e-4) if fp32 else dict(rtol=5e-2, atol=5e-2)  # bf16: a few units of rounding
        for _ in range(8):
            ref, state = lm.step(ids, state)
            got = fused.step(ids, own)
            torch.testing.assert_close(got.float(), ref.float(), **tol)
            ids = ref.argmax(-1)  # both continue with the same tokens
        for i in state.layer_indices:
            rel = (own[i].ssm_state - state[i].ssm_state).norm() / state[i].ssm_state.norm()
            assert rel < (1e-5 if fp32 else 2e-2), (i, float(rel))


def test_graph_captured_once_per_batch_size(lm):
    ids = _ids(2, 5)
    G.generate(lm, ids, max_new_tokens=3, temperature=0)
    before = {k: v for k, v in G._GRAPHS[lm].items() if v is not None and v.ids.shape[0] == 2}
    assert len(before) == 1
    G.generate(lm, _ids(2, 9, seed=3), max_new_tokens=5, seed=1)
    after = {k: v for k, v in G._GRAPHS[lm].items() if v is not None and v.ids.shape[0] == 2}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert not any(g.busy for g in _graphs(lm))


def test_two_live_streams_share_nothing(lm):
    """A second stream of the same batch size while the first holds the graph: both still give the right tokens."""
    a_ids, b_ids = _ids(2, 6, seed=1), _ids(2, 6, seed=2)
    ref_a = G.generate(lm, a_ids, max_new_tokens=10, temperature=0, cuda_graph=False)
    ref_b = G.generate(lm, b_ids, max_new_tokens=10, temperature=0, cuda_graph=False)
    sa = G.stream(lm, a_ids, max_new_tokens=10, temperature=0)
    sb = G.stream(lm, b_ids, max_new_tokens=10, temperature=0)
    for _ in zip(sa, sb):
        pass
    assert torch.equal(sa.sequences, ref_a.sequences) and torch.equal(sb.sequences, ref_b.sequences)
    assert not any(g.busy for g in _graphs(lm))


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["greedy", "seeded"])
def test_resume_law_on_gpu(lm, batch, kind, tmp_path):
    kw = KINDS[kind]
    ids = _ids(batch, 20)
    one = G.generate(lm, ids, max_new_tokens=30, **kw)
    first = G.generate(lm, ids, max_new_tokens=12, **kw)
    save_model_state(first.state, tmp_path / "s.safetensors")
    loaded = load_model_state(tmp_path / "s.safetensors", device="cuda")
    assert loaded.allclose(first.state, rtol=0, atol=0) and loaded.seqlen_offset == first.state.seqlen_offset
    rest = G.generate(lm, first.sequences[:, -1:], state=loaded, max_new_tokens=18, **kw)
    assert torch.equal(torch.cat([first.sequences, rest.sequences[:, 1:]], 1), one.sequences)
    assert rest.state.allclose(one.state, rtol=0, atol=0)


def test_branching_on_gpu():
    # float32: a batch of 3 and a batch of 1 may run different matmul kernels; in bf16 their rounding can differ by
    # a unit, which could flip a near-tie. The draws themselves are the same by construction (row seeds).
    lm = _lm(torch.float32)
    prompt = _ids(1, 16)
    pre = G.generate(lm, prompt, max_new_tokens=0)
    seeds = [3, 4, 5]
    many = G.generate(lm, prompt[:, -1:].expand(3, 1), state=MambaModelState.cat([pre.state] * 3),
                      max_new_tokens=15, seed=seeds, top_k=20)
    for i, s in enumerate(seeds):
        alone = G.generate(lm, prompt[:, -1:], state=pre.state, max_new_tokens=15, seed=[s], top_k=20)
        assert torch.equal(alone.sequences, many.sequences[i:i + 1])


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from mamba_state import load_model_state
    from mamba_state.adapters import StatefulMambaLM
    model_dir, state_path, last, m = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    lm = StatefulMambaLM.from_pretrained(model_dir, device="cuda", dtype=torch.float32).eval()
    state = load_model_state(state_path, device="cuda")
    out = lm.generate(torch.tensor(last, device="cuda"), state=state, max_new_tokens=m, seed=9, top_p=0.9)
    print(json.dumps(out.sequences[:, 1:].tolist()))
""")


def test_resume_law_across_processes_on_gpu(tmp_path):
    lm = _lm(torch.float32)
    lm.save_pretrained(tmp_path / "model")
    ids = _ids(3, 10)
    one = G.generate(lm, ids, max_new_tokens=20, seed=9, top_p=0.9)
    first = G.generate(lm, ids, max_new_tokens=8, seed=9, top_p=0.9)
    save_model_state(first.state, tmp_path / "s.safetensors")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "model"), str(tmp_path / "s.safetensors"),
                           json.dumps(first.sequences[:, -1:].tolist()), "12"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == one.sequences[:, 18:].tolist()
