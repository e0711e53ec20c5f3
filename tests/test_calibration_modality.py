"""`calibration: {modality: image-text | text}`: the text set is the same questions without their
images, an unknown modality is a clear error, the row label says it, and the default leaves the
records and cell keys of earlier runs as they were."""

from __future__ import annotations

import pytest
import torch

from harness import cells as cells_mod
from harness.calibration import encode_pairs
from harness.suite_config import SuiteError, parse_suite
from conftest import make_pairs


def _suite(model, **over):
    d = {"name": "t", "models": [str(model)], "methods": ["fp16", "rtn", "awq"], "schemes": ["w4a4"],
         "tasks": ["synth_vqav2"], "device": "cpu", "quant": {"a_granularity": "per_tensor"}}
    d.update(over)
    return parse_suite(d)


def _real(batch, key, i):
    return batch[key][i][batch["attention_mask"][i].bool()]


def test_text_calibration_is_the_same_questions_without_images(tiny_lm):
    pairs = make_pairs(6)
    image_text = encode_pairs(tiny_lm, pairs, batch_size=3)
    text = encode_pairs(tiny_lm, pairs, batch_size=3, with_images=False)
    image_id = tiny_lm.model.config.image_token_id
    tok = tiny_lm.processor.tokenizer
    assert text.n == image_text.n == 6 and text.digest() != image_text.digest()
    for bt, bi in zip(text.batches, image_text.batches):
        assert "pixel_values" not in bt and "pixel_values" in bi
        assert not (bt["input_ids"] == image_id).any() and (bi["input_ids"] == image_id).any()
        for i in range(bt["input_ids"].shape[0]):
            ids_t, ids_i = _real(bt, "input_ids", i), _real(bi, "input_ids", i)
            # the same question and answer: the image-text sequence less its image positions
            # (the placeholder run and the line break the template puts after it) is the text one
            no_image = tok.decode(ids_i[ids_i != image_id], skip_special_tokens=True)
            assert tok.decode(ids_t, skip_special_tokens=True).split() == no_image.split()
            # labels cover the same answer tokens
            lt, li = _real(bt, "labels", i), _real(bi, "labels", i)
            assert torch.equal(lt[lt != -100], li[li != -100]) and (lt != -100).any()
            # positions count real tokens from 0, as for image-text
            assert torch.equal(_real(bt, "position_ids", i), torch.arange(len(ids_t)))
    # the model runs on it (language model only: no image features to merge)
    with torch.no_grad():
        out = tiny_lm.model(**next(text.inputs()), use_cache=False)
    assert torch.isfinite(out.logits).all()


def test_an_unknown_modality_is_an_error_naming_the_valid_ones(tiny_llava_path):
    with pytest.raises(SuiteError, match=r"`calibration.modality` is 'images'; valid: image-text, text"):
        _suite(tiny_llava_path, calibration={"modality": "images"})
    with pytest.raises(SuiteError, match=r"no images.*\['projector', 'vision'\]"):
        _suite(tiny_llava_path, calibration={"modality": "text"},
               quant={"parts": ["vision", "projector", "language"]})


def test_rows_say_text_calib_and_the_default_keeps_earlier_keys(tiny_llava_path):
    text = _suite(tiny_llava_path, calibration={"modality": "text"},
                  methods=["fp16", "rtn", {"name": "awq", "options": {"n_grid": 10}},
                           {"name": "gptq", "label": "mine"}])
    assert [v.label for v in cells_mod.resolve_variants(text)] == [
        "fp16", "rtn (text calib)", "awq (n_grid=10, text calib)", "mine"]
    # rtn with dynamic per-token ranges takes no calibration: nothing to say
    dynamic = _suite(tiny_llava_path, calibration={"modality": "text"}, quant={})
    assert [v.label for v in cells_mod.resolve_variants(dynamic)] == ["fp16", "rtn", "awq (text calib)"]

    default, explicit = _suite(tiny_llava_path), _suite(tiny_llava_path, calibration={"modality": "image-text"})
    assert [v.label for v in cells_mod.resolve_variants(explicit)] == ["fp16", "rtn", "awq"]
    plans = {name: cells_mod.plan_cells(s, "cpu") for name, s in
             (("default", default), ("explicit", explicit), ("text", _suite(tiny_llava_path, calibration={"modality": "text"})))}
    assert [c.key for c in plans["default"]] == [c.key for c in plans["explicit"]]
    assert all("modality" not in (c.calibration or {}) for c in plans["explicit"])
    assert [c.calibration["modality"] for c in plans["text"] if c.calibration] == ["text", "text"]
    assert not {c.key for c in plans["text"][1:]} & {c.key for c in plans["default"]}
    assert plans["text"][0].key == plans["default"][0].key  # the float reference takes no calibration


