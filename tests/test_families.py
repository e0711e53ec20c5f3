"""Model families: loading through the Auto classes, one adapter per family, an unknown family
named as an error at load time (before any weight is read or any cell runs)."""

from __future__ import annotations

import pytest

from harness.models.family import UnknownFamilyError, adapter_for, available_families
from harness.models.loading import check_family, load_model


def test_bundled_llava_loads_through_the_auto_classes(tiny_llava_path):
    lm = load_model(str(tiny_llava_path), dtype="fp32")
    assert type(lm.model).__name__ == "LlavaForConditionalGeneration"
    assert lm.family == "llava-1.5" and type(lm.adapter) is type(adapter_for(lm.model))
    assert check_family(str(tiny_llava_path)) == "llava-1.5"


def _unknown_family_folder(tmp_path):
    from transformers import Idefics3Config

    Idefics3Config().save_pretrained(tmp_path)  # a real image-text-to-text family with no adapter
    return tmp_path


def test_unknown_family_is_an_error_naming_the_supported_ones(tmp_path):
    folder = _unknown_family_folder(tmp_path)
    with pytest.raises(UnknownFamilyError) as err:
        load_model(str(folder))
    for name in available_families():
        assert name in str(err.value)
    assert "idefics3" in str(err.value) and "ModelAdapter" in str(err.value)
    with pytest.raises(UnknownFamilyError):
        check_family(str(folder))


