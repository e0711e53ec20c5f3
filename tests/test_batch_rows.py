"""``select_rows`` cuts a processor batch by sequences for every family, including those whose
pictures are packed over the batch's images (Qwen2.5-VL's patches): the model's output on the cut
rows equals the same rows of its output on the whole batch (float64), and Q-VLM's VEO trains with
one-sequence micro-batches on each family (it split pixel tensors by their first dimension before,
which failed on a Qwen2.5-VL-7B state on an H100: "shape '[0, 4, -1]' is invalid")."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.models.batch_rows import select_rows
from harness.models.tiny import TINY_FAMILIES


def _pairs(n: int):
    """Pictures of different shapes, so Qwen's images become different numbers of patches."""
    from PIL import Image

    rng = np.random.default_rng(3)
    shapes = [(28, 84), (56, 56), (84, 28), (40, 60)]
    words = ["yes", "no", "red", "blue", "the", "is"]
    return [(Image.fromarray(rng.integers(0, 256, (*shapes[i % 4], 3), dtype=np.uint8)),
             " ".join(rng.choice(words, size=3 + i)), "yes") for i in range(n)]


@pytest.fixture(scope="module")
def families(tiny_family_paths):
    from harness.calibration import encode_pairs
    from harness.models.family import adapter_for
    from harness.models.loading import load_model

    out = {}
    for family in TINY_FAMILIES:
        lm = load_model(str(tiny_family_paths(family)), dtype="fp64", device="cpu")
        batch = encode_pairs(lm, _pairs(4), batch_size=4).batches[0]
        out[family] = (lm, batch, adapter_for(lm.model).image_token_id(lm.model))
    return out


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_cut_rows_give_the_whole_batch_outputs(family, families):
    lm, batch, image_token = families[family]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        whole = lm.model(**inputs).logits
        for start, end in [(0, 1), (1, 3), (3, 4)]:
            part = select_rows(inputs, start, end, image_token)
            assert part["input_ids"].shape[0] == end - start
            got = lm.model(**part).logits
            mask = part["attention_mask"].bool()
            torch.testing.assert_close(got[mask], whole[start:end][mask], rtol=0, atol=1e-9)


def test_qwen_pictures_are_packed_and_cut_at_image_boundaries(families):
    lm, batch, image_token = families["qwen2.5-vl"]
    pix, grid = batch["pixel_values"], batch["image_grid_thw"]
    per_image = grid.prod(-1).tolist()
    assert pix.shape[0] == sum(per_image) != batch["input_ids"].shape[0]
    assert len(set(per_image)) > 1  # the pictures differ in patch count
    part = select_rows(batch, 1, 3, image_token)
    lo = per_image[0]
    assert torch.equal(part["pixel_values"], pix[lo:lo + per_image[1] + per_image[2]])
    assert torch.equal(part["image_grid_thw"], grid[1:3])


def test_a_cut_inside_a_packed_row_is_an_error():
    batch = {"input_ids": torch.tensor([[5, 9, 9, 9], [5, 5, 9, 9]]),
             "pixel_values": torch.zeros(3, 3)}  # 3 packed rows over 5 image tokens
    with pytest.raises(ValueError, match="falls inside a row"):
        select_rows(batch, 0, 1, image_token_id=9)
    with pytest.raises(ValueError, match="names no image token"):
        select_rows(batch, 0, 1, image_token_id=None)
    with pytest.raises(ValueError, match="outside a batch of 2"):
        select_rows(batch, 1, 3, image_token_id=9)


@pytest.mark.parametrize("family", ["qwen2.5-vl", "internvl3", "llava-next"])
def test_veo_trains_in_one_sequence_micro_batches(family, tiny_family_paths):
    """VEO with ``micro_batch=1`` runs on the family, moves the tower and restores the model."""
    from harness.calibration import encode_pairs
    from harness.models.loading import load_model
    from harness.quant.config import parse_scheme
    from methods.qvlm.encoder import VEO, VEOConfig

    lm = load_model(str(tiny_family_paths(family)), dtype="fp32", device="cpu")
    calib = encode_pairs(lm, _pairs(4), batch_size=4)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    veo = VEO(lm.model, parse_scheme("w4a8"), calib.batches,
              VEOConfig(epochs=1, lr=1e-3, micro_batch=1, report=False))
    params, info = veo.run()
    assert veo.micro == 1
    assert params and any(not torch.equal(v.float(), before[n].float()) for n, v in params.items())
    for n, p in lm.model.named_parameters():  # the model itself is restored
        assert torch.equal(p, before[n]), n
