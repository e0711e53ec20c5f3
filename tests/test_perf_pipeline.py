"""One pipeline from method to kernel: the state perf times is the state the accuracy worker scores
(``prepare_state``), the real-kernel engine applies all of it (float_params, online transforms) and
refuses what it cannot apply, and the leaderboard joins each method's own perf row."""

from __future__ import annotations

import pytest
import torch
from board_data import record, scores, write_run

from harness import cells as cells_mod
from harness.suite_config import parse_suite
from harness.perf import gate as gate_mod
from harness.perf import states as runner_mod
from harness.perf.benchmark import run_perf
from harness.perf.engine import EngineStateError, LlavaEngine, state_blocks
from harness.kernels.online import OnlineHadamard
from harness.kernels.select import select_kernels
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.simulated import apply_state
from harness.quant.state import LinearQuant
from harness.quant.transforms import FloatEdit, apply_hadamard, edited
from harness.report.write import write_leaderboard
from harness.worker import GroupWorker
from perf_helpers import interp  # noqa: F401 - fixture

BUNDLED = "qvlm-tiny-llava"


# ---- one state: the accuracy worker's and perf's ------------------------------------------------

@pytest.mark.parametrize("method", [{"name": "rtn"}, {"name": "gptq", "options": {"percdamp": 0.1}}])
def test_worker_and_perf_prepare_the_same_state(tiny_llava_path, tmp_path, monkeypatch, method):
    suite = parse_suite({"name": "t", "models": [str(tiny_llava_path)], "methods": [method],
                         "schemes": ["w4a4"], "tasks": ["synth_vqav2"], "device": "cpu",
                         "quant": {"a_granularity": "per_tensor"}, "output": str(tmp_path / "out"),
                         "calibration": {"n": 8, "batch_size": 4}})
    cell = cells_mod.plan_cells(suite, "cpu")[0]
    assert cell.dtype == "fp64" and cell.act_ranges is not None and cell.calibration is not None
    worker = GroupWorker(suite, "cpu")
    lm = worker.model(cell)
    acc_state, cached = worker.state(lm, cell, {})
    assert not cached
    # perf: the same Variant (resolved from the same suite entry), the same calibration batches
    calib = worker.calibration(lm, cell.calibration)
    monkeypatch.setattr(runner_mod, "random_calibration", lambda lm, wl, n=4: calib)
    (variant,) = [v for v in runner_mod.perf_variants([method]) if not v.reference]
    assert variant == cell.variant
    wl = runner_mod.make_workload(lm.model.config, text_tokens=8, new_tokens=2)
    perf_state, key = runner_mod.perf_state(lm, variant, cell.qcfg, wl, seed=suite.seed)
    assert key and perf_state.meta["options"] == acc_state.meta["options"] == variant.options
    assert perf_state.meta["act_ranges"] == acc_state.meta["act_ranges"]
    assert acc_state.linears.keys() == perf_state.linears.keys()
    for name, a in acc_state.linears.items():
        p = perf_state.linears[name]
        assert torch.equal(a.codes, p.codes) and torch.equal(a.scale, p.scale) and torch.equal(a.zero, p.zero)
        assert a.act.granularity == "per_tensor" and a.act.scale is not None
        assert torch.equal(a.act.scale, p.act.scale) and torch.equal(a.act.zero, p.act.zero), name


# ---- the engine applies the whole state ---------------------------------------------------------

@pytest.fixture()
def bundled64():
    from harness.models.loading import load_model

    return load_model(BUNDLED, dtype="fp64", device="cpu")


def _gate(lm, state, *, drop_float_params=False, strip_transforms=False, only=None):
    """Engine vs simulated model of ``state`` on the bundled model (fp64, CPU): the gate record."""
    wl = runner_mod.make_workload(lm.model.config, text_tokens=12, new_tokens=5, seed=1)
    ids, pix = wl.batch(1)
    handle = apply_state(lm.model, state)
    try:
        ref = gate_mod.simulated_reference(lm.model, ids, pix.to(lm.dtype), n_tokens=4)
    finally:
        handle.restore()
    if strip_transforms:
        from dataclasses import replace

        state = replace(state, linears={n: replace(lq, input_transform=None) for n, lq in state.linears.items()})
    blocks = state_blocks(lm.model, state, device="cpu", dtype=lm.dtype)
    eng = LlavaEngine(lm.model, blocks, float_params={} if drop_float_params else state.float_params)
    eng.setup(ids, pix, wl.new_tokens)
    layers = [p for m in eng.linears().values() for p in getattr(m, "parts", [m])]
    for phase, rows in (("decode", 1), ("prefill", ids.shape[1])):
        select_kernels(layers, phase, rows, dtype=lm.dtype, reps=1, only=only)
    eng.capture(warmup=1)
    return gate_mod.check(eng, ref, act_quant=state.config.quantizes_acts, policy="strict"), eng