def test_run_stops_on_an_unknown_family_before_any_cell(tmp_path, capsys):
    from harness.cli import main

    folder = _unknown_family_folder(tmp_path / "m")
    suite = tmp_path / "s.yaml"
    suite.write_text(f"name: unk\nmodels: [{folder}]\nmethods: [rtn]\nschemes: [w4a16]\n"
                     f"tasks: [synth_vqav2]\nlimit: 2\noutput: {tmp_path / 'out'}\n")
    assert main(["run", str(suite), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no model adapter" in err and "llava-1.5" in err
    assert not (tmp_path / "out" / "records.jsonl").exists()


# ---- every family's tiny random folder ------------------------------------------------------------

import torch  # noqa: E402

from conftest import make_pairs  # noqa: E402
from harness.models.tiny import TINY_FAMILIES  # noqa: E402

CLASSES = {"llava-1.5": "LlavaForConditionalGeneration",
           "llava-next": "LlavaNextForConditionalGeneration",
           "llava-onevision": "LlavaOnevisionForConditionalGeneration",
           "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
           "internvl3": "InternVLForConditionalGeneration"}


def test_every_family_has_a_tiny_folder_and_the_list_names_them():
    assert set(TINY_FAMILIES) == set(CLASSES) == set(available_families())


def _lm(tiny_family_paths, family, dtype="fp32"):
    return load_model(str(tiny_family_paths(family)), dtype=dtype)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_tiny_family_loads_with_its_adapter(tiny_family_paths, family):
    lm = _lm(tiny_family_paths, family)
    assert type(lm.model).__name__ == CLASSES[family]
    assert lm.family == family and check_family(str(tiny_family_paths(family))) == family
    assert lm.adapter.image_token_id(lm.model) == lm.processor.image_token_id


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_parts_and_layers_of_each_family(tiny_family_paths, family):
    from harness.models.layers import language_layers, select_linears, vision_layers
    from harness.models.parts import part_of

    lm = _lm(tiny_family_paths, family)
    m, ad = lm.model, lm.adapter
    lpath, lang = language_layers(m)
    vpath, vis = vision_layers(m)
    assert (lpath, vpath) == (ad.language_layers(m)[0], ad.vision_layers(m)[0])
    assert len(lang) == 2 and len(vis) == 2 and lpath.endswith("language_model.layers")
    linears = {n: mod for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    # the path rules agree with the adapter for every linear, and every linear has a part
    assert {n: part_of(n) for n in linears} == {n: ad.part_of(n) for n in linears}
    assert {ad.part_of(n) for n in linears} == {"language", "vision", "projector", "lm_head"}
    assert set(select_linears(m, ["language"])) == {n for n in linears if n.startswith(lpath + ".")}
    assert len(select_linears(m, ["language"])) == 7 * 2
    assert set(select_linears(m, ["vision"])) == {n for n in linears if n.startswith(vpath + ".")}
    for path in (ad.embeddings(m), ad.final_norm(m), ad.lm_head(m)):
        m.get_submodule(path)
    writers = ad.projector_writers(m)
    assert writers and all(ad.part_of(w) == "projector" for w in writers)
    for layer in list(lang) + list(vis):
        for g in ad.scale_groups(layer):
            prev = layer.get_submodule(g.prev)
            width = prev.weight.shape[0]
            assert all(layer.get_submodule(n).in_features == width for n in g.linears), (family, g)
    for layer in lang:
        assert all(isinstance(layer.get_submodule(n), torch.nn.Linear) for n in ad.residual_writers(layer))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_rtn_proof_names_every_language_linear(tiny_family_paths, family):
    from harness.models.layers import select_linears
    from harness.quant.build import rtn_state
    from harness.quant.config import parse_scheme
    from harness.quant.finalize import finalize_state

    lm = _lm(tiny_family_paths, family)
    qcfg = parse_scheme("w4a16")
    state = finalize_state(lm.model, rtn_state(lm.model, qcfg, "rtn"), qcfg, None, None)
    targets = set(select_linears(lm.model, ["language"]))
    assert set(state.linears) == targets
    proof = state.meta["proof"]
    assert proof["quantized_linears"] == len(targets) == 14 and proof["weight_bits"] == [4]


def _logits(lm, batches):
    with torch.no_grad():
        return [lm.model(**b, use_cache=False).logits for b in batches]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_scale_groups_fold_exactly_in_float64(tiny_family_paths, family):
    """Random per-channel scales over every scale group of every language and vision layer,
    folded by FloatEdit: the family's logits equal the float model's to float64 round-off."""
    from harness.calibration import encode_pairs
    from harness.quant.transforms import FloatEdit, edited

    lm = _lm(tiny_family_paths, family, dtype="fp64")
    batches = list(encode_pairs(lm, make_pairs(4, seed=3), batch_size=2).inputs())
    ref = _logits(lm, batches)
    gen = torch.Generator().manual_seed(0)
    edit = FloatEdit(lm.model)
    n_groups = 0
    for path, layers in (lm.adapter.language_layers(lm.model), lm.adapter.vision_layers(lm.model)):
        for i, layer in enumerate(layers):
            for g in lm.adapter.scale_groups(layer):
                width = layer.get_submodule(g.linears[0]).in_features
                s = torch.exp(torch.randn(width, generator=gen, dtype=torch.float64))
                edit.scale_group(f"{path}.{i}", g, s)
                n_groups += 1
    assert n_groups >= 2 * 2 + 2 * 2
    with edited(lm.model, edit):
        got = _logits(lm, batches)
    for r, q in zip(ref, got):
        assert torch.allclose(q, r, rtol=1e-9, atol=1e-9 * float(r.abs().max())), family
    # the check can fail: the same scales on the readers alone (no fold into prev) show up
    broken = FloatEdit(lm.model)
    for name, value in edit.params.items():
        if any(f".{lin}.weight" in name for lin in ("q_proj", "gate_proj", "qkv", "fc1")):
            broken.params[name] = value
    with edited(lm.model, broken):
        bad = _logits(lm, batches)
    assert any(not torch.allclose(b, r, rtol=1e-6, atol=1e-6 * float(r.abs().max())) for r, b in zip(ref, bad))


SYNTH_TASKS = ["synth_scienceqa", "synth_vizwiz", "synth_vqav2"]


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_qvlm_bench_run_end_to_end_on_each_family(tiny_family_paths, family, tmp_path):
    """``qvlm-bench run`` on a tiny suite pointing at the family's folder: calibration, RTN,
    finalize, a few questions of each synthetic task; every record ok, RTN's with its proof
    (random weights: accuracy is not the point)."""
    import yaml

    from harness.cli import main
    from harness.records import read_records

    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({
        "name": f"fam-{family}", "models": [str(tiny_family_paths(family))], "methods": ["fp16", "rtn"],
        "schemes": ["w4a8"], "tasks": SYNTH_TASKS, "limit": 2, "batch_size": 2, "device": "cpu",
        "dtype": "fp32", "calibration": {"task": "synth_vqav2", "n": 4, "batch_size": 2},
        "output": str(tmp_path / "out")}))
    assert main(["run", str(suite), "--quiet"]) == 0
    records = read_records(tmp_path / "out" / "records.jsonl")
    assert {r["task"] for r in records} == set(SYNTH_TASKS)
    assert all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    rtn = [r for r in records if r["method"] == "rtn"]
    assert len(rtn) == 3
    for r in rtn:
        assert r["proof"]["quantized_linears"] == 14 and r["proof"]["act_quantizers_fired"] > 0


def test_blockwise_vision_blocks_of_qwen25_get_their_own_attention_windows(tiny_family_paths):
    """Qwen2.5-VL's vision blocks attend within windows except in ``fullatt_block_indexes``:
    block-wise methods must give each block its own ``cu_seqlens`` (ModelAdapter.
    layer_kwargs_vary), or the block outputs they compute are not the model's."""
    from harness.calibration import encode_pairs
    from harness.quant.blockwise import part_inputs, run_blockwise

    lm = _lm(tiny_family_paths, "qwen2.5-vl", dtype="fp64")
    batches = list(encode_pairs(lm, make_pairs(2, seed=5), batch_size=2).inputs())
    path, blocks = lm.adapter.vision_layers(lm.model)
    assert lm.adapter.layer_kwargs_vary(lm.model, "vision")
    seen: dict[int, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda _m, _a, out, i=i: seen.setdefault(i, out)) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            lm.model(**batches[0], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    inputs = part_inputs(lm.model, "vision", batches[:1])
    call = inputs.calls[0]
    assert not torch.equal(call.for_layer(0).kwargs["cu_seqlens"], call.for_layer(1).kwargs["cu_seqlens"])
    got: dict[int, torch.Tensor] = {}

    def process(block):
        got[block.layer_ids[0]] = block.float_outputs()[0]
    run_blockwise(lm.model, inputs, process, propagate="float")
    for i in range(len(blocks)):
        assert torch.allclose(got[i], seen[i], atol=1e-12), i
    # the first block's arguments reused for the full-attention block would not reproduce it
    from harness.models.capture import layer_output
    wrong = layer_output(blocks[1], call.with_hidden(seen[0]).for_layer(0))
    assert not torch.allclose(wrong, seen[1], atol=1e-6)


def test_qwen_processor_gets_lmms_evals_pixel_bounds_for_real_geometry():
    from transformers import Qwen2_5_VLConfig

    from harness.models.family import adapter_for_config

    real = Qwen2_5_VLConfig(vision_config={"patch_size": 14, "spatial_merge_size": 2})
    assert adapter_for_config(real).processor_kwargs(real) == {"min_pixels": 256 * 28 * 28,
                                                               "max_pixels": 1605632}
    tiny = Qwen2_5_VLConfig(vision_config={"patch_size": 8, "spatial_merge_size": 2})
    assert adapter_for_config(tiny).processor_kwargs(tiny) == {}


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_task_text_is_framed_by_the_familys_chat_template(tiny_family_paths, family):
    """The task's protocol text reaches the model unchanged, after the image, inside the family's
    chat format (lmms-eval's default task prompts are the same text for all five families)."""
    from harness.prompting import chat_prompt
    from tasks.vqav2 import doc_to_text

    lm = _lm(tiny_family_paths, family)
    text = doc_to_text({"question": "What color is the cube?"})
    prompt = chat_prompt(lm.processor, text)
    assert text in prompt
    image = lm.processor.image_token if family != "internvl3" else "<IMG_CONTEXT>"
    assert prompt.index(image) < prompt.index(text)
    marker = {"llava-1.5": "ASSISTANT:", "llava-next": "ASSISTANT:"}.get(family, "<|im_start|>assistant\n")
    assert prompt.endswith(marker)


@pytest.mark.parametrize("name,model,dtype", [
    ("qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct", "bf16"),
    ("llava-onevision", "llava-hf/llava-onevision-qwen2-7b-ov-hf", "fp16"),
])
def test_family_suites_load_and_validate(name, model, dtype):
    """The real-checkpoint suites beside llava-1.5.yaml validate (they need the Hub and a GPU to
    run), with the same methods, schemes, tasks and calibration as the LLaVA-1.5 suite."""
    from harness.suite_config import load_suite

    suite, ref = load_suite(name), load_suite("llava-1.5")
    assert [m.name for m in suite.models] == [model] and suite.dtype == dtype
    for key in ("schemes", "calibration"):
        assert getattr(suite, key) == getattr(ref, key), key
    assert [t.name for t in suite.tasks] == [t.name for t in ref.tasks]
    assert [m.name for m in suite.methods] == [m.name for m in ref.methods]


def test_qvlm_bench_list_models_names_the_five_families(capsys):
    from harness.cli import main

    assert main(["list", "models"]) == 0
    out = capsys.readouterr().out
    for family in ("llava-1.5", "llava-next", "llava-onevision", "qwen2.5-vl", "internvl3"):
        assert f"  {family} " in out


def test_qwen2_vl_shares_the_adapter_and_its_scale_groups_fold_exactly():
    """Qwen2-VL (LayerNorm vision blocks with fc1/fc2, no windows) goes through the Qwen2.5-VL
    adapter: parts by path, scale groups exact on the vision tower and the decoder (float64)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from harness.quant.transforms import FloatEdit, edited

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=64, hidden_size=64, num_heads=4, mlp_ratio=2,
                           patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        image_token_id=120, video_token_id=121, vision_start_token_id=122)
    model = Qwen2VLForConditionalGeneration(cfg).double().eval()
    ad = adapter_for(model)
    assert ad.name == "qwen2.5-vl" and not ad.layer_kwargs_vary(model, "vision")
    assert not ad.tied_lm_head(model)
    vpath, blocks = ad.vision_layers(model)
    assert vpath.endswith("visual.blocks") and len(blocks) == 2
    assert [g.linears for g in ad.scale_groups(blocks[0])] == [("attn.qkv",), ("mlp.fc1",)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert {ad.part_of(n) for n in linears} == {"language", "vision", "projector", "lm_head"}
    pixels = torch.randn(16, 3 * 2 * 8 * 8, dtype=torch.float64)
    grid = torch.tensor([[1, 4, 4]])
    ids = torch.randint(0, 100, (1, 12))

    def outputs():
        with torch.no_grad():
            v = model.model.visual(pixels, grid_thw=grid)
            v = v.pooler_output if hasattr(v, "pooler_output") else v
            return v, model(input_ids=ids).logits
    ref = outputs()
    edit = FloatEdit(model)
    gen = torch.Generator().manual_seed(1)
    for path, layers in (ad.language_layers(model), (vpath, blocks)):
        for i, layer in enumerate(layers):
            for g in ad.scale_groups(layer):
                w = layer.get_submodule(g.linears[0]).in_features
                edit.scale_group(f"{path}.{i}", g, torch.exp(torch.randn(w, generator=gen, dtype=torch.float64)))
    with edited(model, edit):
        got = outputs()
    for r, q in zip(ref, got):
        assert torch.allclose(q, r, rtol=1e-9, atol=1e-9 * float(r.abs().max()))
