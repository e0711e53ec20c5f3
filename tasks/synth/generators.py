"""Row generators for synth_scienceqa, synth_vizwiz and synth_vqav2.

Rows have exactly the columns of the real datasets (HF ``lmms-lab/ScienceQA`` ScienceQA-IMG,
``lmms-lab/VizWiz-VQA``, ``lmms-lab/VQAv2``), with the image as a PIL image. Row ``i`` of a split
depends only on (seed, task, split, i), so any prefix of a split is the same whatever its length.
"""

from __future__ import annotations

import numpy as np

from . import questions as qs
from .annotators import annotate, annotate_unanswerable
from .scene import SHAPES, blurred, crop_without, dark, mild_photo, render, render_hires, sample_scene

TASK_IDS = {"synth_scienceqa": 1, "synth_vizwiz": 2, "synth_vqav2": 3}
SPLIT_IDS = {"train": 1, "validation": 2, "test": 3}

SQA_COLUMNS = ["id", "image", "question", "choices", "answer", "hint", "task", "grade", "subject",
               "topic", "category", "skill", "lecture", "solution"]
VIZWIZ_COLUMNS = ["question_id", "image", "question", "answers", "category"]
VQAV2_COLUMNS = ["question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                 "question_id", "question", "image"]
COLUMNS = {"synth_scienceqa": SQA_COLUMNS, "synth_vizwiz": VIZWIZ_COLUMNS, "synth_vqav2": VQAV2_COLUMNS}


def row_rng(seed: int, task: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), TASK_IDS[task], SPLIT_IDS[split], int(index)])


def _weighted(rng, table):
    fams, w = zip(*table)
    w = np.asarray(w, dtype=float)
    return fams[int(rng.choice(len(fams), p=w / w.sum()))]


def _ask(rng, family, **scene_kw):
    """Draw scenes until ``family`` yields a question; returns (scene, Q)."""
    for _ in range(200):
        scene = sample_scene(rng, **scene_kw)
        q = family(scene, rng)
        if q is not None:
            return scene, q
    raise RuntimeError(f"family {family.__name__} found no question in 200 scenes")  # pragma: no cover


# ---------------------------------------------------------------- ScienceQA
SQA_FAMILIES = [
    (qs.q_color, 0.16), (qs.q_shape, 0.12), (qs.q_count, 0.17),
    (qs.mc_relation, 0.08), (qs.mc_compare, 0.07), (qs.q_superlative, 0.08), (qs.mc_more, 0.04),
    (qs.h_labels, 0.09), (qs.h_owner, 0.09), (qs.h_material, 0.09),
]
SQA_CATEGORY = {
    "color": "Identify colors", "shape": "Identify shapes", "count": "Count objects",
    "size": "Compare sizes", "relation": "Spatial relations", "compare": "Compare sizes",
    "superlative": "Spatial relations", "more": "Count objects", "context_labels": "Use context",
    "context_owner": "Use context", "context_material": "Use context",
}


def sqa_row(seed: int, split: str, i: int, meta: dict | None = None, families=None) -> dict:
    """Row ``i``; ``families`` (a weighted list like SQA_FAMILIES) narrows it, for training drills only."""
    rng = row_rng(seed, "synth_scienceqa", split, i)
    family = _weighted(rng, families or SQA_FAMILIES)
    scene, q = _ask(rng, family)
    if q.choices is not None:
        choices = list(q.choices)
        answer = choices.index(q.answer)
    else:
        lo, hi = q.n_choices
        n = int(rng.integers(lo, min(hi, len(q.pool)) + 1))
        distract = [p for p in q.pool if p != q.answer]
        distract = [distract[j] for j in rng.choice(len(distract), n - 1, replace=False)]
        answer = int(rng.integers(n))
        choices = distract[:answer] + [q.answer] + distract[answer:]
    hint = q.hint
    if not hint and rng.random() < 0.2:
        hint = qs._pick(rng, qs.IRRELEVANT_HINTS).format(n=qs._pick(rng, qs.NAMES))
    image = render(scene, rng)
    if meta is not None:
        meta.update(scene=scene, clean=True)
    return {
        "id": f"synth-{split}-{i}",
        "image": image,
        "question": q.question,
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "task": "closed choice",
        "grade": "grade2",
        "subject": "natural science",
        "topic": "shapes",
        "category": SQA_CATEGORY[q.family],
        "skill": q.family,
        "lecture": "",
        "solution": f"The answer is {choices[answer]}.",
    }


# ---------------------------------------------------------------- VQAv2
def _q_color_v(scene, rng):
    return qs.q_color(scene, rng, variants=("What color is the {d}?", "What is the color of the {d}?"))


VQAV2_FAMILIES = [
    (qs.q_exists, 0.13), (qs.q_attr, 0.12), (qs.q_relation_yn, 0.08), (qs.q_compare_yn, 0.05),
    (qs.q_count, 0.20),
    (_q_color_v, 0.16), (qs.q_shape, 0.12), (qs.q_size, 0.04), (qs.q_relation_word, 0.05),
    (qs.q_superlative, 0.05),
]
_OTHER_POOL = list(qs.COLOR_NAMES) + list(SHAPES) + ["big", "small", "left", "right", "above", "below"]


