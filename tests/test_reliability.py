"""Issue 30, "nothing lost, nothing wrong": each fault injected as it happens to users (a corrupted
cache, a torn or short write, a second driver, an unsafe name, unusable folders, a kill while
writing, bad inputs) and what must hold after it (docs/reliability.md has the table)."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from board_data import scores, write_run
from harness.cli import main
from harness.suite_config import SuiteError, parse_suite
from harness.records import append_record, read_records, write_jsonl
from harness.runner import run_suite
from harness.samples import read_samples
from toy_task import write_toy_task

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_include(tmp_path_factory):
    return write_toy_task(tmp_path_factory.mktemp("toy"))


def suite_dict(model, include, out, **over):
    d = {"name": "toy", "models": [str(model)], "methods": ["fp16", "rtn"], "schemes": ["w4a4"],
         "tasks": ["toy_colors"], "include_paths": [str(include)], "calibration": {"task": "toy_colors", "n": 8},
         "batch_size": 4, "limit": 6, "output": str(out), "device": "cpu"}
    d.update(over)
    return d


def by_method(path: Path) -> dict[str, dict]:
    return {r["method"]: r for r in read_records(path)}


# ---- 1. a corrupted cached state is recomputed, never a silent wrong number ----------------------

def test_corrupted_cached_state_is_recomputed_with_a_warning(tiny_llava_path, toy_include, tmp_path, caplog):
    out = tmp_path / "out"
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, out, methods=["rtn"], limit=12))
    run_suite(suite, show_progress=False)
    first = by_method(out / "records.jsonl")["rtn"]
    generations = [r["generation"] for r in read_samples(out / first["samples_file"])]
    state_file = out / "cache" / "states" / first["state_key"] / "state.safetensors"
    # overwrite 30 % of the tensor bytes, the safetensors header intact (the issue's repro)
    data = bytearray(state_file.read_bytes())
    header = 8 + int.from_bytes(data[:8], "little")
    body = len(data) - header
    data[header: header + int(0.3 * body)] = os.urandom(int(0.3 * body))
    state_file.write_bytes(bytes(data))
    (out / "records.jsonl").unlink()
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        assert run_suite(suite, show_progress=False).ok == 1
    again = by_method(out / "records.jsonl")["rtn"]
    assert again["state_cached"] is False  # recomputed, not loaded
    assert [r["generation"] for r in read_samples(out / again["samples_file"])] == generations  # the same answers, question by question
    assert again["value"] == first["value"] and again["proof"] == first["proof"]
    assert "ignoring cached state" in caplog.text and "state.safetensors does not match its sha256" in caplog.text


def test_a_state_whose_bytes_verify_but_content_is_wrong_fails_the_state_checks(tiny_lm, tmp_path):
    """Checksums vouch for the bytes, not for the state: a loaded state passes the same checks as a
    fresh one (codes below 2^bits, finite scales, the proof)."""
    from harness.quant.build import rtn_state
    from harness.quant.config import parse_scheme
    from harness.quant.finalize import StateError, finalize_state
    from harness.quant.state import CorruptStateError, QuantState
    from harness.worker import check_loaded_state

    qcfg = parse_scheme("w4a4")
    state = finalize_state(tiny_lm.model, rtn_state(tiny_lm.model, qcfg, "rtn"), qcfg, None, None)

    class Cell:  # what check_loaded_state reads of a planned cell
        pass
    cell = Cell()
    cell.qcfg = qcfg
    cell.variant = type("V", (), {"cls": type("M", (), {"quantizes": True})})()
    path = state.save(tmp_path / "good")
    check_loaded_state(tiny_lm, QuantState.load(path), cell)  # a sound state passes

    name = next(iter(state.linears))
    state.linears[name].codes[0, 0] = 200  # ≥ 2^4: saved with valid checksums all the same
    bad = QuantState.load(state.save(tmp_path / "bad"))
    with pytest.raises(StateError, match="≥ 2\\^4"):
        check_loaded_state(tiny_lm, bad, cell)
    state.linears[name].codes[0, 0] = 1
    state.meta["proof"] = {**state.meta["proof"], "quantized_linears": 3}
    with pytest.raises(StateError, match="stored proof"):
        check_loaded_state(tiny_lm, QuantState.load(state.save(tmp_path / "proof")), cell)
    # one flipped byte of a saved state: refused by name, before anything reads the tensors
    raw = bytearray((path / "state.safetensors").read_bytes())
    raw[-5] ^= 0xFF
    (path / "state.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CorruptStateError, match="state.safetensors does not match its sha256"):
        QuantState.load(path)


# ---- 2. a torn line never swallows the next record; short writes roll back ------------------------

def test_append_after_a_torn_line_starts_on_a_fresh_line_and_the_torn_line_is_reported(tmp_path, caplog):
    path = tmp_path / "records.jsonl"
    append_record(path, {"config_hash": "a", "status": "ok"})
    with open(path, "a") as f:  # a crash mid-append: half a record, no newline
        f.write('{"config_hash": "b", "status": "fai')
    append_record(path, {"config_hash": "c", "status": "ok"})
    with caplog.at_level(logging.WARNING, logger="qvlm_bench"):
        recs = read_records(path)
    assert [r["config_hash"] for r in recs] == ["a", "c"]
    assert f"{path} line 2 is not a complete record" in caplog.text
    # the driver that holds the folder moves the torn line aside (kept, not deleted)
    from harness.records import set_aside_unreadable

    assert set_aside_unreadable(path) == [2]
    assert [r["config_hash"] for r in read_records(path)] == ["a", "c"]
    assert path.read_text().count("\n") == 2
    assert '"config_hash": "b", "status": "fai' in path.with_name("records.jsonl.unreadable").read_text()


def test_a_short_write_is_rolled_back_and_named(tmp_path, monkeypatch):
    """A full disk: the first write lands half the line, the second fails with ENOSPC. The file
    keeps its complete records only, and the error names the file."""
    from harness import records

    path = tmp_path / "records.jsonl"
    append_record(path, {"config_hash": "a", "status": "ok"})
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def short_write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(records.os, "write", short_write)
    with pytest.raises(OSError, match=f"could not append a record to {path}: No space left") as exc:
        append_record(path, {"config_hash": "b", "status": "failed", "error": "x" * 200})
    monkeypatch.setattr(records.os, "write", real_write)
    assert path.read_bytes() == before and len(calls) == 2
    assert type(exc.value).__name__ == "RecordWriteError"  # `qvlm-bench run` exits 1 with its message
    append_record(path, {"config_hash": "c", "status": "ok"})
    assert [r["config_hash"] for r in read_records(path)] == ["a", "c"]


def test_a_torn_last_record_costs_one_cell_and_the_next_run_restores_it(tiny_llava_path, toy_include,
                                                                         tmp_path):
    out = tmp_path / "out"
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, out))
    run_suite(suite, show_progress=False)
    first = by_method(out / "records.jsonl")
    raw = (out / "records.jsonl").read_bytes()
    (out / "records.jsonl").write_bytes(raw[: len(raw) - 40])  # the last record cut short
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.skipped) == (1, 1)
    final = by_method(out / "records.jsonl")  # readable: not glued onto the torn line
    assert {m: r["value"] for m, r in final.items()} == {m: r["value"] for m, r in first.items()}
    assert (out / "records.jsonl.unreadable").exists()
    assert main(["table", str(out), "--no-plots", "--resamples", "100"]) == 0
    assert "–" not in (out / "leaderboard.md").read_text().split("\n\n")[0]


# ---- 3. one driver per results folder --------------------------------------------------------------

DRIVER = """
import json, sys, time
sys.path.insert(0, {repo!r})
from harness.suite_config import parse_suite
from harness.registry import Method, register_method
from harness.runner import run_suite

