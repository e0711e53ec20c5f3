"""The real-kernel perf engine on the families with a Qwen2 decoder (issue 27): LLaVA-OneVision
(SigLIP + any-res tiles, 1-D RoPE) and Qwen2.5-VL (native-resolution ViT, M-RoPE), on their tiny
random folders (CPU, fp32; Triton kernels under the interpreter).

The proof of positions, q/k/v biases, grouped-query attention and the untied LM head is the float
engine's logits against transformers' own forward of the same prompt (no KV cache: the model
recomputes everything, its 3-D positions included) to float32 round-off; the quantized engines
then pass the gate against the simulated model of the same state."""

from __future__ import annotations

import json

import pytest
import torch

from harness.kernels.real import RealLinear, rel_err
from perf_helpers import engine_on_cpu
from harness.models.loading import load_model
from harness.perf import gate as gate_mod
from harness.perf.engine import LlavaEngine, build_blocks, state_blocks
from harness.perf.states import make_workload
from harness.quant.build import rtn_state
from harness.quant.config import parse_scheme
from harness.quant.simulated import apply_state
from perf_helpers import interp  # noqa: F401 - fixture

FAMILIES = ["llava-onevision", "qwen2.5-vl"]
# Qwen: a 48 px picture is a 6 x 6 patch grid, 3 x 3 merged tokens: height and width positions differ
IMAGE = {"llava-onevision": None, "qwen2.5-vl": 48}


@pytest.fixture(scope="module")
def family_lms(tiny_family_paths):
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = load_model(str(tiny_family_paths(family)), dtype="fp32")
        return cache[family]
    return get


def _workload(lm, family, new_tokens=5, text_tokens=12):
    return make_workload(lm.model.config, text_tokens=text_tokens, new_tokens=new_tokens,
                         image_size=IMAGE[family])


@pytest.mark.parametrize("family", FAMILIES)
def test_float_engine_equals_the_hf_model(family_lms, family):
    lm = family_lms(family)
    cfg = lm.model.config.text_config
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    attn = lm.model.model.language_model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert lm.model.lm_head.weight is not lm.model.model.language_model.embed_tokens.weight  # untied
    wl = _workload(lm, family)
    ids, pix = wl.batch(2)
    ref = gate_mod.simulated_reference(lm.model, ids, pix, n_tokens=4)  # transformers' forward, no cache
    eng = LlavaEngine(lm.model, state_blocks(lm.model, None, device="cpu", dtype=lm.dtype))
    eng.setup(ids, pix, wl.new_tokens)
    assert eng.blocks[0].qkv.bias is not None  # the three biases ride in the fused q/k/v layer
    assert eng.n_kv == cfg.num_key_value_heads and eng.eps == cfg.rms_norm_eps
    real = eng.teacher_forced_logits(ref.tokens[:-1])
    err = rel_err(real[0].float(), ref.logits)
    print(f"{family}: float engine vs transformers, max rel logit err {err:.2e}")
    assert err < 1e-5, err
    assert torch.equal(real[0], real[1])  # every batch row the same prompt, the same logits
    toks = eng.generate(5)
    assert toks[0].tolist() == ref.tokens == toks[1].tolist()
    if family == "qwen2.5-vl":
        # M-RoPE is what makes it equal: the same engine on plain 1-D positions is far off
        assert eng.rope_tab is not None
        eng.rope_tab = None
        assert rel_err(eng.teacher_forced_logits(ref.tokens[:-1])[0].float(), ref.logits) > 1e-3


