"""The HTTP front of ``mamba-state serve``: a FastAPI app over an :class:`~mamba_state.serve.Engine`.

Routes:

* ``POST /v1/completions``: OpenAI-style completions. Body fields: ``prompt`` (token ids, or text when the
  server has a tokenizer), ``max_tokens`` (default 16), ``temperature``, ``top_p``, ``top_k``, ``min_p``,
  ``repetition_penalty``, ``seed``, ``stop_token_ids``, ``stream`` (server-sent events), ``session_id``
  (continue that session; park under it at the end). Greedy unless a sampling option or a seed is given (the
  generation layer's rule). Other fields are ignored.
* ``DELETE /v1/sessions/{session_id}``: forget a parked session.
* ``GET /metrics``: Prometheus text (:mod:`mamba_state.serve.metrics`).
* ``GET /health``: ``{"status": "ok", ...}``, 503 when the engine thread is not running.

Errors are JSON ``{"error": {"message", "type", "param"}}``: 400 for a bad field (``param`` names it), 404 for
an unknown session to delete, 413 for a body over ``MAX_BODY_BYTES``, 503 when the queue is full.

This module imports FastAPI (the ``serve`` extra: ``pip install mamba-state[serve]``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ..errors import StateError
from ..generation.sampling import SamplingConfig
from .engine import MAX_NEW_TOKENS, Engine, EngineOverloadedError, EngineStoppedError, _Event
from .metrics import CONTENT_TYPE, render_metrics

__all__ = ["build_app", "parse_completion_request", "RequestError", "MAX_BODY_BYTES"]

MAX_BODY_BYTES = 64 << 20  # a request body larger than this is refused (413) before it is parsed


class RequestError(StateError):
    """A request body field is missing or invalid (HTTP 400 naming ``param``)."""

    def __init__(self, param: str | None, message: str):
        super().__init__(message)
        self.param = param


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, lo: float | None = None) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != v or abs(v) == float("inf"):
        raise RequestError(name, f"{name}: expected a finite number or null, found {json.dumps(v)[:60]}")
    if lo is not None and v < lo:
        raise RequestError(name, f"{name}: expected a number >= {lo}, found {v}")
    return float(v)


def parse_completion_request(body: Any, tokenizer: Any = None, vocab: int | None = None) -> dict[str, Any]:
    """Check a ``/v1/completions`` body; returns the engine's keyword arguments plus ``stream``.

    Raises :class:`RequestError` naming the first bad field.
    """
    if not isinstance(body, dict):
        raise RequestError(None, f"body: expected a JSON object, found {type(body).__name__}")
    session_id = body.get("session_id")
    if session_id is not None and not isinstance(session_id, str):
        raise RequestError("session_id", f"session_id: expected a string or null, found {json.dumps(session_id)[:60]}")
    prompt = body.get("prompt", [] if session_id is not None else None)
    if isinstance(prompt, str):
        if tokenizer is None:
            raise RequestError("prompt", "prompt: expected a list of token ids (this server has no tokenizer), "
                                         "found a string")
        ids = list(tokenizer.encode(prompt, add_special_tokens=False)) if prompt else []
    elif isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        ids = prompt[0]
    elif isinstance(prompt, list):
        ids = prompt
    elif prompt is None:
        raise RequestError("prompt", "prompt: expected a list of token ids or a string, found none")
    else:
        raise RequestError("prompt", f"prompt: expected a list of token ids or a string, found "
                                     f"{type(prompt).__name__}")
    bad = next((t for t in ids if not _is_int(t) or t < 0 or (vocab is not None and t >= vocab)), None)
    if bad is not None:
        limit = f"[0, {vocab - 1}]" if vocab is not None else ">= 0"
        raise RequestError("prompt", f"prompt: expected token ids in {limit}, found {json.dumps(bad)[:60]}")
    if not ids and session_id is None:
        raise RequestError("prompt", "prompt: expected at least one token (or a session_id to continue), found none")
    max_tokens = body.get("max_tokens", 16)
    if not _is_int(max_tokens) or not 1 <= max_tokens <= MAX_NEW_TOKENS:
        raise RequestError("max_tokens", f"max_tokens: expected an int in [1, {MAX_NEW_TOKENS}], found "
                                         f"{json.dumps(max_tokens)[:60]}")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not -2**63 <= seed < 2**64):
        raise RequestError("seed", f"seed: expected an int or null, found {json.dumps(seed)[:60]}")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        raise RequestError("top_k", f"top_k: expected an int >= 0 or null, found {json.dumps(top_k)[:60]}")
    temperature, top_p = _number(body, "temperature", 0.0), _number(body, "top_p", 0.0)
    min_p, penalty = _number(body, "min_p", 0.0), _number(body, "repetition_penalty")
    try:
        sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=1.0 if penalty is None else penalty)
    except StateError as exc:
        param = str(exc).split(":", 1)[0].split()[0]
        raise RequestError(param if param in body else None, str(exc)) from None
    stop = body.get("stop_token_ids")
    if stop is not None and (not isinstance(stop, list) or not stop or not all(
            _is_int(t) and 0 <= t and (vocab is None or t < vocab) for t in stop)):
        raise RequestError("stop_token_ids", f"stop_token_ids: expected a non-empty list of token ids or null, "
                                             f"found {json.dumps(stop)[:60]}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream: expected true or false, found {json.dumps(stream)[:60]}")
    return {"prompt": ids, "max_new_tokens": max_tokens, "sampling": sampling, "seed": seed,
            "eos_token_id": stop, "session_id": session_id, "stream": stream}


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error") -> Any:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind, "param": param}},
                        headers={"Retry-After": "1"} if status == 503 else None)


def build_app(engine: Engine, tokenizer: Any = None, model_name: str = "mamba-state",
              on_stop: Any = None) -> Any:
    """The FastAPI app serving ``engine`` (started and stopped with the app's lifespan; ``on_stop()``, when
    given, is called once the engine has stopped and parked the requests in flight)."""
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)
            if on_stop is not None:
                on_stop()

    app = FastAPI(title="mamba-state serve", lifespan=lifespan)

    def text_of(tokens: list[int]) -> str:
        return tokenizer.decode(tokens) if tokenizer is not None and tokens else ""

    @app.get("/health")
    async def health() -> Any:
        alive = engine._thread is not None and engine._thread.is_alive()
        s = engine.stats()
        body = {"status": "ok" if alive else "stopped", "model": model_name, "running": s["running"],
                "waiting": s["waiting"]}
        return JSONResponse(status_code=200 if alive else 503, content=body)

    @app.get("/metrics")
    async def metrics() -> Any:
        return PlainTextResponse(render_metrics(engine.stats()), media_type=CONTENT_TYPE)

    @app.delete("/v1/sessions/{session_id}")
    async def drop_session(session_id: str) -> Any:
        try:
            found = engine.cache.drop_session(session_id)
        except StateError as exc:
            return _error(400, str(exc), "session_id")
        if not found:
            return _error(404, f"session_id: expected a parked session, found none named {session_id!r}",
                          "session_id", "not_found_error")
        return {"deleted": session_id}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        declared = request.headers.get("content-length", "0")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            return _error(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found {declared}")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                return _error(413, f"body: expected at most {MAX_BODY_BYTES} bytes, found more")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"body: expected JSON, found invalid JSON ({exc})")
        try:
            args = parse_completion_request(body, tokenizer, engine.vocab)
        except RequestError as exc:
            return _error(400, str(exc), exc.param)
        stream = args.pop("stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def listener(ev: _Event) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:  # the loop is gone (server shutting down)
                pass

        try:
            handle = engine.submit(listener=listener, **args)
        except EngineOverloadedError as exc:
            return _error(503, str(exc), None, "overloaded_error")
        except EngineStoppedError as exc:
            return _error(503, str(exc), None, "unavailable_error")
        except StateError as exc:
            return _error(400, str(exc), "session_id" if "session_id" in str(exc) else None)
        created = int(time.time())
        head = {"id": handle.id, "object": "text_completion", "created": created, "model": model_name}
        session_id = args["session_id"]

        def usage() -> dict[str, int]:
            n = len(handle.tokens)
            return {"prompt_tokens": handle.prompt_tokens, "completion_tokens": n,
                    "total_tokens": handle.prompt_tokens + n, "cached_tokens": handle.cached_tokens}

        if not stream:
            try:
                while True:
                    ev = await events.get()
                    if ev.kind != "token":
                        break
            except asyncio.CancelledError:
                handle.cancel()
                raise
            if ev.kind == "error":
                return _error(500, f"generation failed: {ev.error}", None, "server_error")
            choice = {"index": 0, "text": text_of(handle.tokens), "token_ids": list(handle.tokens),
                      "finish_reason": handle.finish_reason}
            return {**head, "choices": [choice], "usage": usage(), "session_id": session_id}

        async def sse():
            try:
                while True:
                    ev = await events.get()
                    if ev.kind == "token":
                        assert ev.token is not None
                        chunk = {**head, "choices": [{"index": 0, "text": text_of([ev.token]),
                                                      "token_ids": [ev.token], "finish_reason": None}]}
                    elif ev.kind == "done":
                        chunk = {**head, "choices": [{"index": 0, "text": "", "token_ids": [],
                                                      "finish_reason": handle.finish_reason}],
                                 "usage": usage(), "session_id": session_id}
                    else:
                        chunk = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error",
                                           "param": None}}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    if ev.kind != "token":
                        break
                yield "data: [DONE]\n\n"
            finally:
                if not handle.done:  # the client went away: stop decoding (the state is parked)
                    handle.cancel()

        return StreamingResponse(sse(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app
