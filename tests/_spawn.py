"""Shared by the multi-process tests: pick rendezvous ports, start one spawned process per rank, wait, and read
what each rank wrote."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from typing import Any, Callable

import torch


def _ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that are free now and lie *below* the kernel's ephemeral range.

    Ports handed out by ``bind(0)`` come from the ephemeral range, and so do the ports that Gloo's own
    connections take while a group runs: a rendezvous port chosen that way can be taken by one of those
    connections before a later run binds it (one rank's TCPStore then talks to a Gloo socket and fails,
    and the other rank waits forever). Ports below the range are never handed out implicitly."""
    lo, _ = _ephemeral_range()
    low_bound = 10000 if lo > 12000 else 1025
    rng = random.Random(os.urandom(8))
    ports: list[int] = []
    while len(ports) < n:
        port = rng.randrange(low_bound, lo)
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def spawn_ranks(target: Callable[..., Any], args_of_rank: Callable[[int], tuple], world: int,
                timeout: float = 300.0, grace: float = 90.0) -> tuple[list[int], list[int | None]]:
    """Run ``target(*args_of_rank(r))`` in ``world`` spawned processes and wait for them.

    A process still alive ``timeout`` seconds after the start, or ``grace`` seconds after another one ended
    (its peers then usually wait in a collective that can never complete), is killed.
    Returns ``(pids of the killed processes, exit codes)``."""
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args_of_rank(r)) for r in range(world)]
    for p in procs:
        p.start()
    start, first_exit = time.monotonic(), None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if first_exit is None and any(not p.is_alive() for p in procs):
            first_exit = now
        if now - start > timeout or (first_exit is not None and now - first_exit > grace):
            break
        time.sleep(0.2)
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


def describe_failure(hung: list[int], exitcodes: list[int | None], ranks: list[dict]) -> str:
    """A message for a group that did not finish: who was killed, the exit codes, and what each rank recorded
    (its tracebacks included), so a failure in CI says why and not only that."""
    lines = [f"worker processes killed after waiting: {hung}; exit codes {exitcodes}"]
    for r, res in enumerate(ranks):
        lines.append(f"--- rank {r} recorded:")
        lines.extend(f"{k}: {v}" for k, v in res.items())
        if not res:
            lines.append("(nothing)")
    return "\n".join(lines)