def test_mrope_tables_are_the_models_positions(family_lms):
    """Prompt rows: the model's own cos/sin of ``get_rope_index``'s 3-D positions; decode rows:
    the text continuation ``t + rope_deltas``, the same in the three sections."""
    lm = family_lms("qwen2.5-vl")
    wl = _workload(lm, "qwen2.5-vl", new_tokens=3)
    ids, pix = wl.batch(1)
    adapter = lm.adapter
    cos, sin = adapter.rope_tables(lm.model, ids, pix, ids.shape[1] + 3)
    T = ids.shape[1]
    kw = adapter.forward_inputs(lm.model, ids, pix)
    pos, delta = lm.model.model.get_rope_index(ids, mm_token_type_ids=kw["mm_token_type_ids"],
                                               image_grid_thw=pix["image_grid_thw"])
    assert not torch.equal(pos[1], pos[2])  # a real 2-D grid: height and width positions differ
    rot = lm.model.model.language_model.rotary_emb
    want_cos, _ = rot(torch.empty(0), pos)
    assert torch.equal(cos[:, :T], want_cos)
    text = torch.arange(T, T + 3)[None] + delta
    want_cos, _ = rot(torch.empty(0), text[None].expand(3, 1, -1))
    assert torch.equal(cos[:, T:], want_cos)
    assert int(delta) < 0  # the picture takes fewer positions than tokens
    assert adapter.rope_tables(lm.model, ids, pix, T) is not None
    assert family_lms("llava-onevision").adapter.rope_tables(None, ids, pix, T) is None  # 1-D RoPE




@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["w16a16", "w4a16", "w8a8", "w4a4"])
def test_engine_passes_the_gate(family_lms, family, scheme, interp):  # noqa: F811 - fixture
    lm = family_lms(family)
    wl = _workload(lm, family)
    ids, pix = wl.batch(1)
    state = None if scheme == "w16a16" else rtn_state(lm.model, parse_scheme(scheme), "rtn")
    handle = apply_state(lm.model, state) if state else None
    try:
        ref = gate_mod.simulated_reference(lm.model, ids, pix, n_tokens=4)
    finally:
        if handle:
            handle.restore()
    eng = engine_on_cpu(lm, state, 2, wl)
    act = scheme.endswith(("a8", "a4"))
    g = gate_mod.check(eng, ref, act_quant=act, policy="strict")
    print(f"\nGATE {family} {scheme}: layerwise {g['layerwise_max_rel_err']:.2e}, e2e {g['e2e_rel_logit_err']:.2e}, "
          f"kernels {sorted({m.kernel_label('decode') for m in eng.linears().values()})}")
    assert g["layerwise_max_rel_err"] < 1e-4, g["layerwise"]
    assert g["e2e_rel_logit_err"] < 1e-4 and g["e2e_tokens_match"], g
    assert g["passed"] and g["strict_passed"]
    if eng.fused:
        assert gate_mod.check_producers(eng, ref)["passed"]


def test_synthetic_pictures_hold_as_many_tokens_as_the_processors_make(family_lms):
    """The workload's image-token count is the family processor's for the same picture, and the
    model's vision features fill exactly those positions."""
    from PIL import Image

    from harness.prompting import chat_prompt

    for family in FAMILIES:
        lm = family_lms(family)
        side = IMAGE[family] or lm.model.config.vision_config.image_size
        wl = _workload(lm, family)
        enc = lm.processor(images=[Image.new("RGB", (side, side))], text=[chat_prompt(lm.processor, "x")],
                           return_tensors="pt")
        assert int((enc["input_ids"] == lm.adapter.image_token_id(lm.model)).sum()) == wl.image_tokens
        for key, value in wl.pixels.items():
            assert tuple(value.shape) == tuple(enc[key].shape), key
        feats = lm.adapter.image_features(lm.model.model, wl.pixels)
        assert tuple(feats.shape) == (1, wl.image_tokens, lm.model.config.text_config.hidden_size)