def test_engine_applies_awq_float_params(bundled64):
    lm = bundled64
    (awq,) = [v for v in runner_mod.perf_variants(["awq"]) if not v.reference]
    wl = runner_mod.make_workload(lm.model.config, text_tokens=12, new_tokens=2)
    state, _ = runner_mod.perf_state(lm, awq, parse_scheme("w4a16"), wl)
    norms = [p for p in state.float_params if p.endswith("layernorm.weight")]
    assert norms, "AWQ folds its scales into the norms: the test needs float_params"
    g, eng = _gate(lm, state)
    assert g["layerwise_max_rel_err"] < 1e-10 and g["e2e_rel_logit_err"] < 1e-10, g
    assert g["e2e_tokens_match"] and g["passed"]
    path = norms[0]
    i = int(path.split(".layers.")[1].split(".")[0])
    ln = eng.blocks[i].ln1 if "input_layernorm" in path else eng.blocks[i].ln2
    assert torch.equal(ln, state.float_params[path].double())
    # the same codes with the float model's norms are another model: the gate sees it
    wrong, _ = _gate(lm, state, drop_float_params=True)
    assert wrong["e2e_rel_logit_err"] > 1e-3


def _hadamard_rtn_state(lm, scheme="w4a4"):
    """RTN on the model with online Hadamards before every o_proj and down_proj (FloatEdit)."""
    edit = FloatEdit(lm.model)
    from harness.models.layers import language_layers

    lang, layers = language_layers(lm.model)
    for i in range(len(layers)):
        edit.online_hadamard(f"{lang}.{i}.self_attn.o_proj")
        edit.online_hadamard(f"{lang}.{i}.mlp.down_proj")
    with edited(lm.model, edit):
        state = rtn_state(lm.model, parse_scheme(scheme), "rtn+hadamard")
    edit.to_state(state)
    return state


def test_engine_applies_an_online_hadamard(bundled64):
    lm = bundled64
    state = _hadamard_rtn_state(lm)
    online = [n for n, lq in state.linears.items() if lq.input_transform == "hadamard"]
    assert len(online) == 2 * lm.model.config.text_config.num_hidden_layers
    g, eng = _gate(lm, state)
    assert g["layerwise_max_rel_err"] < 1e-10 and g["e2e_rel_logit_err"] < 1e-10, g
    assert g["e2e_tokens_match"] and g["passed"]
    assert eng.blocks[0].o.input_transform == eng.blocks[0].down.input_transform == "hadamard"
    assert eng.blocks[0].qkv.input_transform is None
    # without the transform the engine computes another model (codes were made from W·H)
    wrong, _ = _gate(lm, state, strip_transforms=True)
    assert wrong["e2e_rel_logit_err"] > 1e-3


