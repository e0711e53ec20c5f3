"""The shared block-wise loop: inputs come from the already-quantized blocks, the model stays float."""

import pytest
import torch

from harness.models.capture import capture_inputs
from harness.quant.blockwise import part_inputs, run_blockwise
from harness.quant.capture import token_rows
from harness.quant.build import linear_from_weight, act_quantizer
from harness.quant.config import parse_scheme
from harness.quant.simulated import applied

pytestmark = pytest.mark.usefixtures("one_thread")


def _rtn_process(qcfg, seen):
    def process(block):
        seen.append(([c.hidden.clone() for c in block.calls], block))
        frag = block.fragment("rtn", qcfg)
        for name, lin in block.linears().items():
            frag.linears[name] = linear_from_weight(lin.weight, qcfg, act=act_quantizer(qcfg))
        return frag
    return process


@pytest.mark.parametrize("part", ["language", "vision"])
def test_quantized_propagation_matches_full_model(tiny_lm, tiny_calib, part):
    model = tiny_lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    qcfg = parse_scheme("w4a8", parts=[part])
    inputs = part_inputs(model, part, tiny_calib.inputs())
    seen = []
    state = run_blockwise(model, inputs, _rtn_process(qcfg, seen), propagate="quantized",
                          track_float=True)
    assert len(seen) == len(inputs.layers) and state.linears
    # block 1's inputs are what layer 1 receives when the whole quantized part runs
    with applied(model, state):
        ref = capture_inputs(model, inputs.layers[1], tiny_calib.inputs())
    for got, want in zip(seen[1][0], ref):
        torch.testing.assert_close(got, want.hidden)
    # the float stream is the float model's
    float_ref = capture_inputs(model, inputs.layers[1], tiny_calib.inputs())
    for got, want in zip(seen[1][1].float_calls, float_ref):
        torch.testing.assert_close(got.hidden, want.hidden)
    assert not torch.allclose(seen[1][0][0], float_ref[0].hidden)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_float_propagation_and_blocks(tiny_lm, tiny_calib):
    model = tiny_lm.model
    qcfg = parse_scheme("w4a16")
    inputs = part_inputs(model, "language", tiny_calib.inputs())
    seen = []
    run_blockwise(model, inputs, _rtn_process(qcfg, seen), propagate="float", blocks=[[0, 1]])
    assert len(seen) == 1 and seen[0][1].layer_ids == [0, 1]
    with pytest.raises(ValueError):
        run_blockwise(model, inputs, _rtn_process(qcfg, []), blocks=[[1], [0]])


def test_masks_drop_padding(tiny_lm, tiny_calib):
    inputs = part_inputs(tiny_lm.model, "language", tiny_calib.inputs())
    n_real = sum(int(b["attention_mask"].sum()) for b in tiny_calib.batches)
    rows = sum(token_rows(c.hidden, m).shape[0] for c, m in zip(inputs.calls, inputs.masks))
    assert rows == n_real < sum(c.hidden.shape[0] * c.hidden.shape[1] for c in inputs.calls)
