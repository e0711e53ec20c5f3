"""Row helpers shared by the real task modules (ScienceQA, VizWiz, VQAv2) and their synthetic twins.

Why: the image column arrives as a PIL image from a Hub/`datasets` parquet with features, but
as {"bytes", "path"} from a plain parquet; both must give the same RGB image.
"""

from __future__ import annotations

import io

from PIL import Image

from tasks import metrics


def rgb_images(image) -> list:
    """[RGB PIL image] from a PIL image or an encoded {"bytes": ...} cell; [] for no image."""
    if image is None:
        return []
    if isinstance(image, dict):
        if not image.get("bytes"):
            return [Image.open(image["path"]).convert("RGB")] if image.get("path") else []
        image = Image.open(io.BytesIO(image["bytes"]))
    return [image.convert("RGB")]


def answer_strings(doc: dict) -> list[str]:
    """Human answers as strings: VizWiz stores strings, VQAv2 dicts with an "answer" key."""
    return [a["answer"] if isinstance(a, dict) else str(a) for a in doc.get("answers") or []]


def score(doc: dict, generation: str) -> metrics.Scored:
    return metrics.vqa_result(generation, answer_strings(doc))


def process_results(doc: dict, results: list[str]) -> dict:
    """Per-doc {"accuracy", "empty", "unparsed"} (all aggregated by mean)."""
    return score(doc, results[0]).metrics()


def log_sample(doc: dict, generation: str) -> dict:
    """Per-sample log fields: question_id, EvalAI-normalised answer, VQA accuracy."""
    s = score(doc, generation)
    return {"question_id": doc.get("question_id"), "parsed": s.parsed, "score": s.score}


def majority_answer(doc: dict) -> str:
    """Most frequent human answer (first on ties); used as the logged target."""
    answers = answer_strings(doc)
    return max(answers, key=answers.count) if answers else ""