def test_onevision_7b_picture_tokens_are_the_processors():
    """At the shipped 7B shape: a 384 px picture is the base view and one tile (729 + 729 features)
    plus a newline per tile row, as LlavaOnevisionProcessor counts it."""
    from transformers import LlavaOnevisionProcessor

    from harness.models.loading import image_only_processor
    from harness.models.tiny import build_tokenizer
    from harness.perf.arch import arch_config

    cfg = arch_config("llava-onevision-7b")
    proc = image_only_processor(LlavaOnevisionProcessor)(tokenizer=build_tokenizer([], ["<video>"]), num_image_tokens=729,
                                   vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                   image_token="<image>", video_token="<video>",
                                   image_processor=_onevision_image_processor(cfg))
    for side in (384, 768, 1152):
        wl = make_workload(cfg, text_tokens=8, new_tokens=1, image_size=side)
        assert wl.image_tokens == proc._get_number_of_features(side, side, 384, 384), side
    assert make_workload(cfg, text_tokens=8, new_tokens=1).image_tokens == 729 * 2 + 27


def _onevision_image_processor(cfg):
    try:
        from transformers import LlavaOnevisionImageProcessorPil as P
    except ImportError:
        from transformers import LlavaOnevisionImageProcessor as P
    return P(size={"height": 384, "width": 384}, image_grid_pinpoints=cfg.image_grid_pinpoints)


@pytest.mark.parametrize("name,params,image_tokens", [("qwen2.5-vl-7b", 8.29e9, 576),
                                                      ("llava-onevision-7b", 8.03e9, 1485)])
def test_shipped_new_family_shapes(name, params, image_tokens):
    import transformers

    from harness.perf.arch import arch_config

    cfg = arch_config(name)
    tc = cfg.text_config
    assert (tc.hidden_size, tc.num_attention_heads, tc.num_key_value_heads, tc.intermediate_size,
            tc.num_hidden_layers, tc.rms_norm_eps) == (3584, 28, 4, 18944, 28, 1e-6)
    assert tc.rope_parameters["rope_theta"] == 1e6 and not cfg.tie_word_embeddings
    with torch.device("meta"):
        model = getattr(transformers, cfg.architectures[0])(cfg)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(params, rel=2e-3)
    assert model.model.language_model.rotary_emb.inv_freq.shape == (64,)
    if name == "qwen2.5-vl-7b":
        vc = cfg.vision_config
        assert (vc.depth, vc.hidden_size, vc.patch_size, vc.spatial_merge_size, vc.window_size) == (32, 1280, 14, 2, 112)
        assert list(vc.fullatt_block_indexes) == [7, 15, 23, 31]
        assert model.model.language_model.rotary_emb.mrope_section == [16, 24, 24]
    else:
        vc = cfg.vision_config
        assert (vc.num_hidden_layers, vc.hidden_size, vc.patch_size, vc.image_size) == (26, 1152, 14, 384)
    assert make_workload(cfg, text_tokens=70, new_tokens=8).image_tokens == image_tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_perf_command_on_tiny_family_folders(tiny_family_paths, tmp_path, family):
    """``qvlm-bench perf --model <tiny folder> --device cpu --dtype fp32``: the lead's GPU call path."""
    from harness.perf.command import main

    argv = ["perf", "--model", str(tiny_family_paths(family)), "--device", "cpu", "--dtype", "fp32",
            "--schemes", "w4a16,w8a8", "--batch", "1,2", "--reps", "1", "--warmup", "1",
            "--new-tokens", "3", "--text-tokens", "8", "--gate-tokens", "2", "--out", str(tmp_path)]
    if IMAGE[family]:
        argv += ["--image-size", str(IMAGE[family])]
    assert main(argv) == 0
    recs = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert [(r["method"], r["scheme"], r["batch_size"]) for r in recs] == [
        ("fp16", "w16a16", 1), ("fp16", "w16a16", 2), ("rtn", "w4a16", 1), ("rtn", "w4a16", 2),
        ("rtn", "w8a8", 1), ("rtn", "w8a8", 2)]
    for r in recs:
        assert r["status"] == "ok" and r["gate"]["passed"], (r["scheme"], r.get("error"), r["gate"].get("failed"))
    assert recs[0]["latency"]["decode_ms_per_token"] > 0
    assert recs[0]["gate"]["e2e_rel_logit_err"] < 1e-5
    assert recs[0]["workload"]["image_inputs"]


