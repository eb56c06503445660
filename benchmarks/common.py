"""Shared helpers for the scripts in ``benchmarks/``.

Every benchmark script measures the contenders side by side in one run, then

* writes its raw numbers with :func:`write_json` (``benchmarks/results/<name>.json``), wrapped in the
  :func:`environment` header (date, device, versions), and
* replaces its own ``## <Section>`` of ``docs/benchmarks.md`` with :func:`replace_section`, leaving every other
  section as it was (scripts of other benchmarks own those).

Timing: :func:`median_time` runs a callable a few times after warm-up and returns the median in seconds;
:func:`interleaved_median_times` times several contenders in turns (A, B, A, B, ...), so that a slow spell of
the host (shared machines vary by tens of percent from second to second) falls on every contender alike.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = ["ROOT", "RESULTS_DIR", "BENCH_DOC", "environment", "environment_line", "median_time",
           "interleaved_median_times", "write_json",
           "replace_section", "markdown_table"]

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"
BENCH_DOC = ROOT / "docs" / "benchmarks.md"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(extra_packages: Sequence[str] = ()) -> dict[str, Any]:
    """Date (UTC), host, CPU/GPU and package versions: the header of every result file."""
    cuda = torch.cuda.is_available()
    packages = ["mamba-state", "torch", "triton", "mamba-ssm", *extra_packages]
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "versions": {p: _version(p) for p in packages},
        # set by gpu_session.sh's caller: a device copy of the tree has no git history
        "commit": os.environ.get("MAMBA_STATE_COMMIT") or None,
        # launch-plan overrides in force (MAMBA_STATE_SCAN_BWD_HALF=3, ...): figures taken under one say so
        "overrides": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MAMBA_STATE_SCAN_")},
    }


def environment_line(env: dict[str, Any]) -> str:
    """One markdown line summarising :func:`environment` for a doc section."""
    device = env["gpu"] or f"CPU ({env['cpu']}, {env['cpu_count']} cores, {env['torch_threads']} torch threads)"
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    commit = f" Commit {env['commit']}." if env.get("commit") else ""
    overrides = env.get("overrides") or {}
    plan = (" Launch-plan overrides: " + ", ".join(f"`{k}={v}`" for k, v in overrides.items()) + "."
            if overrides else "")
    return f"Measured {env['date_utc']} on {device}; Python {env['python']}, {versions}.{commit}{plan}"


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs (CUDA synchronised)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_times(fns: dict[str, Callable[[], Any]], repeats: int = 10,
                             warmup: int = 1) -> dict[str, float]:
    """Median wall time in seconds of each callable, timed in turns: every round runs each once (CUDA
    synchronised around each), after ``warmup`` rounds."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def write_json(name: str, payload: dict[str, Any], env: dict[str, Any] | None = None) -> Path:
    """Write ``{"environment": env, **payload}`` to ``benchmarks/results/<name>.json``; returns the path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    doc = {"environment": env if env is not None else environment(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (cells converted with ``str``)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def replace_section(title: str, body: str, doc: Path = BENCH_DOC) -> None:
    """Replace the section ``## <title>`` of ``doc`` with ``body`` (appended when absent).

    A section runs from its heading to the next level-2 heading (``## ``) or the end of the file; other
    sections, and the text before the first one, are kept byte for byte. The file is created with a
    ``# Benchmarks`` title when missing.
    """
    heading = f"## {title}"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n\nNumbers written by the scripts in `benchmarks/`.\n"
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1)
        text = text.rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + block
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


# The 130m-shaped model of the GPU benchmarks (state-spaces/mamba-130m's configuration).
LM_130M = dict(d_model=768, n_layer=24, vocab_size=50277, ssm_cfg={}, rms_norm=True, fused_add_norm=True,
               residual_in_fp32=True, pad_vocab_size_multiple=8, tie_embeddings=True)


def upstream_lm(cfg: dict, device: torch.device, dtype: torch.dtype):
    """``(upstream MambaLMHeadModel with random weights, "")`` when its CUDA kernels can run, else ``(None, why)``."""
    if device.type != "cuda":
        return None, "upstream needs CUDA"
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
        import selective_scan_cuda  # noqa: F401  (upstream's compiled scan)
    except Exception as exc:  # pragma: no cover - depends on the install
        return None, f"mamba_ssm with CUDA kernels not importable ({type(exc).__name__}: {exc})"
    torch.manual_seed(0)
    return MambaLMHeadModel(MambaConfig(**cfg), device=device, dtype=dtype).eval(), ""


class TrainingSetup:
    """The training step of bench_train.py / profile_train.py: the 130m-shaped upstream model with random weights
    (float32, train mode), ``StatefulMambaLM`` over it, one fused AdamW over the shared parameters, next-token
    inputs and targets ``[batch, seqlen]``, a non-zero state (a detached prefill of 256 other tokens) and resets
    at about one token in 512. :meth:`contenders` gives the three forwards; :meth:`step` runs one training step
    (forward, cross-entropy, backward, optimizer step) under bf16 autocast."""

    def __init__(self, batch: int, seqlen: int, who: str):
        import mamba_state as ms

        device = torch.device("cuda")
        model, why = upstream_lm(LM_130M, device, torch.float32)
        if model is None:
            raise SystemExit(f"{who}: needs upstream's CUDA kernels: {why}")
        self.model = model.train()
        self.lm = ms.StatefulMambaLM(model).train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        self.vocab = vocab = LM_130M["vocab_size"]
        gen = torch.Generator(device="cuda").manual_seed(0)
        ids = torch.randint(0, vocab, (batch, seqlen + 1), device=device, generator=gen)
        self.inputs, self.targets = ids[:, :-1], ids[:, 1:]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            _, self.state0 = self.lm(torch.randint(0, vocab, (batch, 256), device=device, generator=gen))
        self.reset = torch.rand(batch, seqlen, device=device, generator=gen) < 1 / 512

    def loss_of(self, logits: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits[..., :self.vocab].float().reshape(-1, self.vocab), self.targets.reshape(-1))

    def contenders(self) -> dict[str, Callable[[], torch.Tensor]]:
        """name -> a forward returning the logits: upstream, ours from zero, ours from a state with resets."""
        return {
            "upstream": lambda: self.model(self.inputs).logits,
            "ours": lambda: self.lm(self.inputs)[0],
            "ours, state + resets": lambda: self.lm(self.inputs, state=self.state0, reset=self.reset)[0],
        }

    def step(self, forward: Callable[[], torch.Tensor]) -> None:
        self.opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = self.loss_of(forward())
        loss.backward()
        self.opt.step()
