"""Selective scan: our Triton kernel vs upstream's CUDA kernel vs the PyTorch chunked reference, in one process.

Measures forward and forward+backward at the issue's shapes (dstate 16), bf16 and fp32, with and without
initial_state + resets, in the Mamba layer's configuration (D, z, delta_bias, delta_softplus, B/C [b, n, L]).
Prints a table, writes JSON to benchmarks/results/scan_<device>.json and the markdown table into
docs/benchmarks.md under "## Selective scan (Triton)" (only that section is replaced).

The floor of each row is max(bytes that must move / measured copy bandwidth, exp / exp rate + FMA / FMA rate):
bytes count each input read once and each output written once; the bandwidth is a device-to-device copy
measured in this run (read + write bytes); rates are per SM per clock (16 ex2 on the SFUs, 128 fp32 FMA) at the
SM clock the device reports.

    python benchmarks/bench_scan.py            # full table
    python benchmarks/bench_scan.py --quick    # first shape only
    python benchmarks/bench_scan.py --sweep    # block-size sweep first (backward BD 4 vs 8 applied to the table)
    python benchmarks/bench_scan.py --bwd-mode chunk   # force a backward schedule (MAMBA_STATE_SCAN_BWD)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(8, 1536, 2048), (8, 2048, 2048), (4, 5120, 2048), (1, 1536, 16384), (64, 256, 1024)]
DSTATE = 16
HEADING = "## Selective scan (Triton)"


def upstream_scan():
    """upstream selective_scan_fn when its CUDA extension is built, else None."""
    try:
        import selective_scan_cuda  # noqa: F401

        if not hasattr(selective_scan_cuda, "fwd"):
            return None
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as up

        return up
    except Exception:
        return None


def make_inputs(b, d, L, dtype, extras, device="cuda", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    n = DSTATE
    r = lambda *s: torch.randn(*s, device=device, generator=g)  # noqa: E731
    inp = dict(
        u=r(b, d, L).to(dtype), delta=(0.5 * r(b, d, L) - 1.0).to(dtype),
        A=-torch.exp(0.5 * r(d, n)).float(), B=r(b, n, L).to(dtype), C=r(b, n, L).to(dtype),
        D=r(d).float(), z=r(b, d, L).to(dtype), delta_bias=(0.1 * r(d)).float(),
    )
    if extras:
        inp["initial_state"] = r(b, d, n).float()
        inp["reset"] = torch.rand(b, L, device=device, generator=g) < (1.0 / 512)
    return inp


def must_bytes(b, d, L, elt, backward):
    """Bytes that must move: inputs once, outputs once (forward: u, delta, z, B, C -> out)."""
    big = b * d * L * elt
    bc = 2 * b * DSTATE * L * elt
    if not backward:
        return 4 * big + bc
    # forward (as above) + backward: read u, delta, z, dout, B, C; write du, ddelta, dz, dB, dC
    return (4 * big + bc) + (7 * big + 2 * bc)


def must_flops(b, d, L, backward):
    """(exponentials, fp32 multiply-adds): forward 1 exp + 3 FMA per (b, d, t, n); backward recomputes the
    states (1 exp + 2 FMA) and applies the reverse step (about 8 FMA)."""
    e = b * d * L * DSTATE
    return (e, 3 * e) if not backward else (2 * e, 13 * e)


def bench(fn, rep=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def measure_bandwidth():
    x = torch.empty(1 << 28, device="cuda", dtype=torch.float32)  # 1 GiB
    y = torch.empty_like(x)
    x.uniform_()
    ms = bench(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / (ms * 1e-3)


def chip_rates():
    props = torch.cuda.get_device_properties(0)
    clock_hz = getattr(props, "clock_rate", 0) * 1e3 or 1.98e9  # kHz when torch reports it
    sms = props.multi_processor_count
    return 16 * sms * clock_hz, 128 * sms * clock_hz, clock_hz


def run_case(impl, inp, backward):
    args = {k: v for k, v in inp.items()}
    if backward:
        for k in ("u", "delta", "B", "C", "z", "D", "delta_bias", "A"):
            args[k] = args[k].detach().requires_grad_()
        if "initial_state" in args:
            args["initial_state"] = args["initial_state"].detach().requires_grad_()
        out = impl(**args)
        grad = torch.randn_like(out)

        def step():
            o = impl(**args)
            torch.autograd.backward(o, grad)

        return step
    return lambda: impl(**args)


def rows_for(shapes, dtypes, extras_opts, bw, rates, with_chunked):
    from mamba_state.kernels import selective_scan_fn
    from mamba_state.reference import selective_scan_chunked

    up = upstream_scan()
    exp_rate, fma_rate, _ = rates
    impls = {
        "triton": lambda **a: selective_scan_fn(delta_softplus=True, backend="triton", **a),
        "chunked": lambda **a: selective_scan_chunked(delta_softplus=True, **a),
    }
    if up is not None:
        impls["upstream"] = lambda **a: up(delta_softplus=True, **a)
    rows = []
    for (b, d, L) in shapes:
        for dtype in dtypes:
            for extras in extras_opts:
                inp = make_inputs(b, d, L, dtype, extras)
                elt = torch.finfo(dtype).bits // 8
                for backward in (False, True):
                    times = {}
                    for name, impl in impls.items():
                        if name == "upstream" and extras:
                            continue  # upstream has neither initial_state nor reset
                        if name == "chunked" and not with_chunked:
                            continue
                        try:
                            times[name] = bench(run_case(impl, inp, backward), rep=100 if name == "chunked" else 200)
                        except torch.OutOfMemoryError:
                            times[name] = None
                        torch.cuda.empty_cache()
                    nbytes = must_bytes(b, d, L, elt, backward)
                    ne, nf = must_flops(b, d, L, backward)
                    floor_mem = nbytes / bw * 1e3
                    floor_cmp = (ne / exp_rate + nf / fma_rate) * 1e3
                    ours = times.get("triton")
                    upt = times.get("upstream")
                    rows.append(dict(
                        batch=b, dim=d, seqlen=L, dstate=DSTATE, dtype=str(dtype).replace("torch.", ""),
                        initial_state_and_reset=extras, pass_="fwd+bwd" if backward else "fwd",
                        triton_ms=ours, upstream_ms=upt, chunked_ms=times.get("chunked"),
                        ratio_to_upstream=(ours / upt) if (ours and upt) else None,
                        triton_GBps=nbytes / (ours * 1e-3) / 1e9 if ours else None,
                        floor_ms=max(floor_mem, floor_cmp), floor_mem_ms=floor_mem, floor_compute_ms=floor_cmp,
                    ))
                    r = rows[-1]
                    print(_fmt_row(r), flush=True)
    return rows


def _f(x, nd=3):
    return "-" if x is None else f"{x:.{nd}f}"


def _fmt_row(r):
    return (f"| {r['batch']}x{r['dim']}x{r['seqlen']} | {r['dtype']} "
            f"| {'yes' if r['initial_state_and_reset'] else 'no'}"
            f" | {r['pass_']} | {_f(r['triton_ms'])} | {_f(r['upstream_ms'])} | {_f(r['ratio_to_upstream'], 2)}"
            f" | {_f(r['chunked_ms'], 2)} | {_f(r['triton_GBps'], 0)} | {_f(r['floor_ms'])}"
            f" ({'mem' if r['floor_mem_ms'] >= r['floor_compute_ms'] else 'exp+FMA'}) |")


TABLE_HEAD = ("| batch x dim x seqlen | dtype | init+reset | pass | ours ms | upstream ms | ours/upstream | "
              "chunked ms | ours GB/s | floor ms (bound) |\n"
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def write_markdown(rows, meta):
    path = ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    body = [HEADING, "",
            f"Measured by `benchmarks/bench_scan.py` on {meta['device']} (torch {meta['torch']}, "
            f"triton {meta['triton']}); "
            f"dstate {DSTATE}; D, z, delta_bias and delta_softplus on (the Mamba layer's call); median of "
            f"`triton.testing.do_bench`. Copy bandwidth measured in the same run: {meta['bandwidth_GBps']:.0f} GB/s. "
            f"Floor = max(bytes that must move / bandwidth, exp / {meta['exp_rate_T']:.2f} T/s + FMA / "
            f"{meta['fma_rate_T']:.1f} T/s). Upstream has no initial_state/reset: '-' in those rows. "
            "'-' for chunked: not run or out of memory.", "", TABLE_HEAD]
    body += [_fmt_row(r) for r in rows]
    section = "\n".join(body) + "\n"
    pat = re.compile(r"^## Selective scan \(Triton\)\n.*?(?=^## |\Z)", re.S | re.M)
    text = pat.sub(lambda _m: section + "\n", text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def sweep(rates, bw):
    """Block sizes of our kernel (and sequence-parallel on/off) at the first and the long shape, bf16."""
    from mamba_state.kernels import selective_scan_fn

    impl = lambda **a: selective_scan_fn(delta_softplus=True, backend="triton", **a)  # noqa: E731
    out = []

    def timed(kind, shape, **env):
        for k, v in env.items():
            os.environ[f"MAMBA_STATE_SCAN_{k}"] = str(v)
        try:
            inp = make_inputs(*shape, torch.bfloat16, False)
            ms = bench(run_case(impl, inp, kind == "fwd+bwd"))
        finally:
            for k in env:
                os.environ.pop(f"MAMBA_STATE_SCAN_{k}", None)
        out.append(dict(kind=kind, shape=shape, ms=ms, **env))
        print(f"sweep {kind} {shape} {env}: {ms:.3f} ms", flush=True)

    for shape in (SHAPES[0], SHAPES[2], SHAPES[4]):
        for bd in (4, 8):
            timed("fwd+bwd", shape, BWD_BD=bd, BWD_WARPS=1)
    for shape in SHAPES[:4]:  # backward schedules: sequential walk vs chunk-parallel
        for mode in ("seq", "chunk"):
            timed("fwd+bwd", shape, BWD=mode)
    for shape in (SHAPES[1], SHAPES[4]):
        for bd in (8, 16):
            timed("fwd", shape, BD=bd, WARPS=1, SEQPAR=0)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="first shape only")
    p.add_argument("--sweep", action="store_true", help="block-size sweep at the first shape")
    p.add_argument("--no-chunked", action="store_true", help="skip the PyTorch chunked reference")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--bwd-mode", choices=("auto", "seq", "chunk", "tp"),
                   help="backward schedule (sets MAMBA_STATE_SCAN_BWD; default: the library's choice)")
    args = p.parse_args(argv)
    if args.bwd_mode:
        os.environ["MAMBA_STATE_SCAN_BWD"] = args.bwd_mode
    if not torch.cuda.is_available():
        print("bench_scan: needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    bw = measure_bandwidth()
    rates = chip_rates()
    meta = dict(device=torch.cuda.get_device_name(0), torch=torch.__version__, triton=triton.__version__,
                bandwidth_GBps=bw / 1e9, exp_rate_T=rates[0] / 1e12, fma_rate_T=rates[1] / 1e12,
                sm_clock_GHz=rates[2] / 1e9, upstream=upstream_scan() is not None,
                bwd_mode=os.environ.get("MAMBA_STATE_SCAN_BWD", "auto"))
    print(json.dumps(meta), flush=True)
    result = dict(meta=meta)
    if args.sweep:
        result["sweep"] = sweep(rates, bw)
        # apply the backward's better block size to the table (the library default is then set to match)
        bwd = {r["BWD_BD"]: r["ms"] for r in result["sweep"] if r["kind"] == "fwd+bwd" and r["shape"] == SHAPES[0]}
        if bwd and min(bwd, key=bwd.get) == 4:
            os.environ["MAMBA_STATE_SCAN_BWD_BD"] = "4"
        meta["env"] = {k: v for k, v in os.environ.items() if k.startswith("MAMBA_STATE_SCAN_")}
        print("table env:", meta["env"], flush=True)
    shapes = SHAPES[:1] if args.quick else SHAPES
    print(TABLE_HEAD, flush=True)
    rows = []
    result["rows"] = rows
    for shape in shapes:  # write after every shape, so a run cut short still leaves its table
        rows += rows_for([shape], (torch.bfloat16, torch.float32), (False, True), bw, rates, not args.no_chunked)
        if not args.no_write:
            tag = re.sub(r"[^A-Za-z0-9]+", "_", meta["device"]).strip("_").lower()
            out = ROOT / "benchmarks" / "results" / f"scan_{tag}.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1))
            write_markdown(rows, meta)
            if os.environ.get("OUT"):
                Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=1))
                Path(os.environ["OUT"], "benchmarks.md").write_text((ROOT / "docs" / "benchmarks.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
