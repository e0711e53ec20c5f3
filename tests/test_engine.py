"""The engine's own decisions: cell identity, variant labels, the shared activation ranges, state checks."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest
import torch

from harness import cells as cells_mod
from harness.calibration import encode_pairs
from harness.suite_config import SuiteError, parse_suite
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.finalize import StateError, check_model_unchanged, finalize_state, param_checksum, validate_state
from harness.quant.quantizer import qparams
from harness.quant.ranges import SEARCH_GRID, fill_static_ranges, rule_for
from harness.quant.simulated import apply_state, quantize_activation
from harness.quant.state import QuantState
from harness.quant.ties import improves, stable_argmin
from harness.registry import get_method
from conftest import make_pairs


def _suite(model, **over):
    d = {"name": "t", "models": [str(model)], "methods": ["fp16", "rtn"], "schemes": ["w4a4"],
         "tasks": ["synth_vqav2", "synth_vizwiz"], "device": "cpu"}
    d.update(over)
    return parse_suite(d)


# ---- ties ------------------------------------------------------------------------------------

def test_ties_prefer_the_earlier_candidate_within_the_margin():
    assert stable_argmin([1.0, 1.0 - 1e-9, 2.0]) == 0  # an ulp-level "win" does not count
    assert stable_argmin([1.0, 0.99, 0.98]) == 2
    assert stable_argmin([float("nan"), 3.0, 3.0]) == 1
    assert improves(0.5, float("inf")) and not improves(1.0 - 1e-9, 1.0) and improves(0.9, 1.0)


# ---- cell identity and labels ----------------------------------------------------------------

def test_cells_share_a_state_key_per_group_and_keys_follow_dtype_and_device(tiny_llava_path):
    suite = _suite(tiny_llava_path)
    cpu = cells_mod.plan_cells(suite, "cpu")
    assert [(c.variant.label, c.scheme, c.task.name) for c in cpu] == [
        ("fp16", "w16a16", "synth_vqav2"), ("fp16", "w16a16", "synth_vizwiz"),
        ("rtn", "w4a4", "synth_vqav2"), ("rtn", "w4a4", "synth_vizwiz")]
    groups = cells_mod.group_cells(cpu)
    assert [len(g.cells) for g in groups] == [2, 2]
    assert len({c.key for c in cpu}) == 4 and len({c.state_key for c in cpu}) == 2
    assert all(c.identity["state"] == c.state_key for c in cpu)  # the state key is part of the cell key
    assert {c.dtype for c in cpu} == {"fp64"}
    gpu = cells_mod.plan_cells(suite, "cuda:1")
    assert {c.dtype for c in gpu} == {"fp16"}
    assert not {c.key for c in cpu} & {c.key for c in gpu}  # CPU records never count as done on a GPU
    assert [c.key for c in cells_mod.plan_cells(suite, "cuda:0")] == [c.key for c in gpu]
    fp32 = cells_mod.plan_cells(_suite(tiny_llava_path, dtype="fp32"), "cpu")
    assert not {c.key for c in cpu} & {c.key for c in fp32}
    rtn = [c for c in cpu if c.method == "rtn"][0]
    assert rtn.calibration is None and rtn.act_ranges is None  # per-token: RTN needs no data
    per_tensor = cells_mod.plan_cells(_suite(tiny_llava_path, quant={"a_granularity": "per_tensor"}), "cpu")
    assert [c for c in per_tensor if c.method == "rtn"][0].act_ranges["stat"] == "minmax"


def test_editing_engine_code_changes_the_keys(tiny_llava_path, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    for rel in cells_mod.STATE_CODE + cells_mod.EVAL_CODE:
        src = cells_mod.REPO / rel
        dst = repo / rel
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, dst)
    monkeypatch.setattr(cells_mod, "REPO", repo)
    cells_mod.code_digest.cache_clear()
    try:
        suite = _suite(tiny_llava_path)
        before = cells_mod.plan_cells(suite, "cpu")
        (repo / "harness/quant/quantizer.py").write_text((repo / "harness/quant/quantizer.py").read_text() + "\n# edit\n")
        cells_mod.code_digest.cache_clear()
        after = cells_mod.plan_cells(suite, "cpu")
        assert all(a.state_key != b.state_key and a.key != b.key for a, b in zip(before, after))
        (repo / "tasks/metrics.py").write_text((repo / "tasks/metrics.py").read_text() + "\n# edit\n")
        cells_mod.code_digest.cache_clear()
        scored = cells_mod.plan_cells(suite, "cpu")
        assert all(a.state_key == b.state_key and a.key != b.key for a, b in zip(after, scored))
    finally:
        cells_mod.code_digest.cache_clear()


def test_variant_labels_name_non_default_options_presets_and_the_clip_lever(tiny_llava_path, monkeypatch):
    from methods.qvlm.method import QVLMBase

    monkeypatch.setattr(QVLMBase, "presets", {"fast": {"search_batches": 2, "veo_epochs": 1}})
    suite = _suite(tiny_llava_path, methods=[
        "rtn", {"name": "rtn", "act_clip_search": True}, {"name": "gptq", "options": {"percdamp": 0.1}},
        {"name": "qvlm", "options": {"search_batches": 2, "veo_epochs": 1}},
        {"name": "qvlm", "options": {"search_batches": 2, "veo_epochs": 1, "max_block": 2}},
        {"name": "awq", "label": "awq-mine"}])
    labels = [v.label for v in cells_mod.resolve_variants(suite)]
    assert labels == ["rtn", "rtn+clip", "gptq (percdamp=0.1)", "qvlm (fast)", "qvlm (fast, max_block=2)", "awq-mine"]
    with pytest.raises(SuiteError, match="same row 'rtn'"):
        cells_mod.resolve_variants(_suite(tiny_llava_path, methods=["rtn", {"name": "rtn", "options": {}}]))
    with pytest.raises(SuiteError, match="float reference"):
        cells_mod.resolve_variants(_suite(tiny_llava_path, methods=[{"name": "fp16", "act_clip_search": True}]))


def test_the_old_clip_key_still_reads_with_a_deprecation_message(tiny_llava_path, monkeypatch, caplog):
    """A suite's ``clip: true`` (the key's old name) is ``act_clip_search: true``, with a
    DeprecationWarning and one console message naming the new key; both keys at once are refused."""
    from harness import suite_config

    monkeypatch.setattr(suite_config, "_WARNED", set())
    with pytest.warns(DeprecationWarning, match="write `act_clip_search: true`"):
        suite = _suite(tiny_llava_path, methods=["rtn", {"name": "rtn", "clip": True}, {"name": "gptq", "clip": True}])
    assert [m.act_clip_search for m in suite.methods] == [False, True, True]
    assert [v.label for v in cells_mod.resolve_variants(suite)] == ["rtn", "rtn+clip", "gptq+clip"]
    console = [r.getMessage() for r in caplog.records if "act_clip_search" in r.getMessage()]
    assert len(console) == 1 and "`clip` is deprecated" in console[0]
    new = _suite(tiny_llava_path, methods=["rtn", {"name": "rtn", "act_clip_search": True}])
    assert [c.key for c in cells_mod.plan_cells(new, "cpu")] == [c.key for c in cells_mod.plan_cells(
        _suite(tiny_llava_path, methods=["rtn", {"name": "rtn", "clip": True}]), "cpu")]
    with pytest.raises(SuiteError, match="both `clip` and `act_clip_search`"):
        _suite(tiny_llava_path, methods=[{"name": "rtn", "clip": True, "act_clip_search": True}])
    with pytest.raises(SuiteError, match="`act_clip_search` of method 'rtn' must be true or false"):
        _suite(tiny_llava_path, methods=[{"name": "rtn", "clip": "yes"}])


def test_a_local_model_path_that_does_not_exist_is_rejected_before_loading(tmp_path):
    with pytest.raises(SuiteError, match="local path that does not exist"):
        _suite(tmp_path / "nope")


# ---- the shared activation ranges --------------------------------------------------------------

@pytest.fixture()
def padded_calib(tiny_lm):
    """Calibration batches with left padding (prompts of different lengths)."""
    return encode_pairs(tiny_lm, make_pairs(12, seed=3), batch_size=6)


def _inputs(model, state, batches, names, real_only=True):
    """Independent reference: each linear's input rows with ``state`` applied (acts off)."""
    seen = {n: [] for n in names}
    off = QuantState(state.method, state.config, {n: replace(lq, act=None) for n, lq in state.linears.items()},
                     state.float_params)
    handle = apply_state(model, off)
    hooks = []
    try:
        cur = {}
        for n in names:
            hooks.append(model.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, _n=n: seen[_n].append(a[0][cur["m"]] if real_only else a[0].reshape(-1, a[0].shape[-1]))))
        with torch.no_grad():
            for b in batches:
                cur["m"] = b["attention_mask"].bool()
                model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        handle.restore()
    return {n: torch.cat(v, 0).double() for n, v in seen.items()}