class Waiting(Method):  # a quantization that takes until the process is killed
    name = "test-waiting"
    summary = "never finishes"

    def quantize(self, lm, qcfg, calib):
        print("quantizing", flush=True)
        time.sleep(600)

register_method(Waiting)
run_suite(parse_suite(json.loads({data!r})), show_progress=False)
"""


def test_a_second_driver_is_refused_naming_the_first_and_a_killed_one_blocks_nothing(
        tiny_llava_path, toy_include, tmp_path, capsys, isolated_registry):
    """Driver A (another process) is mid-suite when driver B starts on the same folder: B stops at
    once naming A's pid. A is killed (-9): its lock file stays but the lock is gone, B runs, and
    every cell is recorded exactly once."""
    from harness.quant.build import rtn_state
    from harness.registry import Method, register_method

    class Waiting(Method):  # the same method in this process (driver B), quick here
        name = "test-waiting"
        summary = "rtn"

        def quantize(self, lm, qcfg, calib):
            return rtn_state(lm.model, qcfg, self.name)
    register_method(Waiting)
    out = tmp_path / "out"
    data = suite_dict(tiny_llava_path, toy_include, out, methods=["fp16", "test-waiting"])
    a = subprocess.Popen([sys.executable, "-c", DRIVER.format(repo=str(REPO), data=json.dumps(data))],
                         stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert a.stdout.readline().strip() == "quantizing"  # fp16 recorded, the second cell under way
        with pytest.raises(Exception, match=f"in use by another qvlm-bench run \\(pid {a.pid}\\)"):
            run_suite(parse_suite(data), show_progress=False)
        path = tmp_path / "suite.yaml"
        path.write_text(yaml.safe_dump(data))
        assert main(["run", str(path), "-q"]) == 2
        assert f"pid {a.pid}" in capsys.readouterr().err
        assert [r["method"] for r in read_records(out / "records.jsonl")] == ["fp16"]
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    summary = run_suite(parse_suite(data), show_progress=False)
    assert (summary.ok, summary.skipped) == (1, 1)
    assert sorted(r["method"] for r in read_records(out / "records.jsonl")) == ["fp16", "test-waiting"]


# ---- 4. the suite name is one safe path component --------------------------------------------------

@pytest.mark.parametrize("name", ["..", ".", "../../etc/x", "/tmp/abs", "a/b", "a b", ""])
def test_a_suite_name_that_is_a_path_is_rejected(name, tiny_llava_path, toy_include, tmp_path):
    with pytest.raises(SuiteError, match="`name` is .*one plain folder name: letters, digits"):
        parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, name=name, output=None))


def test_a_plain_suite_name_is_accepted(tiny_llava_path, toy_include, tmp_path):
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, name="w4-sweep_v1.2", output=None))
    assert suite.output_dir == Path("results") / "w4-sweep_v1.2"


# ---- 5. errors name the file and the fix; a failed re-tabulation is a non-zero exit -------------

def test_a_garbage_samples_line_names_the_file_and_the_table_is_still_written(tmp_path, capsys):
    folder = write_run(tmp_path / "r", {("fp16", "w16a16", "t"): scores(40, 30),
                                        ("rtn", "w4a4", "t"): scores(40, 20, seed=1)})
    rec = json.loads((folder / "records.jsonl").read_text().splitlines()[1])
    samples = folder / rec["samples_file"]
    samples.write_text(samples.read_text() + "not json\n")
    assert main(["table", str(folder), "--no-plots", "--resamples", "100"]) == 0
    out = capsys.readouterr().out
    assert f"{samples} line 41" in out and "samples file unreadable" in out


def test_a_failed_retabulation_after_a_run_exits_nonzero(tiny_llava_path, toy_include, tmp_path, capsys,
                                                         monkeypatch):
    from harness.report import write

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite_dict(tiny_llava_path, toy_include, tmp_path / "out", methods=["fp16"])))

    def broken(*a, **k):
        raise ValueError("model m has two reference rows")
    monkeypatch.setattr(write, "build_board", broken)
    assert main(["run", str(path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "the leaderboard in" in err and "from an earlier tabulation" in err and "two reference rows" in err


def test_an_unusable_results_folder_stops_the_run_before_the_model_loads(tiny_llava_path, toy_include, tmp_path,
                                                                         monkeypatch):
    import shutil

    from harness.models import loading

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the folder was checked")
    monkeypatch.setattr(loading, "load_model", no_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(Exception, match=f"results folder {blocker / 'out'} is not writable .*--output"):
        run_suite(parse_suite(suite_dict(tiny_llava_path, toy_include, blocker / "out")), show_progress=False)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10 * 2**20))
    with pytest.raises(Exception, match="has 10 MB free, less than the 64 MB"):
        run_suite(parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path / "out")), show_progress=False)


def test_a_failing_cleanup_never_masks_the_write_error(tmp_path, monkeypatch):
    def fail_open(self, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    def fail_unlink(self, *a, **k):
        raise PermissionError("the cleanup failed too")
    monkeypatch.setattr(Path, "open", fail_open)
    monkeypatch.setattr(Path, "unlink", fail_unlink)
    with pytest.raises(OSError, match="Read-only file system") as exc:
        write_jsonl(tmp_path / "s.jsonl", [{"a": 1}])
    assert exc.value.__context__ is None


# ---- 6. atomic leaderboard files; leftovers of kills cleaned; a finished state adopted ------------

def test_a_kill_while_tabulating_leaves_the_previous_tables_whole(tmp_path, monkeypatch):
    import pandas as pd

    from harness.report.write import write_leaderboard

    folder = write_run(tmp_path / "r", {("fp16", "w16a16", "t"): scores(40, 30),
                                        ("rtn", "w4a4", "t"): scores(40, 20, seed=1)})
    write_leaderboard(folder, n_resamples=100, plots=False)
    names = ["leaderboard.csv", "leaderboard.md", "leaderboard.tex", "leaderboard.html"]
    before = {n: (folder / n).read_bytes() for n in names}

    def killed(self, path=None, *a, **k):  # the process dies with the csv half written
        Path(path).write_text("model,vari")
        raise KeyboardInterrupt
    monkeypatch.setattr(pd.DataFrame, "to_csv", killed)
    with pytest.raises(KeyboardInterrupt):
        write_leaderboard(folder, n_resamples=100, plots=False)
    assert {n: (folder / n).read_bytes() for n in names} == before
    assert not list(folder.glob(".*.tmp"))


def test_leftovers_of_killed_runs_are_cleaned_and_a_finished_state_is_adopted(tiny_llava_path, toy_include,
                                                                              tmp_path):
    out = tmp_path / "out"
    suite = parse_suite(suite_dict(tiny_llava_path, toy_include, out, methods=["rtn"]))
    run_suite(suite, show_progress=False)
    rec = by_method(out / "records.jsonl")["rtn"]
    states = out / "cache" / "states"
    key = rec["state_key"]
    # a kill after the state was written in full, before its rename
    (states / key).rename(states / f".{key}.999999999.0123456789ab.tmp")
    (out / "records.jsonl").unlink()
    # leftovers: a half-written samples file, old- and new-style state folders, a leaderboard staging
    (out / "samples" / ".x.jsonl.999999999.0123456789ab.tmp").write_text('{"doc_')
    (states / "deadbeefdeadbeef.tmp").mkdir()
    (states / ".cafecafecafecafe.999999999.0123456789ab.tmp").mkdir()
    (out / ".leaderboard.999999999.0123456789ab.tmp").mkdir()
    assert run_suite(suite, show_progress=False).ok == 1
    again = by_method(out / "records.jsonl")["rtn"]
    assert again["state_cached"] is True and again["value"] == rec["value"]  # no second quantization
    assert sorted(p.name for p in states.iterdir()) == [key]
    assert not list(out.glob(".*.tmp")) and not list((out / "samples").glob(".*.tmp"))


# ---- 7. inputs that would run nothing, run twice or mean something else are refused -------------

@pytest.mark.parametrize("over, message", [
    ({"batch_size": 0}, "`batch_size` is 0; it must be at least 1"),
    ({"limit": 0}, "`limit` is 0, which would evaluate no question; give at least 1, or null"),
    ({"tasks": []}, "`tasks` is empty, so the suite would run nothing; list at least one"),
    ({"tasks": ["toy_colors", "toy_colors"]}, "'toy_colors' is listed twice in `tasks`; list each once"),
    ({"schemes": ["w4a4", "w4a4"]}, "'w4a4' is listed twice in `schemes`"),
    ({"methods": []}, "`methods` is empty"),
])
def test_inputs_that_cannot_mean_what_they_say_are_refused(over, message, tiny_llava_path, toy_include, tmp_path):
    with pytest.raises(SuiteError) as exc:
        parse_suite(suite_dict(tiny_llava_path, toy_include, tmp_path, **over))
    assert message in str(exc.value)


def test_table_refuses_runs_of_different_suites_saying_what_differs(tmp_path, capsys):
    cells = {("fp16", "w16a16", "t"): scores(40, 30), ("rtn", "w4a4", "t"): scores(40, 20, seed=1)}
    a = write_run(tmp_path / "a", cells, seed=1, keys={k: {"limit": 40} for k in cells})
    b = write_run(tmp_path / "b", cells, seed=2, keys={k: {"limit": 12} for k in cells})
    assert main(["table", str(a), str(b), "--output", str(tmp_path / "ab"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "not runs of one suite" in err and "limit: a 40; b 12 (e.g. cell m / fp16 / w16a16 / t)" in err
    assert not (tmp_path / "ab" / "leaderboard.md").exists()
    # one folder whose latest records mix limits (two suites sharing an --output)
    mixed = write_run(tmp_path / "m", cells, keys={("fp16", "w16a16", "t"): {"limit": 40},
                                                   ("rtn", "w4a4", "t"): {"limit": 12}})
    assert main(["table", str(mixed), "--no-plots"]) == 2
    assert "made with different `limit`s (12, 40" in capsys.readouterr().err
    # seeds of one suite still combine
    c = write_run(tmp_path / "c", cells, seed=3, keys={k: {"limit": 40} for k in cells})
    assert main(["table", str(a), str(c), "--output", str(tmp_path / "ac"), "--no-plots", "--resamples", "100"]) == 0


# ---- issue 29.8: two savers of one state; a rebuilt model folder keeps its fingerprint -----------

def test_two_savers_of_one_state_key_do_not_collide(tiny_lm, tmp_path, monkeypatch):
    """Driver A writes its state, driver B saves the same key meanwhile: each writes a temporary
    folder of its own, both succeed, and the result verifies."""
    import safetensors.torch

    from harness.quant.build import rtn_state
    from harness.quant.config import parse_scheme
    from harness.quant.state import QuantState

    state = rtn_state(tiny_lm.model, parse_scheme("w4a4"), "rtn")
    real = safetensors.torch.save_file
    a_wrote, b_done = threading.Event(), threading.Event()

    def paused(tensors, filename, *args, **kwargs):
        real(tensors, filename, *args, **kwargs)
        if threading.current_thread().name == "A":
            a_wrote.set()
            assert b_done.wait(30)
    monkeypatch.setattr(safetensors.torch, "save_file", paused)
    errors = []

    def save_a():
        try:
            state.save(tmp_path / "key")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
    a = threading.Thread(target=save_a, name="A")
    a.start()
    assert a_wrote.wait(30)
    state.save(tmp_path / "key")  # B, while A is between its tensors and its JSON
    b_done.set()
    a.join()
    assert errors == []
    assert QuantState.verify(tmp_path / "key") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["key"]


def test_a_large_model_folder_is_fingerprinted_by_content_not_mtime(tmp_path, monkeypatch):
    import shutil

    import torch
    from safetensors.torch import save_file

    from harness.models import loading

    monkeypatch.setattr(loading, "FULL_HASH_BYTES", 1024)  # take the large-file path
    a = tmp_path / "a"
    a.mkdir()
    (a / "config.json").write_text('{"model_type": "llava"}')
    g = torch.Generator().manual_seed(0)
    tensors = {f"layer{i}.weight": torch.randn(64, 256, generator=g) for i in range(4)}
    save_file(tensors, str(a / "model.safetensors"))
    b = tmp_path / "b"
    shutil.copytree(a, b)
    os.utime(b / "model.safetensors", ns=(1, 1))  # a rebuilt folder: same bytes, another mtime
    assert loading.model_fingerprint(str(a)) == loading.model_fingerprint(str(b))
    tensors["layer2.weight"] = tensors["layer2.weight"] + 1e-3  # one retrained tensor
    save_file(tensors, str(b / "model.safetensors"))
    assert loading.model_fingerprint(str(a)) != loading.model_fingerprint(str(b))
