"""``/metrics``: the engine's and the cache's counters in the Prometheus text exposition format (version 0.0.4)."""

from __future__ import annotations

from typing import Any

__all__ = ["render_metrics", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (metric name, type, help, where in the engine's stats)
_ENGINE = [
    ("requests_total", "counter", "Requests accepted.", "requests"),
    ("requests_finished_total", "counter", "Requests finished (length, stop or cancelled).", "finished"),
    ("requests_rejected_total", "counter", "Requests refused because the queue was full (HTTP 503).", "rejected"),
    ("generated_tokens_total", "counter", "Tokens generated.", "tokens"),
    ("prompt_tokens_total", "counter", "Prompt tokens received.", "prompt_tokens"),
    ("cached_prompt_tokens_total", "counter", "Prompt tokens served from the cache or a session.", "cached_tokens"),
    ("prefill_tokens_total", "counter", "Tokens run through a prefill forward.", "prefill_tokens"),
    ("prefill_batches_total", "counter", "Packed prefill forwards (several requests' prompts in one forward).",
     "prefill_batches"),
    ("prefill_batch_sequences_total", "counter", "Request pieces in packed prefill forwards (divided by "
     "prefill_batches_total: sequences per forward).", "prefill_batch_sequences"),
    ("decode_steps_total", "counter", "Batched decode steps.", "decode_steps"),
    ("running_requests", "gauge", "Requests in the decode batch.", "running"),
    ("waiting_requests", "gauge", "Requests queued.", "waiting"),
    ("batch_capacity", "gauge", "Rows of the decode batch's current bucket.", "batch_capacity"),
    ("tokens_per_second", "gauge", "Tokens generated per second over the last 10 s.", "tokens_per_second"),
]
_CACHE = [
    ("cache_hits_total", "counter", "Prefix lookups that found a state.", "hits"),
    ("cache_misses_total", "counter", "Prefix lookups that found none.", "misses"),
    ("cache_hit_tokens_total", "counter", "Tokens covered by prefix hits.", "hit_tokens"),
    ("cache_insertions_total", "counter", "Prefix states inserted.", "insertions"),
    ("cache_evictions_total", "counter", "Entries evicted from every tier.", "evictions"),
    ("cache_demotions_total", "counter", "Entries moved to a slower tier.", "demotions"),
    ("cache_corrupted_total", "counter", "Disk entries dropped as corrupted.", "corrupted"),
    ("cache_disk_errors_total", "counter", "Disk writes that failed.", "disk_errors"),
    ("cache_session_hits_total", "counter", "Sessions resumed.", "session_hits"),
    ("cache_session_misses_total", "counter", "Session look-ups that found none.", "session_misses"),
]


def _value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(int(v))


def render_metrics(stats: dict[str, Any], prefix: str = "mamba_state_") -> str:
    """The text for ``stats`` (:meth:`mamba_state.serve.Engine.stats`)."""
    lines: list[str] = []

    def metric(name: str, kind: str, text: str, samples: list[tuple[str, Any]]) -> None:
        lines.append(f"# HELP {prefix}{name} {text}")
        lines.append(f"# TYPE {prefix}{name} {kind}")
        for labels, v in samples:
            lines.append(f"{prefix}{name}{labels} {_value(v)}")

    for name, kind, text, key in _ENGINE:
        metric(name, kind, text, [("", stats.get(key, 0))])
    cache = stats.get("cache", {})
    for name, kind, text, key in _CACHE:
        metric(name, kind, text, [("", cache.get(key, 0))])
    metric("cache_bytes", "gauge", "Bytes held per cache tier.",
           [(f'{{tier="{t}"}}', v) for t, v in sorted(cache.get("bytes", {}).items())])
    metric("cache_entries", "gauge", "Entries per cache tier.",
           [(f'{{tier="{t}"}}', v) for t, v in sorted(cache.get("entries", {}).items())])
    budgets = [(f'{{tier="{t}"}}', v) for t, v in sorted(cache.get("budgets", {}).items()) if v is not None]
    metric("cache_budget_bytes", "gauge", "Byte budget per cache tier (absent: unbounded).", budgets)
    return "\n".join(lines) + "\n"
