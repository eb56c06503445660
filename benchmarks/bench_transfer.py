"""State transfer: moving a 2.8B-shaped Mamba-1 model state between two ranks, and parking it on the host.

State: 64 layers, d_model 2560, expand 2 (d_inner 5120), d_state 16, d_conv 4, fp32: 409,600 bytes per layer and
batch row, 26.2 MB per row; batch 1 and 8.

* Transfer: two processes (NCCL on two GPUs when there are two, Gloo on the CPU otherwise). Rank 0 sends with
  ``send_state``, rank 1 receives with ``recv_state`` and sends the state back; the one-way time is half the
  median round trip (rank 0's clock; CUDA synchronised). Beside it, in the same run, the same bytes as one
  ``torch.distributed.send``/``recv`` of one flat buffer, into a new buffer each time (what any receiver that
  allocates pays) and into a preallocated one (the floor). ``recv_state(out=...)`` receives into an existing
  state (no allocation).
* Offload / restore (one process): ``offload_state(...).wait()`` and ``restore_state(...)`` (plus a
  synchronisation), beside ``state.to("cpu")`` / ``state.to(device)`` through pageable memory. On a CPU-only
  machine both are plain CPU copies (no pinning), compared with ``state.clone()``, and say little about a GPU
  server.

Writes ``benchmarks/results/transfer_<label>.json`` and rewrites the "## State transfer" section of
docs/benchmarks.md from every ``transfer_*.json`` present (so CPU and GPU figures stand side by side).

    python benchmarks/bench_transfer.py                 # both batch sizes, 5 repeats
    python benchmarks/bench_transfer.py --repeats 3 --batches 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, environment, environment_line, markdown_table, median_time, replace_section, write_json  # noqa: E402

LAYERS, D_INNER, D_STATE, D_CONV = 64, 5120, 16, 4
SECTION = "State transfer"


def make_state(batch: int, device: str | torch.device):
    from mamba_state import MambaInferenceState, MambaModelState

    gen = torch.Generator(device=device).manual_seed(batch)
    layers = {i: MambaInferenceState(torch.randn(batch, D_INNER, D_CONV, device=device, generator=gen),
                                     torch.randn(batch, D_INNER, D_STATE, device=device, generator=gen))
              for i in range(LAYERS)}
    return MambaModelState(layers, seqlen_offset=123, metadata={"model": "mamba-2.8b-shaped"})


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _bits_equal(a, b) -> bool:
    from mamba_state._packing import state_tensors

    return all(torch.equal(x.cpu().view(torch.int32), y.cpu().view(torch.int32))
               for x, y in zip(state_tensors(a), state_tensors(b)))


# ---------------------------------------------------------------------------------------------- two ranks
def _transfer_worker(rank: int, init: str, backend: str, batches: list[int], repeats: int, out: str,
                     threads: int) -> None:
    import torch.distributed as dist

    import mamba_state.distributed as msd

    torch.set_num_threads(threads)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=2, timeout=timedelta(minutes=5))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    rows = []
    try:
        for batch in batches:
            state = make_state(batch, device) if rank == 0 else None
            nbytes = LAYERS * D_INNER * (D_CONV + D_STATE) * 4 * batch

            mine = make_state(batch, device)  # preallocated destination for recv_state(out=...)

            def state_round_trip(into=False):
                out = mine if into else None
                if rank == 0:
                    msd.send_state(state, 1)
                    back = msd.recv_state(1, out=out)
                else:
                    back = msd.recv_state(0, out=out)
                    msd.send_state(back, 0)
                _sync()
                return back

            flat = torch.empty(nbytes, dtype=torch.uint8, device=device)

            def raw_round_trip(fresh=False):
                buf = torch.empty(nbytes, dtype=torch.uint8, device=device) if fresh else flat
                if rank == 0:
                    dist.send(flat, 1)
                    dist.recv(buf, 1)
                else:
                    dist.recv(buf, 0)
                    dist.send(buf, 0)
                _sync()

            back = state_round_trip()  # warm-up (NCCL builds its point-to-point communicator here)
            ok = _bits_equal(back, state) if rank == 0 else True
            back_into = state_round_trip(into=True)  # every rank takes part in every round trip
            ok_into = _bits_equal(back_into, state) if rank == 0 else True
            raw_round_trip()
            cases = (("send_state -> recv_state (new state)", state_round_trip, ok),
                     ("send_state -> recv_state(out=preallocated)", lambda: state_round_trip(True), ok_into),
                     ("raw send/recv, one flat buffer, new each time", lambda: raw_round_trip(True), None),
                     ("raw send/recv, one flat buffer, preallocated", raw_round_trip, None))
            for name, fn, exact in cases:
                times = []
                for _ in range(repeats):
                    dist.barrier()
                    t0 = time.perf_counter()
                    fn()
                    times.append(time.perf_counter() - t0)
                rows.append({"what": name, "batch": batch, "bytes": nbytes, "one_way_s": statistics.median(times) / 2,
                             "round_trips_s": times, "bit_exact": exact})
            del state, back, flat, mine
    finally:
        if rank == 0:
            Path(out).write_text(json.dumps(rows))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_transfer(batches: list[int], repeats: int) -> tuple[str, list[dict]]:
    backend = "nccl" if torch.cuda.device_count() >= 2 and torch.distributed.is_nccl_available() else "gloo"
    ctx = torch.multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        init = f"tcp://127.0.0.1:{_free_port()}"
        procs = [ctx.Process(target=_transfer_worker, args=(r, init, backend, batches, repeats, out,
                                                                         torch.get_num_threads())) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        if any(p.exitcode != 0 for p in procs):
            raise SystemExit(f"transfer workers failed: exit codes {[p.exitcode for p in procs]}")
        return backend, json.loads(Path(out).read_text())


# ---------------------------------------------------------------------------------------------- offload
def bench_offload(batches: list[int], repeats: int) -> list[dict]:
    from mamba_state.offload import offload_state, restore_state

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows = []
    for batch in batches:
        state = make_state(batch, device)
        host = offload_state(state).wait()
        assert _bits_equal(host, state) and _bits_equal(restore_state(host, device), state)
        naive_host = state.to("cpu")
        cases = [("offload_state(...).wait()", lambda: offload_state(state).wait()),
                 ("restore_state(host, device)", lambda: restore_state(host, device))]
        if device.type == "cuda":
            cases += [('state.to("cpu") (pageable, synchronous)', lambda: state.to("cpu")),
                      ("pageable host state .to(device)", lambda: naive_host.to(device))]
        else:  # .to("cpu") of a CPU state copies nothing; a clone is the plain-copy baseline
            cases += [("state.clone()", lambda: state.clone())]
        for name, fn in cases:
            rows.append({"what": name, "batch": batch, "bytes": state.nbytes, "device": str(device),
                         "seconds": median_time(fn, repeats)})
        del state, host, naive_host
    return rows


# ---------------------------------------------------------------------------------------------- report
def _label(backend: str) -> str:
    if backend == "nccl":
        return "nccl_2gpu"
    return "gloo_gpu_offload" if torch.cuda.is_available() else "cpu_gloo"


def _section() -> str:
    parts = [
        "2.8B-shaped Mamba-1 model state (64 layers, d_inner 5120, d_state 16, d_conv 4, fp32; 26.2 MB per batch "
        "row). Written by `benchmarks/bench_transfer.py` from every `benchmarks/results/transfer_*.json`.",
    ]
    found = sorted(RESULTS_DIR.glob("transfer_*.json"))
    if not any(p.name == "transfer_nccl_2gpu.json" for p in found):
        parts.append("**Two GPUs over NCCL: still to be measured** (run this script on a machine with two GPUs).")
    for path in found:
        doc = json.loads(path.read_text())
        on_gpu = bool(doc["offload"]) and doc["offload"][0]["device"].startswith("cuda")
        if doc["backend"] == "nccl":
            title = "Two GPUs, NCCL"
        elif on_gpu:
            title = "Gloo over loopback TCP (CPU tensors, one GPU present: offload measured on it)"
        else:
            title = "CPU only, Gloo over loopback TCP (two processes on one machine; not a GPU figure)"
        line = environment_line(doc["environment"])
        load = doc.get("load_average")
        if load:
            line += (f" Load average (1 min) {load['before'][0]:.1f} before and {load['after'][0]:.1f} after the run "
                     f"on {load['cpu_count']} cores: other jobs shared the machine, so treat these as rough figures.")
        parts.append(f"### {title}\n\n{line}")
        rows = [[r["what"], r["batch"], f"{r['bytes'] / 1e6:.1f}", f"{r['one_way_s'] * 1e3:.1f}",
                 f"{r['bytes'] / r['one_way_s'] / 1e9:.2f}"] for r in doc["transfer"]]
        parts.append("Transfer between two ranks (one way = half the median round trip):\n\n" + markdown_table(
            ["what", "batch", "MB", "one way (ms)", "GB/s"], rows))
        where = "GPU <-> pinned host memory" if on_gpu else "CPU -> CPU copies (no GPU: no pinning)"
        rows = [[r["what"], r["batch"], f"{r['bytes'] / 1e6:.1f}", f"{r['seconds'] * 1e3:.1f}",
                 f"{r['bytes'] / r['seconds'] / 1e9:.2f}"] for r in doc["offload"]]
        parts.append(f"Offload and restore ({where}; median, synchronised):\n\n"
                     + markdown_table(["what", "batch", "MB", "ms", "GB/s"], rows))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads per process (default: 1 without a GPU, where two ranks share the "
                         "cores and oversubscribed OpenMP threads slow plain copies down by an order of magnitude)")
    args = ap.parse_args(argv)
    threads = args.threads or (torch.get_num_threads() if torch.cuda.is_available() else 1)
    torch.set_num_threads(threads)
    env = environment()
    load_before = os.getloadavg()
    backend, transfer = bench_transfer(args.batches, args.repeats)
    for r in transfer:
        print(f"{backend:5s} {r['what']:48s} batch {r['batch']}: {r['one_way_s'] * 1e3:8.1f} ms one way "
              f"({r['bytes'] / r['one_way_s'] / 1e9:.2f} GB/s)" + ("" if r["bit_exact"] is None else
                                                                  f", bit exact: {r['bit_exact']}"))
    offload = bench_offload(args.batches, args.repeats)
    for r in offload:
        print(f"{r['device']:6s} {r['what']:46s} batch {r['batch']}: {r['seconds'] * 1e3:8.1f} ms")
    # other jobs on a shared machine move these numbers: record how busy it was
    load = {"before": list(load_before), "after": list(os.getloadavg()), "cpu_count": os.cpu_count()}
    path = write_json(f"transfer_{_label(backend)}", {"backend": backend, "repeats": args.repeats,
                                                      "load_average": load, "transfer": transfer,
                                                      "offload": offload}, env)
    replace_section(SECTION, _section())
    print(f"wrote {path} and the '## {SECTION}' section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
