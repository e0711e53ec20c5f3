"""ScienceQA-IMG task functions (lm-eval `!function` targets), LLaVA-1.5 protocol.

Why separate from metrics.py: these adapt a dataset row (lmms-lab/ScienceQA schema: question,
choices, answer index, hint, image) to the prompt and the scorer; the synthetic tasks reuse
them with other rows in the same schema.
"""

from __future__ import annotations

import hashlib

from tasks import metrics
from tasks.rows import rgb_images

POST_PROMPT = "Answer with the option's letter from the given choices directly."


def doc_to_text(doc: dict) -> str:
    """LLaVA-1.5 `--single-pred-prompt` text (no image token; the model class puts the image first).

    "Context: {hint}\\n" only for a non-empty hint, "{question}\\n", one "A. {choice}" line per
    choice, then "\\n" + POST_PROMPT. Like model_vqa_science.py, the question block is stripped
    before the instruction is appended.
    """
    hint = doc.get("hint") or ""
    lines = [f"{metrics.SQA_OPTIONS[i]}. {c}" for i, c in enumerate(doc["choices"])]
    body = (f"Context: {hint}\n" if hint else "") + f"{doc['question']}\n" + "\n".join(lines)
    return body.strip() + "\n" + POST_PROMPT


def doc_to_image(doc: dict) -> list:
    """The row's image as a one-element list of RGB PIL images ([] when the row has none)."""
    return rgb_images(doc.get("image"))


def doc_to_target(doc: dict) -> str:
    """Gold option letter (for logs; scoring uses process_results)."""
    return metrics.SQA_OPTIONS[int(doc["answer"])]


def score(doc: dict, generation: str) -> metrics.Scored:
    return metrics.scienceqa_result(generation, int(doc["answer"]), len(doc["choices"]))


def process_results(doc: dict, results: list[str]) -> dict:
    """Per-doc {"accuracy", "empty", "unparsed"} (all aggregated by mean)."""
    return score(doc, results[0]).metrics()


def question_id(doc: dict) -> str:
    """The row's id when the schema has one, else a stable hash of its text (Hub rows lack ids)."""
    for key in ("id", "question_id"):
        if doc.get(key) not in (None, ""):
            return str(doc[key])
    text = "\x1f".join([doc.get("hint") or "", doc["question"], *doc["choices"]])
    return "sha1:" + hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def log_sample(doc: dict, generation: str) -> dict:
    """Per-sample log fields for the harness's JSONL: question_id, parsed letter, score."""
    s = score(doc, generation)
    return {"question_id": question_id(doc), "parsed": s.parsed, "score": s.score}
