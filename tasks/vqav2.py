"""VQAv2 task functions (lm-eval `!function` targets), LLaVA-1.5 protocol.

Rows in the lmms-lab/VQAv2 schema: question_id, question, image, answers (list of
{answer, answer_confidence, answer_id}), multiple_choice_answer, answer_type, ...
"""

from __future__ import annotations

from tasks import rows
from tasks.rows import log_sample, process_results  # noqa: F401  (YAML/harness targets)

POST_PROMPT = "Answer the question using a single word or phrase."


def doc_to_text(doc: dict) -> str:
    """LLaVA's VQAv2 prompt (llava_vqav2_mscoco_test-dev2015.jsonl), without image token."""
    return f"{doc['question']}\n{POST_PROMPT}"


def doc_to_image(doc: dict) -> list:
    return rows.rgb_images(doc.get("image"))


def doc_to_target(doc: dict) -> str:
    return doc.get("multiple_choice_answer") or rows.majority_answer(doc)
