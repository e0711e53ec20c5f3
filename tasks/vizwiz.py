"""VizWiz-VQA task functions (lm-eval `!function` targets), LLaVA-1.5 protocol.

Rows in the lmms-lab/VizWiz-VQA schema: question_id, image, question, answers (10 strings),
category. Scored on the labelled val split with VQA accuracy of the EvalAI-normalised output.
"""

from __future__ import annotations

from tasks import rows
from tasks.rows import log_sample, process_results  # noqa: F401  (YAML/harness targets)

POST_PROMPT = (
    "When the provided information is insufficient, respond with 'Unanswerable'.\n"
    "Answer the question using a single word or phrase."
)


def doc_to_text(doc: dict) -> str:
    """LLaVA's VizWiz prompt (playground/data/eval/vizwiz/llava_test.jsonl), without image token."""
    return f"{doc['question']}\n{POST_PROMPT}"


def doc_to_image(doc: dict) -> list:
    return rows.rgb_images(doc.get("image"))


def doc_to_target(doc: dict) -> str:
    return rows.majority_answer(doc)
