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
