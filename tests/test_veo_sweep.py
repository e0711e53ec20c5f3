"""The VEO sweep (scripts/sweep_veo.py, results/veo-sweep): its rule, its table, and the numbers
methods/qvlm/README.md ("VEO hyper-parameters: our sweep") quotes are the committed records'; the
code's VEO defaults are the rule's outcome."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from script_helpers import load_script

REPO = Path(__file__).resolve().parents[1]
README = REPO / "methods/qvlm/README.md"
SWEEP = REPO / "results/veo-sweep"


def _script():
    return load_script("sweep_veo")


def _records() -> list[dict]:
    path = SWEEP / "records.jsonl"
    if not path.is_file():
        pytest.skip("results/veo-sweep/records.jsonl is not in this checkout")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _section() -> str:
    text = README.read_text()
    start = text.index("## VEO hyper-parameters: our sweep")
    return text[start:text.index("\n## ", start + 1)]


def _flat(text: str) -> str:
    return " ".join(text.split())


def _num(x: float) -> str:
    return f"{x:g}"


# ---- the rule, on records made up here ---------------------------------------------------------

def _fake(lr, l1, l2, ce, null):
    return [{"kind": "run", "stage": "grid", "scheme": s, "lr": lr, "lambda1": l1, "lambda2": l2,
             "rows": {"ce_q": ce}, "null": {"rows": {"ce_q": null}}} for s in ("w4a4", "w6a6")]


def test_rule_adopts_only_a_clear_win_over_the_default_and_the_null():
    sw = _script()
    default = dict(sw.DEFAULT)
    base = [0.5, 0.6, 0.4, 0.5, 0.55, 0.45, 0.5, 0.6]
    better = [x - 0.2 for x in base]
    recs = _fake(default["lr"], default["lambda1"], default["lambda2"], base, base)
    clear = recs + _fake(1e-4, 0.1, 1.0, better, base)
    pick = sw.choose(clear)
    assert pick["adopt"] and pick["chosen"] == {"lr": 1e-4, "lambda1": 0.1, "lambda2": 1.0}
    # as good as its own null: a move of that size in any direction does it, not VEO
    pick = sw.choose(recs + _fake(1e-4, 0.1, 1.0, better, better))
    assert not pick["adopt"] and pick["chosen"] == default
    # noisy rows: the interval against the default contains 0
    noisy = [x + (0.5 if i % 2 else -0.6) for i, x in enumerate(base)]
    pick = sw.choose(recs + _fake(1e-4, 0.1, 1.0, noisy, [x + 1 for x in base]))
    assert pick["best"] != default and not pick["adopt"] and pick["chosen"] == default
    # exact ties go to the smaller lr
    pick = sw.choose(recs + _fake(1e-6, 0.1, 1.0, better, base) + _fake(1e-3, 0.1, 1.0, better, base))
    assert pick["best"]["lr"] == 1e-6


# ---- the committed sweep -----------------------------------------------------------------------

def test_records_are_small_and_complete():
    recs = _records()
    assert sum(p.stat().st_size for p in SWEEP.iterdir() if p.is_file()) < 200_000
    head = recs[0]
    assert head["kind"] == "sweep" and recs[-1]["kind"] == "done"
    assert head["calibration"]["split"] == "train" and head["calibration"]["task"] == "synth_scienceqa"
    assert not set(head["calibration"]["fit_rows"]) & set(head["calibration"]["held_out_rows"])
    grid = [r for r in recs if r.get("kind") == "run" and r["stage"] == "grid"]
    n_cfg = len(head["grid"]["lr"]) * len(head["grid"]["lambda1"]) * len(head["grid"]["lambda2"])
    assert len(grid) == n_cfg * len(head["schemes"])
    assert all(len(r["rows"]["ce_q"]) == head["calibration"]["held_out"] for r in grid)


def test_table_renders_from_the_records():
    recs = _records()
    assert (SWEEP / "table.md").read_text() == _script().render(recs)


def test_code_defaults_are_the_rules_outcome():
    from methods.qvlm.encoder import VEOConfig
    from methods.qvlm.method import VEO_DEFAULTS

    sw = _script()
    chosen = sw.choose(_records())["chosen"]
    assert (VEO_DEFAULTS["veo_lr"], VEO_DEFAULTS["veo_lambda1"], VEO_DEFAULTS["veo_lambda2"]) == \
        (chosen["lr"], chosen["lambda1"], chosen["lambda2"])
    cfg = VEOConfig()
    assert (cfg.lr, cfg.lambda1, cfg.lambda2) == (chosen["lr"], chosen["lambda1"], chosen["lambda2"])


def test_readme_options_table_is_the_rule():
    sw = _script()
    recs = _records()
    pick = sw.choose(recs)
    rows = dict((m.group(1), (m.group(2), m.group(3), m.group(4))) for m in re.finditer(
        r"^\| `veo_(lr|lambda1|lambda2)` \| ([^|]+?) \| ([^|]+?) \| ([^|]+?) \|$", _section(), re.M))
    assert set(rows) == {"lr", "lambda1", "lambda2"}
    for k, (paper, before, after) in rows.items():
        assert paper == "not given"
        assert before == _num(recs[0]["default"][k]) == _num(sw.DEFAULT[k])
        assert after == _num(pick["chosen"][k])
    assert ("**Result: the defaults stay.**" in _section()) == (not pick["adopt"])


def test_readme_setup_is_the_records():
    recs = _records()
    head = recs[0]
    text = _flat(_section())
    assert f"commit {head['git']['commit'][:7]}" in text and head["git"]["dirty"] is False
    assert f"{recs[-1]['total_cpu_s']} CPU seconds in all" in text
    cal = head["calibration"]
    assert (f"{cal['pool']} rows drawn with seed {cal['seed']} by the engine's loader, shuffled with "
            f"seed {cal['split_seed']} into {cal['fit']} fit rows") in text
    assert f"and {cal['held_out']} held-out rows" in text
    grid = head["grid"]
    n_cfg = len(grid["lr"]) * len(grid["lambda1"]) * len(grid["lambda2"])
    assert (f"the {n_cfg} configurations lr ∈ {{{', '.join(map(_num, grid['lr']))}}} × λ1 ∈ "
            f"{{{', '.join(map(_num, grid['lambda1']))}}} × λ2 ∈ {{{', '.join(map(_num, grid['lambda2']))}}}") in text
    assert f"VEO ran {head['epochs']} epoch on the fit rows ({head['steps']} steps" in text
    grid_runs = [r for r in recs if r.get("kind") == "run" and r["stage"] == "grid"]
    cpu = [r["train_cpu_s"] + r["eval_cpu_s"] for r in grid_runs]
    null = [r["null_cpu_s"] for r in grid_runs]
    assert f"Each run took {min(cpu):.1f}–{max(cpu):.1f} CPU seconds" in text
    assert f"its null {min(null):.1f}–{max(null):.1f} s more" in text


def test_readme_result_is_the_rule():
    sw = _script()
    recs = _records()
    pick = sw.choose(recs)
    text = _flat(_section()).replace("−", "-")
    b = pick["best"]
    assert (f"The best configuration was lr {_num(b['lr'])}, λ1 {_num(b['lambda1'])}, λ2 {_num(b['lambda2'])}, "
            f"with a score of {pick['best_score']:.4f} against the default's {pick['default_score']:.4f}") in text
    d, n = pick["best_minus_default"], pick["best_minus_null"]
    assert f"Best - default is {d[0]:+.4f} [{d[1]:+.4f}, {d[2]:+.4f}]".replace("+-", "-") in text.replace("+-", "-")
    assert f"best - its null is {n[0]:+.4f} [{n[1]:+.4f}, {n[2]:+.4f}]" in text
    conf = sw.config_rows(recs, "confirm")
    steps = {r["steps"] for rs in conf.values() for r in rs.values()}
    epochs = {r["epochs"] for rs in conf.values() for r in rs.values()}
    (s,), (e,) = steps, epochs
    best_c = sw.mean(sw.row_scores(conf[sw.key(b)]))
    dflt_c = sw.mean(sw.row_scores(conf[sw.key(sw.DEFAULT)]))
    assert (f"Rerun at {e} epochs ({s} steps) on the same rows, its lead reversed: {best_c:.4f} "
            f"against the default's {dflt_c:.4f}") in text
    assert best_c > dflt_c


def test_readme_per_lr_table_is_the_records():
    sw = _script()
    recs = _records()
    rows = [line for line in _section().splitlines()
            if re.match(r"^\| (untuned|[0-9.e-]+) \| [0-9]", line)]
    assert rows == sw.lr_rows(recs)
    # spot checks straight from the records, not through the script's summary
    base = {r["scheme"]: r["heldout"] for r in recs if r.get("kind") == "untuned"}
    lr3 = [r for r in recs if r.get("kind") == "run" and r["stage"] == "grid" and r["lr"] == 1e-3]
    text = _flat(_section())
    assert (f"output error falls to {min(r['heldout']['err_output'] for r in lr3 if r['scheme'] == 'w4a4'):.4g} "
            f"at W4A4 (untuned {base['w4a4']['err_output']:.4g})") in text
    assert (f"to {min(r['heldout']['err_output'] for r in lr3 if r['scheme'] == 'w6a6'):.4g} at W6A6 "
            f"(untuned {base['w6a6']['err_output']:.4g})") in text
    assert (f"L_ent falls to {min(r['heldout']['ent'] for r in lr3 if r['scheme'] == 'w4a4'):.4f} and "
            f"{min(r['heldout']['ent'] for r in lr3 if r['scheme'] == 'w6a6'):.4f}") in text
    assert (f"(untuned {base['w6a6']['err_vision']:.4g}, up to "
            f"{max(r['heldout']['err_vision'] for r in lr3 if r['scheme'] == 'w6a6'):.4g} at lr 0.001)") in text


def test_readme_lottery_and_movement_are_the_records():
    sw = _script()
    recs = _records()
    runs = sw.config_rows(recs)
    text = _flat(_section())
    low = [k for k in runs if k[0] == 1e-6]
    moves = [r["move"]["max_over_rms"] * 100 for k in low for r in runs[k].values()]
    scores = [sw.mean(sw.row_scores(runs[k])) for k in low]
    base = {r["scheme"]: r for r in recs if r.get("kind") == "untuned"}
    assert (f"The {['one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine'][len(low) - 1]} "
            f"lr 1e-06 runs moved the tower by at most {max(moves):.3g} % of its RMS") in text
    assert (f"they scored {min(scores):.4f}–{max(scores):.4f} (untuned: "
            f"{sw.mean(sw.row_scores(base)):.4f})") in text
    nulls = [sw.mean(sw.row_scores(v, null=True)) for v in runs.values()]
    assert f"Random moves of the same sizes score {min(nulls):.4f}–{max(nulls):.4f} across all runs" in text
    dev = max(abs(r["heldout"][t] / base[s]["heldout"][t] - 1) for k in low for s, r in runs[k].items()
              for t in ("err_output", "err_vision", "ent"))
    assert f"left VEO's terms within {100 * dev:.1f} % of the untuned values" in text
    dflt = runs[sw.key(sw.DEFAULT)]
    mv = {f"{r['move']['max_over_rms'] * 100:.3g}" for r in dflt.values()}
    assert len(mv) == 1 and f"Max |Δw| is steps × lr for every (λ1, λ2) pair: {mv.pop()} % of the RMS at lr 1e-05 over 4 steps" in text
    conf = sw.config_rows(recs, "confirm")[sw.key(sw.DEFAULT)]["w4a4"]
    assert f"The confirmation's {conf['steps']} steps at lr 1e-05 moved it {conf['move']['max_over_rms'] * 100:.3g} % (W4A4)" in text
    # steps × lr: every grid run's max move is lr × steps (Adam's first steps), within 1 %
    for k, rs in runs.items():
        for r in rs.values():
            assert r["move"]["max_abs"] == pytest.approx(k[0] * r["steps"], rel=0.01)


@pytest.mark.slow  # ~30 s of CPU: the bundled model, one configuration at one scheme
def test_script_runs_end_to_end(tmp_path):
    sw = _script()
    out = tmp_path / "sweep"
    assert sw.main(["--out", str(out), "--lr", "1e-5", "--lambda1", "0.1", "--lambda2", "1",
                    "--schemes", "w6a6", "--pool", "16", "--fit", "8", "--confirm-epochs", "0"]) == 0
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in recs] == ["sweep", "untuned", "run", "done"]
    head, run = recs[0], recs[2]
    assert head["calibration"]["split"] == "train" and head["schemes"] == ["w6a6"]
    assert len(run["rows"]["ce_q"]) == 8 and run["steps"] == 1 and run["move"]["params_changed"] > 0
    assert run["null"]["rows"]["ce_q"] != run["rows"]["ce_q"] or run["null"]["heldout"] != run["heldout"]
    assert (out / "table.md").read_text() == sw.render(recs)