def vqav2_row(seed: int, split: str, i: int, meta: dict | None = None, families=None) -> dict:
    """Row ``i``; ``families`` (a weighted list like VQAV2_FAMILIES) narrows it, for training drills only."""
    rng = row_rng(seed, "synth_vqav2", split, i)
    family = _weighted(rng, families or VQAV2_FAMILIES)
    scene, q = _ask(rng, family)
    pool = q.pool or _OTHER_POOL
    ans = annotate(q.answer, pool, rng)
    image = render(scene, rng)
    if meta is not None:
        meta.update(scene=scene, clean=True)
    image_id = SPLIT_IDS[split] * 10_000_000 + i
    return {
        "question_type": q.question_type,
        "multiple_choice_answer": q.answer,
        "answers": [{"answer": a, "answer_confidence": c, "answer_id": k + 1} for k, (a, c) in enumerate(ans)],
        "image_id": image_id,
        "answer_type": q.answer_type,
        "question_id": image_id * 1000,
        "question": q.question,
        "image": image,
    }


# ---------------------------------------------------------------- VizWiz
VIZWIZ_THIS = [("What color is this?", "color"), ("What is this?", "shape"),
               ("What shape is this?", "shape"), ("Can you tell me what color this is?", "color")]


def _q_color_vw(scene, rng):
    return qs.q_color(scene, rng, variants=("What color is the {d}?", "Can you tell me the color of the {d}?",
                                            "What colour is the {d}?"))


def _q_shape_vw(scene, rng):
    return qs.q_shape(scene, rng, variants=("What shape is the {d}?", "What kind of shape is the {d}?"))


VIZWIZ_FAMILIES = [(_q_color_vw, 0.35), (_q_shape_vw, 0.25), (qs.q_count, 0.20), (qs.q_exists, 0.20)]
UNANSWERABLE_SHARE = 0.22


def vizwiz_row(seed: int, split: str, i: int, meta: dict | None = None) -> dict:
    rng = row_rng(seed, "synth_vizwiz", split, i)
    degraded = rng.random() < UNANSWERABLE_SHARE
    if rng.random() < 0.3:  # a photo of one thing: "what is this?"
        scene = sample_scene(rng, n_min=1, n_max=1)
        text, kind = VIZWIZ_THIS[int(rng.integers(len(VIZWIZ_THIS)))]
        t = scene.objects[0]
        q = qs.Q(kind, text, t.color if kind == "color" else t.shape, "other", "what",
                 pool=qs.COLOR_NAMES if kind == "color" else list(SHAPES), target=t)
    else:
        scene, q = _ask(rng, _weighted(rng, VIZWIZ_FAMILIES))
    hires = render_hires(scene, rng)
    if degraded:
        image = None
        if q.target is not None and rng.random() < 0.4:
            image = crop_without(hires, scene, q.target, rng)
        if image is None:
            image = blurred(hires, rng) if rng.random() < 0.5 else dark(hires, rng)
        answers = annotate_unanswerable([q.answer] + list(q.pool or ["yes", "no"]), rng)
        category = "unanswerable"
    else:
        image = mild_photo(hires, rng)
        answers = annotate(q.answer, q.pool or ["yes", "no"], rng, unanswerable_p=0.04)
        category = q.answer_type
    if meta is not None:  # degraded photos don't show the scene's geometry
        meta.update(scene=scene, clean=not degraded)
    return {
        "question_id": f"VizWiz_synth_{split}_{i:08d}.png",
        "image": image,
        "question": q.question,
        "answers": [a for a, _ in answers],
        "category": category,
    }


ROW_FNS = {"synth_scienceqa": sqa_row, "synth_vizwiz": vizwiz_row, "synth_vqav2": vqav2_row}


def canonical_answer(task: str, row: dict) -> str:
    """The training target: the option letter, or the most frequent (canonical) answer."""
    if task == "synth_scienceqa":
        return "ABCDEFGHIJ"[row["answer"]]
    if task == "synth_vqav2":
        return row["multiple_choice_answer"]
    if row["category"] == "unanswerable":
        return "unanswerable"
    from .annotators import normalize
    counts: dict[str, int] = {}
    for a in row["answers"]:
        counts[normalize(a)] = counts.get(normalize(a), 0) + 1
    return max(counts, key=lambda k: counts[k])


# ---------------------------------------------------------------- captions (training aid, not a task)
CAPTION_PROMPT = "Describe the picture."


def _row_word(y: float) -> str:
    from .scene import SIZE

    return "at the top" if y < SIZE * 0.36 else ("at the bottom" if y > SIZE * 0.64 else "in the middle")


def caption_example(seed: int, i: int, meta: dict | None = None) -> dict:
    """A clean scene and its dense description (LLaVA stage-1 style alignment data for training).

    "3 shapes. From left to right: big red circle at the top, small blue cross in the middle, ..."
    Not one of the benchmark tasks; the training script mixes these in so that the vision
    features get a dense signal (every attribute of every object), not only a one-word answer.
    """
    rng = np.random.default_rng([int(seed), 4, SPLIT_IDS["train"], int(i)])
    scene = sample_scene(rng)
    objs = sorted(scene.objects, key=lambda o: o.x)
    n = len(objs)
    parts = [f"{o.size} {o.color} {o.shape} {_row_word(o.y)}" for o in objs]
    text = f"{n} shape{'s' if n > 1 else ''}. From left to right: " + ", ".join(parts) + "."
    if meta is not None:
        meta.update(scene=scene, clean=True)
    return {"image": render(scene, rng), "prompt": CAPTION_PROMPT, "answer": text}
