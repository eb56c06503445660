"""benchmarks/triton_prewarm.py: its workers split every autotuned kernel's configurations into disjoint shares
that together cover all of them, and the full search afterwards still sees every configuration (CPU, interpreter)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# an autotuned kernel whose benchmark function records the configuration it is asked to time (the interpreter has
# no GPU timer), and a script that runs it once and prints what was tried
SCRIPT = textwrap.dedent('''
    import sys, torch, triton, triton.language as tl
    tried = []
    def bench(fn, quantiles):
        fn()
        return [1.0, 1.0, 1.0]
    @triton.autotune(configs=[triton.Config({"B": b}) for b in (16, 32, 64, 128, 256)], key=["n"], do_bench=bench)
    @triton.jit
    def add_one(x, n, B: tl.constexpr):
        i = tl.arange(0, B)
        tl.store(x + i, tl.load(x + i, mask=i < n) + 1, mask=i < n)
    import triton.runtime.autotuner as at
    prune = at.Autotuner.prune_configs
    def recording(self, kwargs):
        configs = prune(self, kwargs)
        tried.extend(c.kwargs["B"] for c in configs)
        return configs
    # recorded after any narrowing: wrap the (possibly narrowed) method once more
    at.Autotuner.prune_configs = recording
    x = torch.zeros(8)
    add_one[(1,)](x, 8)
    assert bool((x >= 1).all()), x  # each timed call adds one more
    with open(sys.argv[1], "a") as f:
        f.write(" ".join(map(str, sorted(tried))) + "\\n")
''')


def _run(tmp_path: Path, workers: int) -> list[list[int]]:
    script, record = tmp_path / "toy.py", tmp_path / "tried.txt"
    script.write_text(SCRIPT)
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_prewarm.py"), "--workers", str(workers),
                          "--log-dir", str(tmp_path / "logs"), "--", "python3", str(script), str(record)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "ended with" not in out.stdout, out.stdout + "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    return [[int(v) for v in line.split()] for line in record.read_text().splitlines()]


def test_workers_split_the_configurations_into_disjoint_shares(tmp_path):
    shares = _run(tmp_path, workers=2)
    assert len(shares) == 2
    assert sorted(v for s in shares for v in s) == [16, 32, 64, 128, 256]


def test_more_workers_than_configurations_each_still_compile_one(tmp_path):
    shares = _run(tmp_path, workers=7)
    assert len(shares) == 7 and all(len(s) == 1 for s in shares)
    assert {s[0] for s in shares} == {16, 32, 64, 128, 256}
