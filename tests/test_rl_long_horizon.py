"""benchmarks/rl_long_horizon.py: a run spans several calls (--max-seconds and --resume), the report has a row
for every planned run with its status, and finished runs lose their checkpoint (the folder stays small)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _driver():
    spec = importlib.util.spec_from_file_location("rl_long_horizon", ROOT / "benchmarks" / "rl_long_horizon.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_run_spans_two_calls_and_the_report_states_what_ran(tmp_path, capsys):
    drv = _driver()
    out = tmp_path / "lh"
    plan = ["--out", str(out), "--smoke", "--horizons", "2", "--bits", "1", "--seeds", "0", "--variants", "gru",
            "mamba", "--run-seconds", "6", "--grace", "30"]
    # call 1: only room for part of the first run (share = budget - reserve = 5 s of its 6)
    assert drv.main(["run", *plan, "--budget", "11", "--reserve", "6", "--min-slot", "5"]) == 0
    gru = out / "gru_h2_b1_s0"
    first = [json.loads(x) for x in (gru / "metrics.jsonl").read_text().splitlines()]
    assert (gru / "checkpoint.pt").exists() and not (gru / "FINISHED").exists()
    rows = {r["name"]: r for r in drv.rows(out)}
    assert rows["gru_h2_b1_s0"]["status"] == "in progress" and rows["mamba_h2_b1_s0"]["status"] == "not run"
    # call 2: the same run continues from its checkpoint and finishes (its checkpoint is then deleted)
    assert drv.main(["run", "--out", str(out), "--budget", "12", "--reserve", "2", "--min-slot", "9",
                     "--smoke"]) == 0
    lines = [json.loads(x) for x in (gru / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == list(range(1, len(lines) + 1)) and len(lines) > len(first)
    assert lines[-1]["train_seconds"] >= 6 and (gru / "FINISHED").exists() and not (gru / "checkpoint.pt").exists()
    assert "resumed from" in (gru / "stdout.log").read_text()
    capsys.readouterr()
    assert drv.main(["report", "--out", str(out)]) == 0
    md = capsys.readouterr().out
    assert "2 runs planned: 1 finished, 0 in progress" in md and "1 not run" in md
    assert "| gru | 2 | 1 | 0 | finished |" in md and "| mamba | 2 | 1 | 0 | not run | 0 | 0 | - |" in md
    assert json.loads((out / "plan.json").read_text())["runs"][0]["run_seconds"] == 6
    # one archive carries the folder from call to call (a device call returns a few files only)
    drv.pack(out, tmp_path / "lh.tgz")
    drv.unpack(tmp_path / "lh.tgz", tmp_path / "again" / "lh")
    assert (tmp_path / "again" / "lh" / "gru_h2_b1_s0" / "metrics.jsonl").read_text() == (
        gru / "metrics.jsonl").read_text()


def test_runs_share_a_gpu_and_the_report_says_how_many(tmp_path, capsys):
    drv = _driver()
    out = tmp_path / "lh"
    assert drv.main(["run", "--out", str(out), "--smoke", "--horizons", "2", "--bits", "1", "--seeds", "0",
                     "--variants", "gru", "mamba", "--run-seconds", "3", "--per-gpu", "2", "--budget", "40",
                     "--reserve", "2", "--min-slot", "5", "--grace", "30"]) == 0
    started = [line for line in capsys.readouterr().out.splitlines() if " start " in line]
    assert len(started) == 2 and "1 on it" in started[0] and "2 on it" in started[1]  # together, not in turn
    log = [json.loads(x) for x in (out / "driver.jsonl").read_text().splitlines()]
    assert sorted(e["run"] for e in log) == ["gru_h2_b1_s0", "mamba_h2_b1_s0"]
    assert all(e["finished"] and e["runs_on_gpu"] == 2 for e in log)
    assert {r["name"]: r["runs_on_gpu"] for r in drv.rows(out)} == {"gru_h2_b1_s0": 2, "mamba_h2_b1_s0": 2}
    assert drv.main(["report", "--out", str(out)]) == 0
    assert "| runs on GPU |" in capsys.readouterr().out


def test_only_trains_the_runs_named(tmp_path, capsys):
    drv = _driver()
    out = tmp_path / "lh"
    assert drv.main(["run", "--out", str(out), "--smoke", "--horizons", "2", "3", "--bits", "1", "--seeds", "0",
                     "--variants", "gru", "mamba", "--run-seconds", "3", "--budget", "30", "--reserve", "2",
                     "--min-slot", "5", "--grace", "30", "--only", "gru_h3_*"]) == 0
    text = capsys.readouterr().out
    assert "4 to go" in text and "--only: 1 of them in this call: gru_h3_b1_s0" in text
    status = {r["name"]: r["status"] for r in drv.rows(out)}
    assert status == {"gru_h2_b1_s0": "not run", "mamba_h2_b1_s0": "not run", "gru_h3_b1_s0": "finished",
                      "mamba_h3_b1_s0": "not run"}
    assert len(json.loads((out / "plan.json").read_text())["runs"]) == 4  # the plan keeps every run


def test_a_curriculum_starts_each_horizon_from_the_shorter_ones_policy(tmp_path, capsys):
    drv = _driver()
    out = tmp_path / "lh"
    assert drv.main(["run", "--out", str(out), "--smoke", "--horizons", "3", "2", "--bits", "1", "--seeds", "0",
                     "--variants", "gru", "--run-seconds", "3", "--curriculum", "--budget", "60", "--reserve", "2",
                     "--min-slot", "5", "--grace", "30"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["curriculum"] and [(r["name"], r["init_from"]) for r in plan["runs"]] == [
        ("gru_h2_b1_s0", None), ("gru_h3_b1_s0", "gru_h2_b1_s0")]  # ascending, whatever order was given
    first, second = out / "gru_h2_b1_s0", out / "gru_h3_b1_s0"
    assert (first / "FINISHED").exists() and (second / "FINISHED").exists()
    # the first run's full checkpoint is gone; its policy's parameters stay for the run that starts from them
    assert not (first / "checkpoint.pt").exists() and (first / "policy.pt").exists()
    assert not (second / "policy.pt").exists()  # nothing starts from the last horizon
    assert f"initialised the policy from {first / 'policy.pt'}" in (second / "stdout.log").read_text()
    import torch

    from mamba_state.rl.checkpoint import load_checkpoint

    kept = load_checkpoint(first / "policy.pt")["trainer"]["policy"]
    assert kept and all(isinstance(v, torch.Tensor) for v in kept.values())


def test_a_curriculum_run_waits_for_the_run_it_starts_from(tmp_path, capsys):
    drv = _driver()
    out = tmp_path / "lh"
    # room for the first run only: the second must not start from a policy that is not there yet
    assert drv.main(["run", "--out", str(out), "--smoke", "--horizons", "2", "3", "--bits", "1", "--seeds", "0",
                     "--variants", "gru", "--run-seconds", "6", "--curriculum", "--budget", "9", "--reserve", "3",
                     "--min-slot", "5", "--grace", "30"]) == 0
    status = {r["name"]: r["status"] for r in drv.rows(out)}
    assert status == {"gru_h2_b1_s0": "in progress", "gru_h3_b1_s0": "not run"}
    assert not (out / "gru_h3_b1_s0").exists()