def test_minmax_ranges_come_from_real_tokens_of_the_quantized_weights_stream(tiny_lm, padded_calib):
    qcfg = parse_scheme("w4a4", a_granularity="per_tensor")
    pad = tiny_lm.processor.tokenizer.pad_token_id
    with torch.no_grad():  # padding that carries a spike (past RMSNorm too) must not widen any range
        emb = tiny_lm.model.get_input_embeddings().weight
        emb[pad] = 0.0
        emb[pad, 0] = 1.0
    state = rtn_state(tiny_lm.model, qcfg, "rtn")
    batches = list(padded_calib.inputs())
    assert any(not bool(b["attention_mask"].all()) for b in batches)
    summary = fill_static_ranges(tiny_lm.model, state, batches, rule_for(qcfg))
    assert summary["filled"] == len(state.linears) == 14
    names = list(state.linears)
    real = _inputs(tiny_lm.model, state, batches, names)
    every = _inputs(tiny_lm.model, state, batches, names, real_only=False)
    differs = 0
    for n in names:
        x = real[n]
        scale, zero = qparams(torch.tensor([float(x.min()), float(x.max())]), 4, True, 1.0, dim=0)
        assert torch.equal(state.linears[n].act.scale, scale) and torch.equal(state.linears[n].act.zero, zero)
        differs += float(every[n].abs().max()) != float(x.abs().max())
    assert differs > 0  # padding positions would have changed some ranges


