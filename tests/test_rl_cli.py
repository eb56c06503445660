"""``mamba-state rl``: a tiny run writes its files, --resume continues exactly, --scale writes JSON and a plot."""

from __future__ import annotations

import json

import pytest
import torch

from mamba_state.cli import build_parser, main
from mamba_state.errors import StateCompatibilityError
from mamba_state.rl.checkpoint import load_checkpoint

TINY = ["--horizon", "3", "--num-bits", "1", "--num-envs", "4", "--rollout-len", "8", "--epochs", "1",
        "--minibatches", "2", "--device", "cpu", "--eval-envs", "8", "--no-progress", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_parser_has_the_issue_options():
    args = build_parser().parse_args(
        ["rl", "--controller", "gru", "--horizon", "5", "--num-bits", "2", "--num-envs", "3", "--total-updates", "7",
         "--seed", "4", "--device", "cpu", "--out", "x"])
    assert (args.controller, args.horizon, args.num_bits, args.num_envs, args.total_updates, args.seed,
            args.device, args.out, args.scale) == ("gru", 5, 2, 3, 7, 4, "cpu", "x", False)
    args = build_parser().parse_args(["rl", "--scale", "--horizons", "10", "20", "--seeds", "0", "1"])
    assert args.scale and args.horizons == [10, 20] and args.seeds == [0, 1]


def test_run_and_exact_resume(tmp_path, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["rl", "--controller", "gru", "--gru-hidden", "16", "--checkpoint-every", "2", *TINY]
    assert main([*common, "--total-updates", "4", "--out", str(full)]) == 0
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "summary.json"):
        assert (full / name).exists(), name
    summary = json.loads((full / "summary.json").read_text())
    assert summary["updates"] == 4 and summary["env_steps"] == 4 * 4 * 8 and summary["eval_episodes"] == 8
    assert 0.0 <= summary["eval_success_rate"] <= 1.0 and summary["chance"] == 0.5
    assert "eval success" in capsys.readouterr().out
    # interrupted after 2 updates, then resumed to 4: the same parameters, bit for bit
    assert main([*common, "--total-updates", "2", "--out", str(part)]) == 0
    assert main([*common, "--total-updates", "4", "--out", str(part), "--resume"]) == 0
    a = load_checkpoint(full / "checkpoint.pt")["trainer"]
    b = load_checkpoint(part / "checkpoint.pt")["trainer"]
    assert a["updates"] == b["updates"] == 4
    for k, v in a["policy"].items():
        assert torch.equal(v, b["policy"][k]), k
    lines = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [m["update"] for m in lines] == [1, 2, 3, 4]
    # resuming with different options is refused
    capsys.readouterr()
    assert main([*[x if x != "3" else "5" for x in common], "--total-updates", "6", "--out", str(part),
                 "--resume"]) == 2
    err = capsys.readouterr().err
    assert "options differ from the checkpoint" in err and "horizon" in err
    assert load_checkpoint(part / "checkpoint.pt")["trainer"]["updates"] == 4  # nothing was overwritten
    with pytest.raises(StateCompatibilityError, match="horizon"):  # the library raises
        from mamba_state.rl.train import train
        train({"controller": "gru", "gru_hidden": 16, "horizon": 5, "num_envs": 4, "rollout_len": 8,
               "device": "cpu", "out": str(part), "resume": True, "progress": False})


def test_scale_writes_results_and_plot(tmp_path):
    out = tmp_path / "scale"
    assert main(["rl", "--scale", "--horizons", "2", "4", "--seeds", "0", "--total-updates", "1",
                 "--d-model", "8", "--n-layer", "1", "--d-state", "4", "--gru-hidden", "8",
                 "--backend", "reference", "--out", str(out), *[x for x in TINY if x not in ("--horizon", "3")]]) == 0
    results = json.loads((out / "scale_results.json").read_text())
    runs = {(r["controller"], r["horizon"]) for r in results["runs"]}
    assert runs == {("mamba", 2), ("mamba", 4), ("gru", 2), ("gru", 4)}
    assert {(a["controller"], a["horizon"]) for a in results["aggregate"]} == runs
    png = (out / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # --resume skips finished runs
    assert main(["rl", "--scale", "--horizons", "2", "--seeds", "0", "--controllers", "gru", "--total-updates", "1",
                 "--gru-hidden", "8", "--out", str(out), "--resume",
                 *[x for x in TINY if x not in ("--horizon", "3")]]) == 0
    again = json.loads((out / "scale_results.json").read_text())
    assert again["runs"] == results["runs"]  # earlier runs kept; the skipped one read back unchanged


def test_max_seconds_stops_early_with_a_resumable_checkpoint_and_eval_horizons(tmp_path, capsys):
    out = tmp_path / "budget"
    common = ["rl", "--controller", "gru", "--gru-hidden", "8", "--checkpoint-every", "0", *TINY,
              "--total-updates", "1000", "--out", str(out), "--eval-horizons", "1", "6"]
    # a budget of 0 s: the first update always runs, then the run stops, checkpoints and evaluates
    assert main([*common, "--max-seconds", "1e-9"]) == 0
    assert "--max-seconds" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["updates"] == 1 and summary["stopped_early"] is True
    assert set(summary["eval_at_horizons"]) == {"1", "6"}
    assert all(0.0 <= v["success_rate"] <= 1.0 for v in summary["eval_at_horizons"].values())
    assert load_checkpoint(out / "checkpoint.pt")["trainer"]["updates"] == 1  # written although not periodic
    # the budget is not part of the run's identity: resuming with another one continues (here 2 more updates)
    assert main([*common, "--max-seconds", "1e-9", "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["updates"] == 2
    lines = [json.loads(x)["update"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [1, 2]


def test_scale_with_eval_horizons_gives_a_transfer_table_and_markdown(tmp_path):
    from mamba_state.rl.scale import results_markdown, update_markdown_section

    out = tmp_path / "transfer"
    assert main(["rl", "--scale", "--horizons", "2", "--seeds", "0", "1", "--controllers", "gru",
                 "--total-updates", "1", "--gru-hidden", "8", "--eval-horizons", "3", "9", "--out", str(out),
                 *[x for x in TINY if x not in ("--horizon", "3")]]) == 0
    results = json.loads((out / "scale_results.json").read_text())
    transfer = {(t["controller"], t["train_horizon"], t["eval_horizon"]): t for t in results["transfer"]}
    assert set(transfer) == {("gru", 2, 3), ("gru", 2, 9)}
    for (_, _, h), t in transfer.items():  # every seed's own value, and their mean
        seeds = [r["eval_at_horizons"][str(h)]["success_rate"] for r in results["runs"]]
        assert t["success"] == seeds and t["success_mean"] == pytest.approx(sum(seeds) / 2)
    png = (out / "scale.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = results_markdown(results)
    assert md.count("\n| gru | 2 |") == 3  # two runs and one transfer row
    assert "H = 3" in md and "H = 9" in md
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- res:start -->\nold\n<!-- res:end -->\ntail\n")
    update_markdown_section(doc, "res", md)
    update_markdown_section(doc, "res", md)  # idempotent
    text = doc.read_text()
    assert text.startswith("intro\n<!-- res:start -->\n") and text.endswith("<!-- res:end -->\ntail\n")
    assert "old" not in text and text.count("H = 9") == 1
    update_markdown_section(tmp_path / "new.md", "res", "x")  # no markers yet: appended
    assert (tmp_path / "new.md").read_text() == "<!-- res:start -->\nx\n<!-- res:end -->\n"


def test_init_from_loads_only_the_policy_and_checks_the_architecture(tmp_path, capsys):
    src, dst = tmp_path / "src", tmp_path / "dst"
    base = ["rl", "--controller", "gru", "--gru-hidden", "8", *TINY]
    assert main([*base, "--total-updates", "2", "--out", str(src)]) == 0
    trained = load_checkpoint(src / "checkpoint.pt")["trainer"]["policy"]
    # the library loads exactly the source's parameters (another horizon: same observation and action sizes)
    from mamba_state.rl.policies import GRUPolicy
    from mamba_state.rl.train import _init_policy_from

    fresh = GRUPolicy(7, 2, hidden_size=8)  # 1 bit: 1 + 2 + 4 noise channels
    _init_policy_from(fresh, str(src), log=print)
    assert "initialised the policy from" in capsys.readouterr().out
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in trained.items())
    longer = [x if x != "3" else "9" for x in base]
    # the {controller}/{seed} template, then one update moves away from the source
    assert main([*longer, "--total-updates", "1", "--out", str(tmp_path / "t"), "--init-from",
                 str(tmp_path / "{controller}_s{seed}")]) == 2  # no such run: a message, exit status 2
    (tmp_path / "gru_s0").symlink_to(src, target_is_directory=True)
    assert main([*longer, "--total-updates", "1", "--out", str(tmp_path / "t"), "--init-from",
                 str(tmp_path / "{controller}_s{seed}")]) == 0
    moved = load_checkpoint(tmp_path / "t" / "checkpoint.pt")["trainer"]["policy"]
    assert any(not torch.equal(v, moved[k]) for k, v in trained.items())
    # another architecture is refused with the names/shapes that differ
    capsys.readouterr()
    assert main([*[x if x != "8" else "12" for x in longer], "--total-updates", "1", "--out",
                 str(tmp_path / "bad"), "--init-from", str(src)]) == 2
    assert "init_from" in capsys.readouterr().err


@pytest.mark.parametrize("extra,words", [
    (["--horizons", "2", "4"], ["--horizons", "--scale"]),
    (["--seeds", "0", "1", "--controllers", "gru"], ["--seeds --controllers", "--scale"]),
    (["--total-updates", "-1"], ["total_updates", ">= 0", "-1"]),
    (["--max-seconds", "-5"], ["max_seconds", "-5"]),
])
def test_options_that_would_be_ignored_or_are_invalid_are_refused(tmp_path, capsys, extra, words):
    out = tmp_path / "run"
    assert main(["rl", "--controller", "gru", "--gru-hidden", "8", "--out", str(out), *TINY, *extra]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    assert not (out / "checkpoint.pt").exists()


def test_scale_with_no_training_still_writes_its_plot(tmp_path):
    """Zero updates give no throughput (NaN) and horizon 0 cannot sit on a log axis: the plot falls back to
    linear axes instead of failing."""
    out = tmp_path / "scale0"
    assert main(["rl", "--scale", "--horizons", "0", "2", "--seeds", "0", "--controllers", "gru", "--total-updates",
                 "0", "--gru-hidden", "8", "--out", str(out), *[x for x in TINY if x not in ("--horizon", "3")]]) == 0
    assert (out / "scale.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dt_range_is_part_of_the_run_and_older_checkpoints_still_resume(tmp_path, capsys):
    """``--dt-min/--dt-max`` change the run (a resume with another range is refused); a checkpoint written
    before these options existed resumes under the defaults (the values it was trained with)."""
    out = tmp_path / "run"
    base = ["rl", "--controller", "mamba", "--d-model", "8", "--n-layer", "1", "--d-state", "4",
            "--backend", "reference", "--out", str(out), *TINY]
    assert main([*base, "--total-updates", "1"]) == 0
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["run"]["dt_min"] == 0.001 and ckpt["run"]["dt_max"] == 0.1
    capsys.readouterr()
    assert main([*base, "--total-updates", "2", "--resume", "--dt-min", "2e-4"]) == 2
    assert "dt_min" in capsys.readouterr().err
    # the same checkpoint without the new keys, as an older version wrote it
    for key in ("dt_min", "dt_max"):
        del ckpt["run"][key]
    torch.save(ckpt, out / "checkpoint.pt")
    assert main([*base, "--total-updates", "2", "--resume"]) == 0


def test_defaults_are_a_quick_cpu_run_and_the_old_ones_stay_reachable():
    from mamba_state.rl.defaults import DEFAULTS, DEFAULTS_0_1

    args = build_parser().parse_args(["rl"])
    assert (args.horizon, args.num_envs, args.minibatches, args.total_updates, args.d_model, args.num_layers,
            args.gru_hidden, args.threads, args.device) == (16, 32, 2, 100, 32, 1, 32, None, "auto")
    old = build_parser().parse_args(["rl", "--horizon", "1000", "--num-envs", "64", "--minibatches", "4",
                                     "--d-model", "64", "--n-layer", "2", "--gru-hidden", "120", "--threads", "0"])
    assert {k: getattr(old, k) for k in DEFAULTS_0_1} == DEFAULTS_0_1
    assert all(DEFAULTS[k] != v for k, v in DEFAULTS_0_1.items() if k != "threads")


def test_one_thread_on_cpu_by_default_restored_after_and_eta_without_tqdm(tmp_path, monkeypatch):
    import sys

    from mamba_state.rl.train import train

    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm missing: plain progress lines with an ETA
    torch.set_num_threads(2)
    base = {"controller": "gru", "gru_hidden": 8, "horizon": 3, "num_envs": 4, "rollout_len": 8, "epochs": 1,
            "minibatches": 2, "eval_envs": 8, "device": "cpu", "checkpoint_every": 0}
    lines: list[str] = []
    train({**base, "total_updates": 10, "out": str(tmp_path / "a")}, log=lines.append)
    assert torch.get_num_threads() == 2  # restored
    assert json.loads((tmp_path / "a" / "config.json").read_text())["torch_threads"] == 1
    progress = [ln for ln in lines if ln.startswith("update 10/10")]
    assert len(progress) == 1 and "eta=00:00" in progress[0] and "elapsed=" in progress[0], lines
    train({**base, "total_updates": 1, "threads": 0, "progress": False, "out": str(tmp_path / "b")}, log=print)
    assert json.loads((tmp_path / "b" / "config.json").read_text())["torch_threads"] == 2  # torch's own count
    with pytest.raises(ValueError, match="threads"):
        train({**base, "threads": -1, "out": str(tmp_path / "c")})


def test_every_command_line_documented_in_rl_md_parses():
    """docs/rl.md's `mamba-state rl ...` and `torchrun ... -m mamba_state.cli rl ...` lines, placeholders filled in."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "rl.md").read_text().replace("\\\n", " ")
    fill = {"{mamba,gru}": "mamba", "{0,1}": "0", "H1 H2 ...": "8 16", "[run options]": "", "[": "", "]": ""}
    letters = {"H": "16", "K": "1", "N": "8", "U": "3", "S": "0", "D": "cpu"}
    commands = []
    for line in text.splitlines():
        line = line.strip().strip("`")
        if not (line.startswith("mamba-state rl") or (line.startswith("torchrun") and "mamba_state.cli rl" in line)):
            continue
        argv = line.split(" rl", 1)[1]
        for a, b in fill.items():
            argv = argv.replace(a, b)
        tokens = [letters.get(t, t) for t in shlex.split(argv)]
        if "..." in tokens:  # "rl ... --out DIR --resume": a sketch, not a command
            continue
        commands.append(tokens)
    assert len(commands) >= 10
    for tokens in commands:
        args = build_parser().parse_args(["rl", *tokens])  # argparse exits on an unknown option
        assert args.command == "rl"
