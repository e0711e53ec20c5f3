"""Model loading, part discovery, block-input capture, calibration encoding, batch invariance."""

import pytest
import torch

from conftest import make_pairs
from harness.calibration import encode_pairs
from harness.evaluate import generate_answers
from harness.models.capture import capture_inputs, layer_output
from harness.models.layers import language_layers, part_of, select_linears, vision_layers
from harness.models.loading import ModelNotFoundError, load_model


def test_unreachable_hub_id_gives_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="llava-hf/does-not-exist"):
        load_model("llava-hf/does-not-exist")


def test_parts_are_found(tiny_lm):
    m = tiny_lm.model
    lpath, lang = language_layers(m)
    vpath, vis = vision_layers(m)
    assert lpath.endswith("language_model.layers") and len(lang) == 2
    assert "vision_tower" in vpath and len(vis) == 2
    lin = select_linears(m, ["language", "vision", "projector", "lm_head"])
    parts = {part_of(n) for n in lin}
    assert parts == {"language", "vision", "projector", "lm_head"}
    assert len(select_linears(m, ["language"])) == 7 * 2  # q k v o gate up down per layer
    assert len(select_linears(m, ["vision"])) == 6 * 2  # q k v out fc1 fc2 per layer


def test_captured_layer_inputs_reproduce_the_forward_pass(tiny_lm):
    m = tiny_lm.model
    calib = encode_pairs(tiny_lm, make_pairs(4), batch_size=2)
    _, layers = language_layers(m)
    calls = capture_inputs(m, layers[0], calib.inputs())
    assert len(calls) == 2
    # running the captured calls through every layer gives the model's last hidden state
    batch = next(calib.inputs())
    with torch.no_grad():
        ref = m(**batch, output_hidden_states=True).hidden_states[-1]
        h = calls[0]
        for layer in layers:
            h = h.with_hidden(layer_output(layer, h))
        final = m.model.language_model.norm(h.hidden)
    assert torch.allclose(final, ref, atol=1e-5)


def test_calibration_labels_cover_only_the_answer(tiny_lm):
    pairs = make_pairs(3)
    calib = encode_pairs(tiny_lm, pairs, batch_size=3)
    b = calib.batches[0]
    tok = tiny_lm.processor.tokenizer
    for i, (_, _, ans) in enumerate(pairs):
        labelled = b["input_ids"][i][b["labels"][i] != -100]
        assert tok.decode(labelled, skip_special_tokens=True).strip() == ans
    assert calib.digest() == encode_pairs(tiny_lm, pairs, batch_size=3).digest()


def test_batch_size_does_not_change_greedy_answers(tiny_lm):
    pairs = make_pairs(8, seed=3)
    prompts = [p for _, p, _ in pairs]
    images = [im for im, _, _ in pairs]
    one = generate_answers(tiny_lm, prompts, images, max_new_tokens=6, batch_size=1)
    eight = generate_answers(tiny_lm, prompts, images, max_new_tokens=6, batch_size=8)
    assert one == eight
    assert len(set(len(p.split()) for p in prompts)) > 1  # prompts of different lengths: padding happened