def test_qwen2_vl_float_engine_equals_the_hf_model(tmp_path):
    """Qwen2-VL (the same adapter as Qwen2.5-VL: M-RoPE, q/k/v biases, GQA; a GELU ViT) — a tiny
    random model built here (no tiny folder of its own)."""
    import transformers as T

    cfg = T.Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(model_type="qwen2_vl_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=512,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 2, 2]}),
        image_token_id=100, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = T.Qwen2VLForConditionalGeneration(cfg).eval()
    wl = make_workload(model.config, text_tokens=12, new_tokens=5, image_size=48)
    assert wl.image_tokens == 9
    ids, pix = wl.batch(2)
    ref = gate_mod.simulated_reference(model, ids, pix, n_tokens=4)
    eng = LlavaEngine(model, state_blocks(model, None, device="cpu", dtype=torch.float32))
    eng.setup(ids, pix, wl.new_tokens)
    assert eng.rope_tab is not None and eng.blocks[0].qkv.bias is not None
    err = rel_err(eng.teacher_forced_logits(ref.tokens[:-1])[0].float(), ref.logits)
    print(f"qwen2-vl: float engine vs transformers, max rel logit err {err:.2e}")
    assert err < 1e-5, err


@pytest.mark.parametrize("family", ["llava-next", "internvl3"])
def test_families_without_a_perf_picture_say_so(tiny_family_paths, family):
    from harness.models.loading import load_config
    from harness.models.family import adapter_for_config

    cfg = load_config(str(tiny_family_paths(family)))
    with pytest.raises(NotImplementedError, match="synthetic picture"):
        make_workload(cfg, text_tokens=4, new_tokens=1)
    assert adapter_for_config(cfg).name == family


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("scheme", ["w4a4", "w8a8"])
def test_triton_kernels_and_fused_quantizers_on_the_qwen2_decoder(family_lms, family, scheme, monkeypatch,
                                                                 interp):  # noqa: F811 - fixture
    """The integer / FP8 Triton kernels (CPU interpreter) with the engine's fused activation
    quantizers on q/k/v with biases and grouped-query attention: the engine computes what the
    simulated model computes, and the producers pass their own check."""
    from harness.kernels import real

    monkeypatch.setattr(real, "DECODE_MAX_ROWS", 4)  # the prompt takes the prefill kernels
    lm = family_lms(family)
    wl = _workload(lm, family, new_tokens=2, text_tokens=4)
    ids, pix = wl.batch(1)
    state = rtn_state(lm.model, parse_scheme(scheme), "rtn")
    handle = apply_state(lm.model, state)
    try:
        ref = gate_mod.simulated_reference(lm.model, ids, pix, n_tokens=1)
    finally:
        handle.restore()

    def make(path, lin):
        return RealLinear.from_quant(state.linears[path], lin, device="cpu", dtype=lm.dtype, name=path)
    eng = LlavaEngine(lm.model, build_blocks(lm.model, make))
    eng.setup(ids, pix, wl.new_tokens)
    assert eng.fused and eng.blocks[0].qkv.bias is not None
    for m in eng.linears().values():
        m.choice = {"decode": f"triton-{m.fmt}-dot", "prefill": f"triton-{m.int_compute()}-gemm"}
    g = gate_mod.check(eng, ref, act_quant=True, policy="strict")
    print(f"\nGATE triton {family} {scheme}: layerwise {g['layerwise_max_rel_err']:.2e}, "
          f"e2e {g['e2e_rel_logit_err']:.2e}")
    assert g["layerwise_max_rel_err"] < 1e-3 and g["e2e_rel_logit_err"] < 1e-3, g
    assert g["e2e_tokens_match"]
    p = gate_mod.check_producers(eng, ref)
    assert p["passed"] and p["checks"], p
