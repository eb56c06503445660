"""Shared by the multi-process tests: start one spawned process per rank, wait, and read what each rank wrote."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch


def spawn_ranks(target: Callable[..., Any], args_of_rank: Callable[[int], tuple], world: int,
                timeout: float = 240.0) -> tuple[list[int], list[int | None]]:
    """Run ``target(*args_of_rank(r))`` in ``world`` spawned processes; kill any still alive after ``timeout``
    seconds. Returns ``(pids of hung processes, exit codes)``."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return hung, [p.exitcode for p in procs]


def read_rank_results(out_dir: str, world: int) -> list[dict]:
    """Each rank's ``rank{r}.json`` from ``out_dir`` ({} where a rank wrote none)."""
    results = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
        else:
            results.append({})
    return results