def test_the_worker_encodes_the_text_set_for_a_text_spec(tiny_llava_path, tiny_lm):
    from harness.worker import GroupWorker

    suite = _suite(tiny_llava_path, calibration={"modality": "text", "task": "synth_scienceqa", "n": 4,
                                                 "batch_size": 4})
    cell = next(c for c in cells_mod.plan_cells(suite, "cpu") if c.calibration)
    worker = GroupWorker(suite, "cpu")
    calib = worker.calibration(tiny_lm, cell.calibration)
    image_text = worker.calibration(tiny_lm, {k: v for k, v in cell.calibration.items() if k != "modality"})
    assert calib.source["modality"] == "text" and calib.n == image_text.n == 4
    assert "pixel_values" not in calib.batches[0] and "pixel_values" in image_text.batches[0]
    assert worker.base(cell)["calibration"]["modality"] == "text"  # every record carries it


def test_a_row_may_calibrate_on_text_beside_its_image_text_twin(tiny_llava_path):
    """`{name: rtn, calibration: {modality: text}}` beside `rtn`: two rows, two calibration specs,
    two states; a modality other than the valid ones, or another key, is refused."""
    suite = _suite(tiny_llava_path, methods=["fp16", "rtn", {"name": "rtn", "calibration": {"modality": "text"}}])
    cells = cells_mod.plan_cells(suite, "cpu")
    by_label = {c.variant.label: c for c in cells}
    assert set(by_label) == {"fp16", "rtn", "rtn (text calib)"}
    assert "modality" not in by_label["rtn"].calibration
    assert by_label["rtn (text calib)"].calibration["modality"] == "text"
    assert by_label["rtn"].state_key != by_label["rtn (text calib)"].state_key
    for bad in ({"modality": "images"}, {"n": 8}):
        with pytest.raises(SuiteError, match="modality"):
            _suite(tiny_llava_path, methods=["rtn", {"name": "rtn", "calibration": bad}])


def test_contrasts_pair_the_modality_lever_by_record_fields(tmp_path):
    """image-text − text and +clip − plain are paired from the records' fields; two rows that
    differ in two levers (or in a method option) are not a default contrast."""
    from board_data import scores, write_run
    from harness.report.contrasts import default_contrasts
    from harness.report.board import Run, build_board
    from harness.records import read_records

    text = {"calibration": {"task": "t", "modality": "text"}}
    cells = {("rtn", "rtn", "w4a4", "t"): scores(50, 30), ("rtn", "rtn+clip", "w4a4", "t"): scores(50, 35, 1),
             ("rtn", "rtn (text calib)", "w4a4", "t"): scores(50, 25, 2),
             ("rtn", "rtn+clip (text calib)", "w4a4", "t"): scores(50, 28, 3),
             ("awq", "awq", "w4a4", "t"): scores(50, 33, 4)}
    keys = {("rtn", "rtn (text calib)", "w4a4", "t"): text,
            ("rtn", "rtn+clip (text calib)", "w4a4", "t"): {**text, "clip": True}}
    folder = write_run(tmp_path / "run", cells, keys=keys)
    board = build_board([Run("run", folder, read_records(folder / "records.jsonl"))], n_resamples=200)
    assert sorted(default_contrasts(board)) == sorted([
        ("rtn+clip", "rtn"), ("rtn+clip (text calib)", "rtn (text calib)"),
        ("rtn", "rtn (text calib)"), ("rtn+clip", "rtn+clip (text calib)")])
