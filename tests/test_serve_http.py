"""``mamba-state serve`` as a real process on 127.0.0.1 (issue 19), driven over HTTP with httpx: 32 concurrent
streaming clients (bounded in count and time) whose tokens equal solo ``generate`` calls, 4xx errors naming the
field, /metrics and /health, a session resumed after a restart from the disk tier (with a corrupted entry
dropped at start), and 503 when the queue is full. A tiny model served in float64 on the CPU."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mamba_state.adapters import StatefulMambaLM
from mamba_state.generation import SamplingConfig, generate

from _spawn import free_ports

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

VOCAB = 29
CLIENTS = 32
DEADLINE_S = 120.0  # for all clients together


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = dict(d_model=16, n_layer=2, vocab_size=VOCAB, d_intermediate=0, ssm_cfg={"d_state": 4}, rms_norm=True,
               fused_add_norm=True, residual_in_fp32=True, tie_embeddings=True, pad_vocab_size_multiple=8)
    path = tmp_path_factory.mktemp("model")
    StatefulMambaLM.from_config(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def lm(model_dir):
    return StatefulMambaLM.from_pretrained(model_dir, dtype=torch.float64, state_dtype=torch.float64).eval()


class Server:
    """``python -m mamba_state serve`` in a child process; stopped with SIGTERM (killed if it hangs)."""

    def __init__(self, model_dir: str, cache_dir: str, *extra: str):
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(os.path.join(cache_dir, f"..server-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mamba_state", "serve", "--model", model_dir, "--host", "127.0.0.1", "--port",
             str(self.port), "--device", "cpu", "--dtype", "float64", "--cache-dir", cache_dir, *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"server did not come up (exit {self.proc.returncode}):\n{self.output()}")
            time.sleep(0.2)

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def _solo(lm, prompt, k, body):
    sampling = SamplingConfig(temperature=body.get("temperature"), top_k=body.get("top_k"))
    out = generate(lm, torch.tensor([prompt]), max_new_tokens=k, sampling=sampling, seed=body.get("seed"))
    return out.sequences[0, len(prompt):].tolist()


async def _stream(client, url, body):
    tokens, finish, done, usage = [], None, False, None
    async with client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            choice = chunk["choices"][0]
            tokens += choice["token_ids"]
            if choice["finish_reason"] is not None:
                finish, usage = choice["finish_reason"], chunk["usage"]
    return tokens, finish, done, usage


def _bodies():
    g = torch.Generator().manual_seed(7)
    bodies = []
    for i in range(CLIENTS):
        n = int(torch.randint(1, 12, (1,), generator=g))
        body = {"prompt": torch.randint(0, VOCAB, (n,), generator=g).tolist(), "max_tokens": 6 + i % 11}
        if i % 2:
            body.update(temperature=0.9, top_k=8, seed=1000 + i)
        bodies.append(body)
    return bodies


def test_server_streams_concurrent_clients_errors_metrics_and_restart(model_dir, lm, tmp_path):
    cache_dir = str(tmp_path / "cache")
    os.makedirs(cache_dir)
    server = Server(model_dir, cache_dir, "--max-batch", "16")
    try:
        bodies = _bodies()

        async def drive():
            limits = httpx.Limits(max_connections=CLIENTS)
            async with httpx.AsyncClient(timeout=60, limits=limits) as client:
                return await asyncio.wait_for(asyncio.gather(*(_stream(client, server.url, b) for b in bodies)),
                                              DEADLINE_S)

        t0 = time.monotonic()
        results = asyncio.run(drive())
        assert time.monotonic() - t0 < DEADLINE_S
        for body, (tokens, finish, done, usage) in zip(bodies, results):
            assert done and finish == "length" and len(tokens) == body["max_tokens"]
            assert tokens == _solo(lm, body["prompt"], body["max_tokens"], body), body
            assert usage["completion_tokens"] == body["max_tokens"]
            assert usage["prompt_tokens"] == len(body["prompt"])

        # bad requests: 4xx with a JSON error naming the field; the server keeps serving
        url = server.url + "/v1/completions"
        for body, param in [({"prompt": [1, 99]}, "prompt"), ({"prompt": "text"}, "prompt"),
                            ({"prompt": [1], "max_tokens": 0}, "max_tokens"),
                            ({"prompt": [1], "temperature": "hot"}, "temperature"),
                            ({"prompt": [1], "top_p": 2}, "top_p"), ({"prompt": [1], "stream": "yes"}, "stream"),
                            ({"prompt": [1], "seed": 1.5}, "seed"), ({"prompt": [1], "session_id": "a b"}, "session_id"),
                            ({"prompt": [1], "stop_token_ids": [100]}, "stop_token_ids"), ({}, "prompt")]:
            r = httpx.post(url, json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
        r = httpx.post(url, content=b"{not json", timeout=30)
        assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
        r = httpx.delete(server.url + "/v1/sessions/nobody", timeout=30)
        assert r.status_code == 404 and r.json()["error"]["param"] == "session_id"

        # a session, parked on disk when its response ends
        first = httpx.post(url, json={"prompt": [3, 1, 4, 1], "max_tokens": 5, "session_id": "chat"}, timeout=60).json()
        assert first["session_id"] == "chat" and first["choices"][0]["finish_reason"] == "length"
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert f"mamba_state_requests_total {CLIENTS + 1}" in metrics
        expected_tokens = sum(b["max_tokens"] for b in bodies) + 5
        assert f"mamba_state_generated_tokens_total {expected_tokens}" in metrics
        assert 'mamba_state_cache_bytes{tier="disk"}' in metrics and "# TYPE mamba_state_tokens_per_second gauge" in metrics
        assert "# TYPE mamba_state_prefill_batches_total counter" in metrics
        assert "# TYPE mamba_state_prefill_batch_sequences_total counter" in metrics
        assert httpx.get(server.url + "/health", timeout=30).json()["status"] == "ok"
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.output()  # uvicorn re-raises SIGTERM after its shutdown
        assert "mamba-state serve: stopped after" in server.output(), server.output()

    # corrupt one prefix entry while the server is down: the restarted server drops it and says so
    from mamba_state.cache import disk

    victims = [p for p in disk.list_entries(cache_dir) if disk.read_record(p).kind == "prefix"]
    with open(victims[0], "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0x55]))

    server = Server(model_dir, cache_dir, "--max-batch", "1", "--max-queue", "1")
    try:
        assert "dropped cache entry" in server.output() and os.path.exists(victims[0] + ".corrupt")
        r = httpx.post(server.url + "/v1/completions", json={"prompt": [5, 9], "max_tokens": 4, "session_id": "chat"},
                       timeout=60)
        assert r.status_code == 200, r.text
        out = generate(lm, torch.tensor([[3, 1, 4, 1]]), max_new_tokens=5)
        assert first["choices"][0]["token_ids"] == out.sequences[0, 4:].tolist()
        resumed = generate(lm, torch.cat([out.sequences[:, -1:], torch.tensor([[5, 9]])], 1), out.state,
                           max_new_tokens=4)
        assert r.json()["choices"][0]["token_ids"] == resumed.sequences[0, 3:].tolist()
        assert r.json()["usage"]["cached_tokens"] == 4 + 5 - 1
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert "mamba_state_cache_corrupted_total 1" in metrics and "mamba_state_cache_session_hits_total 1" in metrics

        # overload: one decoding, one waiting, the rest answered 503 at once; the server stays up
        async def flood():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.wait_for(asyncio.gather(*(
                    client.post(server.url + "/v1/completions", json={"prompt": [1, 2], "max_tokens": 300})
                    for _ in range(8))), DEADLINE_S)

        codes = [resp.status_code for resp in asyncio.run(flood())]
        assert 503 in codes and 200 in codes and set(codes) <= {200, 503}, codes
        assert httpx.get(server.url + "/health", timeout=30).status_code == 200
        assert "mamba_state_requests_rejected_total" in httpx.get(server.url + "/metrics", timeout=30).text
    finally:
        assert server.stop() in (0, -signal.SIGTERM), server.output()  # uvicorn re-raises SIGTERM after its shutdown
        assert "mamba-state serve: stopped after" in server.output(), server.output()


class _CharTokenizer:
    """A stand-in tokenizer: one id per character ('a' = 1, ...)."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) - ord("a") + 1 for c in text]

    def decode(self, ids):
        return "".join(chr(i - 1 + ord("a")) for i in ids)


def test_text_prompts_with_a_tokenizer_and_body_limits(lm, monkeypatch):
    """In process (FastAPI's TestClient): text in and out through a tokenizer, the same tokens as the ids."""
    from fastapi.testclient import TestClient

    from mamba_state.cache import StateCache
    from mamba_state.serve import Engine
    from mamba_state.serve import app as app_module

    engine = Engine(lm, StateCache(lm), max_batch=4)
    with TestClient(app_module.build_app(engine, tokenizer=_CharTokenizer(), model_name="tiny")) as client:
        text = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 5}).json()
        ids = client.post("/v1/completions", json={"prompt": [1, 2, 3], "max_tokens": 5}).json()
        assert text["choices"][0]["token_ids"] == ids["choices"][0]["token_ids"]
        assert text["choices"][0]["text"] == _CharTokenizer().decode(ids["choices"][0]["token_ids"])
        r = client.post("/v1/completions", json={"prompt": "~", "max_tokens": 1})  # an id beyond the vocabulary
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        monkeypatch.setattr(app_module, "MAX_BODY_BYTES", 100)
        r = client.post("/v1/completions", json={"prompt": [1] * 100, "max_tokens": 1})
        assert r.status_code == 413 and "at most 100 bytes" in r.json()["error"]["message"]
