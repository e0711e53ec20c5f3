"""``PerfConfig``: run_perf's settings, checked in one place, built by ``qvlm-bench perf`` from its flags."""

import pytest

from harness.perf.benchmark import PerfConfig, run_perf
from harness.perf.command import add_perf_parser, main, perf_config


@pytest.mark.parametrize("options,flag", [
    ({"objective": "ttft"}, "--objective"), ({"gate": "loose"}, "--gate"), ({"trained_gate": "yes"}, "--trained-gate"),
    ({"dtype": "int8"}, "--dtype"), ({"batches": []}, "--batch"), ({"batches": [0]}, "--batch"),
    ({"reps": 0}, "--reps"), ({"warmup": -1}, "--warmup"), ({"gate_tokens": 0}, "--gate-tokens"),
    ({"text_tokens": 0}, "--text-tokens"), ({"new_tokens": 2, "gate_tokens": 4}, "--new-tokens"),
    ({"time_budget_s": 0}, "--time-budget"),
])
def test_each_error_names_its_option(options, flag):
    with pytest.raises(ValueError, match=flag):
        PerfConfig(**options)


def test_run_perf_takes_a_config_or_keywords():
    cfg = PerfConfig(schemes=["w4a16"], overrides=None)
    assert cfg.overrides == {} and cfg.plan_runs == {"decode": 127, "prefill": 1}
    assert PerfConfig(objective="decode").plan_runs == {"decode": 127, "prefill": 0}
    assert PerfConfig(objective="prefill", new_tokens=8).plan_runs == {"decode": 0, "prefill": 1}
    with pytest.raises(TypeError, match="PerfConfig"):
        run_perf("qvlm-tiny-llava", ["rtn"])
    with pytest.raises(ValueError, match="--reps"):  # keywords replace a config's fields, checked again
        run_perf("qvlm-tiny-llava", cfg, reps=0, log=lambda *a: None)


def test_the_cli_builds_the_config_from_its_flags(tmp_path, capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_perf_parser(parser.add_subparsers())
    args = parser.parse_args(["perf", "--model", "m", "--schemes", "w4a4", "--batch", "1,8", "--no-graphs",
                              "--override", "w_group_size=128", "--time-budget", "60", "--out", str(tmp_path)])
    cfg = perf_config(args, ["rtn"])
    assert (cfg.schemes, cfg.batches, cfg.graphs, cfg.compile, cfg.overrides, cfg.time_budget_s, cfg.leaderboard) == (
        ["w4a4"], [1, 8], False, True, {"w_group_size": 128}, 60.0, False)
    rc = main(["perf", "--model", "m", "--new-tokens", "2", "--gate-tokens", "4", "--out", str(tmp_path)])
    assert rc == 2 and "--new-tokens 2 is below --gate-tokens 4" in capsys.readouterr().err


def test_a_perf_run_removes_what_a_killed_one_left(tmp_path, monkeypatch):
    """``run_perf`` opens its folder as the accuracy runner does: a dead writer's temporaries (a
    records file being replaced, a per-layer sidecar) are removed before the run; a live writer's
    stay; an unreadable records file is set aside."""
    import os

    from harness.perf import benchmark

    seen = {}
    monkeypatch.setattr(benchmark, "_run_in_process",
                        lambda model, cfg, log: seen.setdefault("files", sorted(
                            str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())) and [])
    (tmp_path / "perf-detail").mkdir()
    dead = 2 ** 22 + 17  # above Linux's default pid_max: no such process
    (tmp_path / f".records.jsonl.{dead}.ab12.tmp").write_text("half")
    (tmp_path / "perf-detail" / f".x.json.gz.{dead}.cd34.tmp").write_text("half")
    live = tmp_path / f".records.jsonl.{os.getpid()}.ef56.tmp"
    live.write_text("being written")
    (tmp_path / "records.jsonl").write_bytes(b"\xff\xfe not json\n")
    run_perf("qvlm-tiny-llava", out=tmp_path, device="cpu", isolate="off", log=lambda *a: None)
    files = seen["files"]
    assert live.name in files
    assert not any(str(dead) in f for f in files), files
    assert "records.jsonl.unreadable" in files  # the bad line kept aside, never deleted
    assert (tmp_path / "records.jsonl").read_text() == ""
