"""Every method runs on every family: each registered method (``available_methods()``, so methods
merged later are covered without an edit here) × each family's tiny random folder goes through
the engine — calibration, quantize, the model-unchanged check, finalize (validation, static
ranges, proof), apply — and answers a few questions. Random weights: what is checked is that
every stage runs and records are ``ok``, a quantizing method's with a proof that covers every
language linear."""

from __future__ import annotations

import pytest

from harness.models.tiny import TINY_FAMILIES
from harness.registry import available_methods


def _methods() -> list[str]:
    return sorted(available_methods())


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", _methods())
def test_method_runs_on_family(method, family, tiny_family_paths, tmp_path):
    from harness.suite_config import parse_suite
    from harness.runner import run_suite

    cls = available_methods()[method]
    entry = {"name": method}
    if "fast" in cls.presets:  # the method's own reduced budget: tiny models, two CPU cores
        entry["options"] = dict(cls.presets["fast"])
    suite = parse_suite({
        "name": f"{method}-{family}", "models": [str(tiny_family_paths(family))], "methods": [entry],
        "schemes": ["w4a8"], "tasks": ["synth_vqav2"], "limit": 2, "batch_size": 2, "device": "cpu",
        "dtype": "fp32", "calibration": {"task": "synth_vqav2", "n": 4, "batch_size": 2},
        "output": str(tmp_path)})
    summary = run_suite(suite, show_progress=False)
    assert summary.failed == 0, [r.get("error") for r in summary.failures()]
    records = [r for r in summary.records if r.get("method") == method]
    assert records and all(r["status"] == "ok" for r in records)
    if cls.quantizes and not cls.reference:
        for r in records:
            assert r["proof"]["quantized_linears"] == 14 and r["proof"]["weight_bits"] == [4]
            assert r["proof"]["act_quantizers_fired"] > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_vision_and_projector_quantize_on_family(method, family, tiny_family_paths):
    """With ``parts: [language, vision, projector]`` the block-wise methods walk each family's
    vision layers (CLIP, SigLIP, Qwen's visual.blocks with window attention, InternViT) and the
    projector; the finalized state covers every linear of those parts and leaves the model as
    it was."""
    from conftest import make_pairs
    from harness.calibration import encode_pairs
    from harness.models.layers import select_linears
    from harness.models.loading import load_model
    from harness.quant.config import parse_scheme
    from harness.quant.finalize import check_model_unchanged, finalize_state, param_checksum
    from harness.quant.ranges import rule_for

    lm = load_model(str(tiny_family_paths(family)), dtype="fp32")
    calib = encode_pairs(lm, make_pairs(4), batch_size=2)
    qcfg = parse_scheme("w4a8", parts=["language", "vision", "projector"])
    before = param_checksum(lm.model)
    state = available_methods()[method]().quantize(lm, qcfg, calib)
    check_model_unchanged(before, param_checksum(lm.model), method)
    finalize_state(lm.model, state, qcfg, list(calib.inputs()), rule_for(qcfg))
    targets = select_linears(lm.model, qcfg.parts)
    assert set(state.linears) == set(targets)
    assert state.meta["proof"]["quantized_linears"] == len(targets)
