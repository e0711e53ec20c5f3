"""Question families over a scene: each returns a question, its canonical answer and metadata.

A family returns ``None`` when the scene doesn't support it (e.g. no unique description); the
caller then draws a new scene. Answers are canonical single words ("red", "3", "yes", "left").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .scene import COLORS, SHAPES, SIZES, Obj, Scene, describe

COLOR_NAMES = list(COLORS)
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses"}
NUMBER_POOL = [str(i) for i in range(0, 7)]


@dataclass
class Q:
    family: str
    question: str
    answer: str
    answer_type: str  # "yes/no" | "number" | "other"
    question_type: str  # VQAv2-style prefix, e.g. "what color is the"
    pool: list[str] = field(default_factory=list)  # alternative answers (MC distractors, wrong annotators)
    target: Obj | None = None
    hint: str = ""
    n_choices: tuple[int, int] = (2, 5)  # inclusive range for multiple choice
    choices: list[str] | None = None  # fixed choices (multiple choice families)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _obj(scene: Scene, rng) -> Obj:
    return _pick(rng, scene.objects)


# ---------------------------------------------------------------- open / shared families
def q_color(scene: Scene, rng, variants=("What color is the {d}?",)) -> Q | None:
    t = _obj(scene, rng)
    d = describe(scene, t, exclude=("color",), rng=rng)
    if d is None:
        return None
    return Q("color", _pick(rng, variants).format(d=d), t.color, "other", "what color is the",
             pool=COLOR_NAMES, target=t, n_choices=(4, 5))


def q_shape(scene: Scene, rng, variants=("What shape is the {d}?",)) -> Q | None:
    t = _obj(scene, rng)
    d = describe(scene, t, exclude=("shape",), rng=rng)
    if d is None:
        return None
    return Q("shape", _pick(rng, variants).format(d=d), t.shape, "other", "what shape is the",
             pool=list(SHAPES), target=t, n_choices=(4, 4))


def q_size(scene: Scene, rng) -> Q | None:
    t = _obj(scene, rng)
    d = describe(scene, t, exclude=("size",), rng=rng)
    if d is None:
        return None
    return Q("size", f"What size is the {d}?", t.size, "other", "what size is the",
             pool=list(SIZES), target=t, n_choices=(2, 2))


def _count_filter(scene: Scene, rng) -> tuple[dict, str]:
    """A filter (attributes) and its plural noun phrase; mostly one that matches something."""
    kind = _pick(rng, ("all", "color", "shape", "color_shape", "shape", "color"))
    if kind == "all":
        return {}, "shapes"
    src = _obj(scene, rng)
    if rng.random() < 0.12:  # sometimes ask about something absent (answer 0)
        src = Obj(_pick(rng, SHAPES), _pick(rng, COLOR_NAMES), "big", 0, 0, 0)
    if kind == "color":
        return {"color": src.color}, f"{src.color} shapes"
    if kind == "shape":
        return {"shape": src.shape}, PLURAL[src.shape]
    return {"color": src.color, "shape": src.shape}, f"{src.color} {PLURAL[src.shape]}"


def q_count(scene: Scene, rng) -> Q | None:
    attrs, noun = _count_filter(scene, rng)
    n = scene.count(**attrs)
    return Q("count", f"How many {noun} are there?", str(n), "number", "how many",
             pool=NUMBER_POOL, n_choices=(4, 5))


def q_exists(scene: Scene, rng) -> Q | None:
    present = rng.random() < 0.5
    for _ in range(20):
        if present:
            o = _obj(scene, rng)
            color, shape = o.color, o.shape
        else:
            color, shape = _pick(rng, COLOR_NAMES), _pick(rng, SHAPES)
        form = _pick(rng, ("cs", "s", "c"))
        attrs = {"cs": {"color": color, "shape": shape}, "s": {"shape": shape}, "c": {"color": color}}[form]
        if (scene.count(**attrs) > 0) != present:
            continue
        text = {"cs": f"Is there a {color} {shape}?", "s": f"Is there a {shape}?",
                "c": f"Is there a {color} shape?"}[form]
        return Q("exists", text, "yes" if present else "no", "yes/no", "is there a", pool=["yes", "no"])
    return None


def q_attr(scene: Scene, rng) -> Q | None:
    t = _obj(scene, rng)
    truth = rng.random() < 0.5
    if rng.random() < 0.5:
        d = describe(scene, t, exclude=("color",), rng=rng)
        if d is None:
            return None
        c = t.color if truth else _pick(rng, [c for c in COLOR_NAMES if c != t.color])
        text = f"Is the {d} {c}?"
    else:
        d = describe(scene, t, exclude=("shape",), rng=rng)
        if d is None:
            return None
        s = t.shape if truth else _pick(rng, [s for s in SHAPES if s != t.shape])
        text = f"Is the {d} a {s}?"
    return Q("attr", text, "yes" if truth else "no", "yes/no", "is the", pool=["yes", "no"], target=t)


def _pair(scene: Scene, rng, axis: str, min_gap: float = 12.0):
    """Two described objects whose centres are ``min_gap`` px apart on ``axis``.

    12 px since version 4 (8 before): a big shape is ~19 px wide at 64 px, so nearer centres
    overlap on that axis and "left of" becomes a judgement call.
    """
    if len(scene.objects) < 2:
        return None
    for _ in range(10):
        i, j = rng.choice(len(scene.objects), 2, replace=False)
        a, b = scene.objects[int(i)], scene.objects[int(j)]
        gap = (a.x - b.x) if axis == "x" else (a.y - b.y)
        if abs(gap) >= min_gap:
            da, db = describe(scene, a, rng=rng), describe(scene, b, rng=rng)
            if da and db:
                return a, b, da, db, gap
    return None


def q_relation_word(scene: Scene, rng) -> Q | None:
    axis = _pick(rng, ("x", "y"))
    p = _pair(scene, rng, axis)
    if p is None:
        return None
    a, b, da, db, gap = p
    if axis == "x":
        q = Q("relation", f"Is the {da} left or right of the {db}?", "left" if gap < 0 else "right",
              "other", "is the", pool=["left", "right"], n_choices=(2, 2))
    else:
        q = Q("relation", f"Is the {da} above or below the {db}?", "above" if gap < 0 else "below",
              "other", "is the", pool=["above", "below"], n_choices=(2, 2))
    q.target_pair = (a, b)  # type: ignore[attr-defined]
    return q


def q_relation_yn(scene: Scene, rng) -> Q | None:
    axis = _pick(rng, ("x", "y"))
    p = _pair(scene, rng, axis)
    if p is None:
        return None
    a, b, da, db, gap = p
    rel = _pick(rng, ("left of", "right of") if axis == "x" else ("above", "below"))
    holds = {"left of": gap < 0, "right of": gap > 0, "above": gap < 0, "below": gap > 0}[rel]
    phrase = {"left of": "to the left of", "right of": "to the right of", "above": "above",
              "below": "below"}[rel]
    return Q("relation_yn", f"Is the {da} {phrase} the {db}?", "yes" if holds else "no", "yes/no",
             "is the", pool=["yes", "no"])


def _big_small(scene: Scene, rng):
    bigs = [o for o in scene.objects if o.size == "big"]
    smalls = [o for o in scene.objects if o.size == "small"]
    if not bigs or not smalls:
        return None
    a, b = _pick(rng, bigs), _pick(rng, smalls)
    da = describe(scene, a, exclude=("size",), rng=rng)
    db = describe(scene, b, exclude=("size",), rng=rng)
    if not da or not db:
        return None
    return a, b, da, db, smalls


def q_compare_yn(scene: Scene, rng) -> Q | None:
    p = _big_small(scene, rng)
    if p is None:
        return None
    a, b, da, db, _ = p
    if rng.random() < 0.5:
        return Q("compare_yn", f"Is the {da} bigger than the {db}?", "yes", "yes/no", "is the", pool=["yes", "no"])
    return Q("compare_yn", f"Is the {db} bigger than the {da}?", "no", "yes/no", "is the", pool=["yes", "no"])


_EXTREMES = {"leftmost": ("x", min), "rightmost": ("x", max), "top": ("y", min), "bottom": ("y", max)}


def q_superlative(scene: Scene, rng) -> Q | None:
    if len(scene.objects) < 2:
        return None
    which = _pick(rng, list(_EXTREMES))
    axis, fn = _EXTREMES[which]
    key = (lambda o: o.x) if axis == "x" else (lambda o: o.y)
    objs = sorted(scene.objects, key=key, reverse=(fn is max))
    if abs(key(objs[0]) - key(objs[1])) < 10:  # a clear winner (version 4; was 6 px)
        return None
    t = objs[0]
    phrase = {"leftmost": "the leftmost shape", "rightmost": "the rightmost shape",
              "top": "the shape at the top", "bottom": "the shape at the bottom"}[which]
    if rng.random() < 0.6:
        return Q("superlative", f"What color is {phrase}?", t.color, "other", "what color is the",
                 pool=COLOR_NAMES, target=t, n_choices=(4, 5))
    return Q("superlative", f"What shape is {phrase}?", t.shape, "other", "what shape is the",
             pool=list(SHAPES), target=t, n_choices=(4, 4))


# ---------------------------------------------------------------- multiple-choice-only families
def mc_compare(scene: Scene, rng) -> Q | None:
    p = _big_small(scene, rng)
    if p is None:
        return None
    a, b, da, db, smalls = p
    choices = [f"the {da}", f"the {db}"]
    others = [o for o in smalls if o is not b]
    if others and rng.random() < 0.8:
        dc = describe(scene, others[0], exclude=("size",), rng=rng)
        if dc and f"the {dc}" not in choices:
            choices.append(f"the {dc}")
    return Q("compare", "Which shape is bigger?" if len(choices) == 2 else "Which shape is the biggest?",
             f"the {da}", "other", "which shape is", choices=choices)


def mc_more(scene: Scene, rng) -> Q | None:
    if rng.random() < 0.5:
        items = [(s, PLURAL[s], scene.count(shape=s)) for s in SHAPES]
    else:
        items = [(c, f"{c} shapes", scene.count(color=c)) for c in COLOR_NAMES]
    order = rng.permutation(len(items))
    x, y = items[int(order[0])], items[int(order[1])]
    if x[2] == y[2]:
        return None
    ans = x if x[2] > y[2] else y
    return Q("more", f"Are there more {x[1]} or {y[1]}?", ans[1], "other", "are there more",
             choices=[x[1], y[1]])


def mc_relation(scene: Scene, rng) -> Q | None:
    q = q_relation_word(scene, rng)
    if q is None:
        return None
    q.question = q.question.replace("Is the ", "Where is the ", 1)
    q.question = q.question.replace(" left or right of ", " compared to ").replace(" above or below ", " compared to ")
    words = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    a, b = q.pool
    choices = [words[a], words[b]]
    # a third option from the other axis that is false: the scene has no objects at equal heights
    # (or columns) that would make it true, because its opposite is what we add
    (ta, tb) = q.target_pair  # type: ignore[attr-defined]
    if a == "left":
        choices.append("below" if ta.y <= tb.y else "above")
    else:
        choices.append("right of" if ta.x <= tb.x else "left of")
    q.choices = [choices[i] for i in rng.permutation(3)]
    q.answer = words[q.answer]
    return q


# ---------------------------------------------------------------- context (hint) families
NAMES = ["Mia", "Leo", "Ava", "Sam", "Zoe", "Max", "Ella", "Ben"]
LABELS = ["hot", "cold", "sweet", "sour", "fast", "slow", "loud", "quiet"]
MATERIALS = ["wood", "metal", "glass", "paper", "stone"]
IRRELEVANT_HINTS = [
    "The picture shows some shapes on a table.",
    "Look at the shapes in the picture.",
    "{n} drew this picture.",
    "Figure: shapes on a board.",
    "This picture is from a game for children.",
]


# Version 4: the hint says which object the question is about, and the picture gives the answer,
# as in ScienceQA-IMG's context questions (the context names the thing, the image shows it). The
# question itself names no colour, shape or size, so without the hint it is ambiguous, and the
# answer is never in the hint, so without the image it is a guess. The hint states one fact:
# versions 1-3 asked for a look-up among several key-value facts ("Mia drew the circles. Leo drew
# the squares.") which a 4 M-parameter decoder never learned (the bundled model's card).
def h_owner(scene: Scene, rng) -> Q | None:
    """"Mia drew the big circle." -> "What color is the shape Mia drew?" (the circle's colour)."""
    if len(scene.objects) < 2 or len({o.color for o in scene.objects}) < 2:
        return None
    t = _obj(scene, rng)
    d = describe(scene, t, exclude=("color",), rng=rng)
    if d is None:
        return None
    name = _pick(rng, NAMES)
    return Q("context_owner", f"What color is the shape {name} drew?", t.color, "other", "what color is the",
             pool=COLOR_NAMES, target=t, hint=f"{name} drew the {d}.", n_choices=(4, 5))


def h_labels(scene: Scene, rng) -> Q | None:
    """"In this game the red shape is hot." -> "Which shape is hot?" (the red one's shape)."""
    if len(scene.objects) < 2 or len({o.shape for o in scene.objects}) < 2:
        return None
    t = _obj(scene, rng)
    d = describe(scene, t, exclude=("shape",), rng=rng)
    if d is None:
        return None
    label = _pick(rng, LABELS)
    return Q("context_labels", f"Which shape is {label}?", t.shape, "other", "which shape is",
             pool=list(SHAPES), target=t, hint=f"In this game the {d} is {label}.", n_choices=(4, 4))


def h_material(scene: Scene, rng) -> Q | None:
    """"The blue shapes are made of glass." -> "How many shapes are made of glass?" (count them)."""
    if len(scene.objects) < 2:
        return None
    # every group in the picture that a colour, a shape or both name; the count is drawn first, so
    # that "1" (most colour-and-shape groups) doesn't dominate the answers
    groups: dict[int, list[tuple[dict, str]]] = {}
    for o in scene.objects:
        for attrs, noun in (({"color": o.color}, f"{o.color} shapes"), ({"shape": o.shape}, PLURAL[o.shape]),
                            ({"color": o.color, "shape": o.shape}, f"{o.color} {PLURAL[o.shape]}")):
            found = groups.setdefault(scene.count(**attrs), [])
            if (attrs, noun) not in found:
                found.append((attrs, noun))
    attrs, noun = _pick(rng, groups[_pick(rng, sorted(groups))])
    mat = _pick(rng, MATERIALS)
    return Q("context_material", f"How many shapes are made of {mat}?", str(scene.count(**attrs)), "number",
             "how many", pool=NUMBER_POOL, hint=f"The {noun} are made of {mat}.", n_choices=(4, 5))
