"""The calibration answers: which tokens they are, and the model's language-modelling loss on them.

Calibration batches (``harness.calibration.encode_pairs``) carry ``labels``: the answer tokens'
ids at their input positions, -100 elsewhere (prompt, image features, padding). A forward pass
given the labels returns the model's own loss: the mean next-token cross-entropy over the answer
tokens (position t predicts label t+1). Methods with a language-modelling term use it from here:
Q-VLM's ``L_reg`` (``methods/qvlm/encoder.py``), MBQ's gradient sensitivities
(``baselines/mbq.py``).

Typical use::

    from harness.quant.answers import answer_mask, lm_output

    out = lm_output(model, batch, labels=True)     # out.loss: the answers' LM loss
    mask = answer_mask(batch)                       # [batch, seq] bool
"""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


def answer_mask(batch: dict) -> torch.Tensor:
    """``[batch, seq]`` bool: the answer tokens (``labels != -100``, real tokens only)."""
    labels = batch.get("labels")
    if labels is None:
        raise ValueError("the calibration batch has no `labels` (answer tokens): encode it with "
                         "harness.calibration.encode_pairs")
    mask = labels != IGNORE_INDEX
    am = batch.get("attention_mask")
    if am is not None and tuple(am.shape) == tuple(mask.shape):
        mask = mask & am.bool()
    return mask


def lm_output(model: nn.Module, batch: dict, *, labels: bool):
    """The model's output on a calibration batch (no KV cache). ``labels=True`` passes the answer
    labels, so ``.loss`` is the language-modelling loss on the answers; ``False`` leaves them out
    (a plain forward pass, no loss)."""
    if labels and not bool(answer_mask(batch).any()):
        raise ValueError("the calibration batch has no answer tokens (every label is -100)")
    inputs = {k: v for k, v in batch.items() if k != "labels" or labels}
    return model(**inputs, use_cache=False)
