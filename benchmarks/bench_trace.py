"""What states at chosen positions and traces cost, next to a plain forward.

GPU run: a 130m-shaped Mamba-1 layer (d_model 768, d_inner 1536, d_state 16, bf16 parameters, fp32 states) over
2048 tokens, batch 1 and 8:

* plain forward; forward with ``return_states_at`` of 8 and of 64 evenly spaced positions; ``trace_layer`` with
  stride 64 (33 states); the full trace (2049 states);

and the speculative-decoding verify step of a 130m-shaped ``StatefulMambaLM`` (24 layers): 5 tokens from a
state, plain vs with the state after each of them (``return_states_at=range(1, 6)``).

Writes ``benchmarks/results/bench_trace.json``; ``--doc`` (run where the JSON is, e.g. after copying it back from
the GPU machine) writes the "States at positions and traces" section of ``docs/benchmarks.md`` from it.
``--smoke`` runs tiny sizes on the CPU and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (RESULTS_DIR, environment, environment_line, interleaved_median_times, markdown_table,  # noqa: E402
                    replace_section, write_json)

from mamba_state import StatefulMamba, StatefulMambaLM  # noqa: E402
from mamba_state.trace import trace_layer  # noqa: E402

SECTION = "States at positions and traces"
NAME = "bench_trace"


def layer_rows(smoke: bool, device: str) -> list[dict]:
    d_model, L = (64, 128) if smoke else (768, 2048)
    dtype = torch.float32 if smoke else torch.bfloat16
    torch.manual_seed(0)
    layer = StatefulMamba.from_config(d_model, d_state=16, layer_idx=0, device=device, dtype=dtype)
    rows = []
    for batch in (1, 8):
        x = torch.randn(batch, L, d_model, device=device, dtype=dtype)
        s0 = layer.new_state(batch)
        eight = [round(i * L / 8) for i in range(1, 9)]
        sixty_four = [round(i * L / 64) for i in range(1, 65)]
        with torch.no_grad():
            cases = {
                "forward": lambda: layer(x, s0),
                "forward + 8 positions": lambda: layer(x, s0, return_states_at=eight),
                "forward + 64 positions": lambda: layer(x, s0, return_states_at=sixty_four),
                "trace, stride 64": lambda: trace_layer(layer, x, s0, stride=64),
                f"full trace ({L + 1} states)": lambda: trace_layer(layer, x, s0, warn_bytes=2 ** 40),
            }
            # in turns: the forwards here are host-bound, and the host's speed drifts over seconds
            times = interleaved_median_times(cases, repeats=25, warmup=3)
        base = times["forward"]
        for k, t in times.items():
            rows.append({"what": k, "batch": batch, "tokens": L, "ms": round(1e3 * t, 3),
                         "x_forward": round(t / base, 2)})
    return rows


def verify_rows(smoke: bool, device: str) -> list[dict]:
    cfg = dict(d_model=64 if smoke else 768, n_layer=2 if smoke else 24, vocab_size=256 if smoke else 50277,
               ssm_cfg={}, pad_vocab_size_multiple=8)
    torch.manual_seed(0)
    lm = StatefulMambaLM.from_config(cfg, device=device, dtype=torch.float32 if smoke else torch.bfloat16)
    rows = []
    for batch in (1, 8):
        prompt = torch.randint(0, cfg["vocab_size"], (batch, 64), device=device)
        draft = torch.randint(0, cfg["vocab_size"], (batch, 5), device=device)
        with torch.no_grad():
            _, state = lm(prompt)
            times = interleaved_median_times({"plain": lambda: lm(draft, state),
                                              "at": lambda: lm(draft, state, return_states_at=range(1, 6))},
                                             repeats=9, warmup=2)
            plain, at = times["plain"], times["at"]
        rows.append({"what": "verify 5 tokens (LM)", "batch": batch, "tokens": 5, "ms": round(1e3 * plain, 3),
                     "x_forward": 1.0})
        rows.append({"what": "verify 5 tokens + state after each", "batch": batch, "tokens": 5,
                     "ms": round(1e3 * at, 3), "x_forward": round(at / plain, 2)})
    return rows


def write_doc(path: Path) -> None:
    doc = json.loads(path.read_text())
    rows = [[r["what"], r["batch"], r["tokens"], f"{r['ms']:.2f}", f"{r['x_forward']:.2f}"] for r in doc["rows"]]
    body = "\n".join([
        "`benchmarks/bench_trace.py`: a 130m-shaped Mamba-1 layer (d_model 768, d_state 16, bf16 parameters, fp32 "
        "states) over 2048 tokens, and the verify step of speculative decoding with a 130m-shaped model (24 layers, "
        "5 tokens from a state). On the Triton backend the states at positions come from one pass of the scan (the "
        "kernels store the state after each marked step; `kernels/selective_scan/positions.py`); traces at a "
        "stride are states at positions. Medians of 25 rounds (the layer; 9 for the verify step), each round "
        "timing every case of a batch in turn (the forwards are host-bound, and the host's speed drifts). "
        "Targets (issue 19): 8 positions <= 1.15x the plain forward, 64 positions <= 1.5x (a trace at a stride of "
        "64 tokens gives 33 states).",
        "",
        markdown_table(["what", "batch", "tokens", "ms (median)", "x plain forward"], rows),
        "",
        environment_line(doc["environment"]) + (f" Commit {doc['commit']}." if doc.get("commit")
                                                and "commit" not in doc["environment"] else ""),
        "",
        "At batch 1 the layer is bound by the host: its plain forward takes about 1.1 ms of wall time for about "
        "0.13 ms of kernels (`benchmarks/profile_positions.py`), so the ratios there measure the Python and launch "
        "work the positions add (their checks, the marks looked up on the device, the conv windows, the state "
        "objects), and they move between runs on different hosts. The same day, before the last host-side "
        "changes (the conv windows cast straight into a contiguous tensor, a cheaper device-cache key, and the "
        "final state written by the kernels instead of copied after them), 8 positions at batch 1 measured 1.23x "
        "(commit e4c7f26, plain forward 1.37 ms) and 1.18x (ed0a76b, plain forward 0.66 ms); "
        "`python benchmarks/profile_positions.py --host` lists the Python functions whose own time the positions "
        "add.",
    ])
    replace_section(SECTION, body)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU; writes nothing")
    parser.add_argument("--doc", action="store_true", help="write the docs section from the saved JSON and exit")
    args = parser.parse_args(argv)
    if args.doc:
        write_doc(RESULTS_DIR / f"{NAME}.json")
        return
    device = "cpu" if args.smoke else "cuda"
    rows = layer_rows(args.smoke, device) + verify_rows(args.smoke, device)
    print(markdown_table(["what", "batch", "tokens", "ms", "x plain"],
                         [[r["what"], r["batch"], r["tokens"], r["ms"], r["x_forward"]] for r in rows]))
    if not args.smoke:
        print(write_json(NAME, {"rows": rows, "commit": os.environ.get("MAMBA_STATE_COMMIT", "")}, environment()))


if __name__ == "__main__":
    main()