def test_quantized_stream_takes_each_layer_after_the_earlier_layers_quantizers(tiny_lm, padded_calib):
    qcfg = parse_scheme("w4a4", a_granularity="per_tensor")
    batches = list(padded_calib.inputs())
    w = rtn_state(tiny_lm.model, qcfg, "rtn")
    fill_static_ranges(tiny_lm.model, w, batches, rule_for(qcfg, stream="weights"))
    q = rtn_state(tiny_lm.model, qcfg, "rtn")
    fill_static_ranges(tiny_lm.model, q, batches, rule_for(qcfg, stream="quantized"))
    layer0 = [n for n in q.linears if ".layers.0." in n]
    layer1 = [n for n in q.linears if ".layers.1." in n]
    first = layer0[0]
    assert torch.equal(q.linears[first].act.scale, w.linears[first].act.scale)  # nothing before it
    # independent reference for layer 1: layer 0 runs its filled quantizers, later ones are off
    ref_state = QuantState("rtn", qcfg, {n: (lq if n in layer0 else replace(lq, act=None))
                                         for n, lq in q.linears.items()})
    seen = {n: [] for n in layer1}
    handle = apply_state(tiny_lm.model, ref_state)
    hooks, cur = [], {}
    try:
        for n in layer1:
            hooks.append(tiny_lm.model.get_submodule(n).register_forward_pre_hook(
                lambda _m, a, _n=n: seen[_n].append(a[0][cur["m"]])))
        with torch.no_grad():
            for b in batches:
                cur["m"] = b["attention_mask"].bool()
                tiny_lm.model(**b, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        handle.restore()
    n = layer1[0]
    x = torch.cat(seen[n])
    scale, _ = qparams(torch.tensor([float(x.min()), float(x.max())]), 4, True, 1.0, dim=0)
    assert torch.equal(q.linears[n].act.scale, scale)
    assert any(not torch.equal(q.linears[m].act.scale, w.linears[m].act.scale) for m in layer1)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_token"])
def test_clip_search_picks_the_grid_percentile_with_least_added_error(tiny_lm, padded_calib, granularity):
    qcfg = parse_scheme("w4a4", a_granularity=granularity)
    batches = list(padded_calib.inputs())
    state = rtn_state(tiny_lm.model, qcfg, "rtn")
    rule = rule_for(qcfg, act_clip_search=True)
    summary = fill_static_ranges(tiny_lm.model, state, batches, rule)
    assert summary["stat"] == "search" and set(summary["percentiles"]) == set(state.linears)
    name = next(n for n in state.linears if n.endswith("down_proj"))
    p = summary["percentiles"][name]
    # brute force in float64 over every grid value, on all real tokens (the search samples rows)
    x = _inputs(tiny_lm.model, state, batches, [name])[name]
    w = state.linears[name].dequantized().double()
    errors = []
    for q in SEARCH_GRID:
        if granularity == "per_tensor":
            lo, hi = float(x.min()), float(x.max())
            flat = x.abs().reshape(-1).sort().values
            ratio = 1.0 if q == 1.0 else float(flat[round(q * (flat.numel() - 1))]) / max(abs(lo), abs(hi))
            scale, zero = qparams(torch.tensor([lo, hi]), 4, True, ratio, dim=0)
            xq = ((torch.round(x / scale) + zero).clamp(0, 15) - zero) * scale
        else:
            s = x.abs().sort(dim=-1).values
            ratio = 1.0 if q == 1.0 else float((s[:, round(q * (s.shape[1] - 1))] / s[:, -1]).mean())
            xq = quantize_activation(x, replace(state.linears[name].act, clip_ratio=ratio))
        errors.append(float(((xq - x) @ w.T).pow(2).sum()))
    best = SEARCH_GRID[stable_argmin(errors, rtol=0.02)]
    # the search sees a sample of rows: it must pick the brute-force optimum or one within 2 %
    assert errors[SEARCH_GRID.index(p)] <= min(errors) * 1.02, (p, best, errors)
    if granularity == "per_tensor":
        assert state.linears[name].act.scale is not None


# ---- validation and finalize ---------------------------------------------------------------

def test_validation_names_the_broken_layer(tiny_lm):
    qcfg = parse_scheme("w4a4")
    good = rtn_state(tiny_lm.model, qcfg, "rtn")
    validate_state(tiny_lm.model, good, qcfg)
    name = next(iter(good.linears))
    missing = QuantState("x", qcfg, dict(list(good.linears.items())[1:]))
    with pytest.raises(StateError, match="target linears missing"):
        validate_state(tiny_lm.model, missing, qcfg)
    validate_state(tiny_lm.model, missing, qcfg, quantizes=False)  # a control may skip layers
    bad = rtn_state(tiny_lm.model, qcfg, "rtn")
    bad.linears[name].codes[0, 0] = 16
    with pytest.raises(StateError, match=f"{name}: a code 16"):
        validate_state(tiny_lm.model, bad, qcfg)
    w8 = rtn_state(tiny_lm.model, parse_scheme("w8a4"), "rtn")
    with pytest.raises(StateError, match="8-bit codes, scheme says w4"):
        validate_state(tiny_lm.model, w8, qcfg)
    noact = rtn_state(tiny_lm.model, parse_scheme("w4a16"), "rtn")
    with pytest.raises(StateError, match="no activation quantizer at a4"):
        validate_state(tiny_lm.model, noact, qcfg)


def test_a_method_that_edits_the_model_is_caught(tiny_lm):
    before = param_checksum(tiny_lm.model)
    check_model_unchanged(before, param_checksum(tiny_lm.model), "m")
    with torch.no_grad():
        tiny_lm.model.get_parameter("model.language_model.norm.weight")[3] += 1e-3
    with pytest.raises(StateError, match="changed the model"):
        check_model_unchanged(before, param_checksum(tiny_lm.model), "m")


def test_finalize_fills_ranges_and_records_rule_and_proof(tiny_lm, padded_calib):
    qcfg = parse_scheme("w4a4", a_granularity="per_tensor")
    state = get_method("rtn")().quantize(tiny_lm, qcfg, None)
    finalize_state(tiny_lm.model, state, qcfg, list(padded_calib.inputs()), rule_for(qcfg))
    assert state.meta["act_ranges"]["filled"] == 14 and state.meta["act_ranges"]["tokens"] == "real"
    assert state.meta["proof"] == {"quantized_linears": 14, "act_quantizers": 14,
                                   "max_codes_per_row": 16, "weight_bits": [4]}