@pytest.mark.parametrize("n", [256, 768, 11008, 18944])  # 1 · 256; 12 · 64, 344 · 32, 148 · 128
def test_online_hadamard_is_apply_hadamard(n):
    x = torch.randn(5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.equal(OnlineHadamard(n)(x), apply_hadamard(x))


def test_online_hadamard_builds_its_matrices_once(monkeypatch):
    """Graph-capturable: after the first (eager) call the transform multiplies only by matrices it
    holds on the input's device — no host matrix is built or copied again (a host-to-device copy
    synchronizes, and on an H100 that sent QuaRot's prefill and decode out of their CUDA graphs)."""
    from harness.kernels import online
    from harness.quant import transforms

    made = []

    def counting(fn):
        def wrapper(n):
            made.append((fn.__name__, n))
            return fn(n)
        return wrapper

    monkeypatch.setattr(online, "_sylvester", counting(transforms._sylvester))
    monkeypatch.setattr(online, "_dense_factor", counting(transforms._dense_factor))
    t = OnlineHadamard(11008)  # 344 · 32
    x = torch.randn(3, 11008, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    first = t(x)
    assert sorted(made) == [("_dense_factor", 344), ("_sylvester", 32)]
    made.clear()
    assert torch.equal(t(x), first) and made == []
    assert all(m.device == x.device and m.dtype == x.dtype for m in t._factor.values())


def test_engine_refuses_state_content_it_cannot_apply(bundled64):
    from dataclasses import replace

    lm = bundled64
    state = rtn_state(lm.model, parse_scheme("w4a16"), "rtn")
    lang = "model.language_model.layers"

    vision = replace(state, linears={**state.linears,
                                     "model.vision_tower.encoder.layers.0.mlp.fc1": LinearQuant(bits=16)})
    with pytest.raises(EngineStateError, match="outside the decoder"):
        state_blocks(lm.model, vision, device="cpu", dtype=lm.dtype)
    q = f"{lang}.0.self_attn.q_proj"
    unknown = replace(state, linears={**state.linears, q: replace(state.linears[q], input_transform="rotate")})
    with pytest.raises(EngineStateError, match="rotate"):
        state_blocks(lm.model, unknown, device="cpu", dtype=lm.dtype)
    both = replace(state, float_params={f"{q}.weight": lm.model.get_parameter(f"{q}.weight").detach()})
    with pytest.raises(EngineStateError, match="codes"):
        state_blocks(lm.model, both, device="cpu", dtype=lm.dtype)
    stray = {"model.language_model.rotary_emb.extra": torch.ones(3)}
    blocks = state_blocks(lm.model, state, device="cpu", dtype=lm.dtype)
    with pytest.raises(EngineStateError, match="does not read"):
        LlavaEngine(lm.model, blocks, float_params=stray)
    with pytest.raises(EngineStateError, match="does not read"):
        state_blocks(lm.model, replace(state, float_params=stray), device="cpu", dtype=lm.dtype)


# ---- perf rows -----------------------------------------------------------------------------------

def test_perf_rows_carry_the_variant_label_options_and_state_key(tiny_llava_path, tmp_path):
    recs = run_perf(str(tiny_llava_path), methods=["rtn", {"name": "rtn", "act_clip_search": True}],
                    schemes=["w4a16"], batches=[1], out=tmp_path, new_tokens=3, text_tokens=8,
                    warmup=1, reps=1, gate_tokens=2, device="cpu", dtype="fp32",
                    trained_gate="off", compile=False, graphs=False, log=lambda *a: None)
    assert [(r["variant"], r["scheme"], r["reference"]) for r in recs] == [
        ("fp16", "w16a16", True), ("rtn", "w4a16", False), ("rtn+clip", "w4a16", False)]
    rtn, clip = recs[1:]
    assert rtn["status"] == clip["status"] == "ok" and rtn["gate"]["passed"]
    assert rtn["state_key"] and rtn["state_key"] != clip["state_key"] and rtn["config_hash"] != clip["config_hash"]
    assert rtn["method_options"] == {} and clip["clip"] is True


# ---- the leaderboard joins each method's own perf row -------------------------------------------

def _perf(method, scheme, decode_ms, *, reference=False, **qc):
    q = parse_scheme(scheme)
    rec = record(method, scheme, None, metric="perf", value=None, batch_size=1, kernel=f"k-{method}",
                 reference=reference, latency={"decode_ms_per_token": decode_ms},
                 memory={"peak_bytes": int(decode_ms * 2**30)}, quant_config={"w_bits": q.w_bits, "a_bits": q.a_bits, **qc})
    # the accuracy rows' calibration set (board_data.record's, of their task "t"): the same state
    rec["calibration"] = dict(rec["calibration"], task="t", digest="perf records add the set's digest")
    return rec


def test_leaderboard_joins_each_methods_own_perf_row(tmp_path):
    cells = {("fp16", "fp64 (reference)", "w16a16", "t"): scores(60, 50, 1), ("rtn", None, "w4a4", "t"): scores(60, 40, 2),
             ("awq", None, "w4a4", "t"): scores(60, 45, 3)}
    perf = [_perf("fp16", "w16a16", 6.0, reference=True), _perf("awq", "w4a4", 4.7), _perf("rtn", "w4a4", 4.1),
            _perf("awq", "w4a4", 9.9, w_group_size=128)]  # another configuration: not awq's row
    for p in perf:
        p["variant"] = p["method"]
    ref_key = ("fp16", "fp64 (reference)", "w16a16", "t")
    folder = write_run(tmp_path / "run", cells, extra_records=perf, keys={ref_key: {"reference": True}})
    from harness.report.board import Run, build_board
    from harness.records import read_records

    board = build_board([Run("run", folder, read_records(folder / "records.jsonl"))], n_resamples=200)
    t = board.table
    lat = {row[1]: t.at[row, "decode ms/tok"] for row in t.index}
    kern = {row[1]: t.at[row, "kernel"] for row in t.index}
    assert lat == {"fp64 (reference)": 6.0, "rtn": 4.1, "awq": 4.7}, lat
    assert kern == {"fp64 (reference)": "k-fp16", "rtn": "k-rtn", "awq": "k-awq"}
    assert "| 4.70 " in next(line for line in write_leaderboard(folder)["md"].read_text().splitlines()
                             if "| awq " in line)



def test_the_joined_latency_column_keeps_one_dtype(tmp_path):
    """A perf run re-times a tinygemm variant (and its baseline) in bf16 after the fp16 pass: the
    joined column stays in the dtype most rows were timed in, newer bf16 records notwithstanding,
    and a row timed only in bf16 keeps its bf16 record."""
    cells = {("fp16", "fp64 (reference)", "w16a16", "t"): scores(60, 50, 1), ("rtn", None, "w4a4", "t"): scores(60, 40, 2),
             ("awq", None, "w4a4", "t"): scores(60, 45, 3), ("gptq", None, "w4a4", "t"): scores(60, 44, 4)}
    perf = [_perf("fp16", "w16a16", 6.0, reference=True), _perf("rtn", "w4a4", 4.1), _perf("awq", "w4a4", 4.7),
            _perf("fp16", "w16a16", 6.5, reference=True), _perf("rtn", "w4a4", 3.9), _perf("gptq", "w4a4", 4.4)]
    for p, dt in zip(perf, ["fp16", "fp16", "fp16", "bf16", "bf16", "bf16"]):
        p["variant"], p["dtype"] = p["method"], dt
    ref_key = ("fp16", "fp64 (reference)", "w16a16", "t")
    folder = write_run(tmp_path / "run", cells, extra_records=perf, keys={ref_key: {"reference": True}})
    from harness.report.board import Run, build_board
    from harness.records import read_records

    t = build_board([Run("run", folder, read_records(folder / "records.jsonl"))], n_resamples=200).table
    lat = {row[1]: t.at[row, "decode ms/tok"] for row in t.index}
    assert lat == {"fp64 (reference)": 6.0, "rtn": 4.1, "awq": 4.7, "gptq": 4.4}, lat

def test_fused_quantizers_run_after_the_online_hadamard(bundled64, interp):
    """Triton (interpreter): where a producer quantizes, the transform runs first, then the row quantizer."""
    lm = bundled64
    lm.model.to(torch.float32)
    lm.dtype = torch.float32
    state = _hadamard_rtn_state(lm)
    g, eng = _gate(lm, state, only=["simulated"])  # the producers are the subject, not the GEMMs
    assert eng.fused
    pc = gate_mod.check_producers(eng, _gate_ref(lm, state))
    assert pc["passed"], pc
    assert any(k.split(".")[2] in ("o", "down") for k in pc["checks"])
    assert g["layerwise_max_rel_err"] < 1e-4 and g["e2e_rel_logit_err"] < 1e-3, g


def _gate_ref(lm, state):
    wl = runner_mod.make_workload(lm.model.config, text_tokens=12, new_tokens=5, seed=1)
    ids, pix = wl.batch(1)
    with torch.no_grad():
        handle = apply_state(lm.model, state)
        try:
            return gate_mod.simulated_reference(lm.model, ids, pix.to(lm.dtype), n_tokens=4)
        finally:
            handle.restore()
