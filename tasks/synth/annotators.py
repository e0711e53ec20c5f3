"""Ten noisy human answers per open question, VQAv2 / VizWiz style.

Annotators mostly give the canonical answer, some write it differently in ways the VQA answer
normalisation forgives (casing, articles, trailing period, number words), some use a synonym or
make a typo (which the normalisation does not forgive), and some are simply wrong. Each question
gets its own difficulty, so agreement varies from question to question as in the real data. The
canonical answer is always the most frequent normalised answer and given by at least 3 people.
"""

from __future__ import annotations

import re

import numpy as np

NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
SYNONYMS = {
    "red": ["dark red", "maroon", "crimson"],
    "green": ["dark green", "lime"],
    "blue": ["navy", "dark blue", "light blue"],
    "yellow": ["gold", "mustard"],
    "purple": ["violet", "lavender"],
    "orange": ["amber", "tan"],
    "circle": ["round", "ball", "oval"],
    "square": ["box", "rectangle", "block"],
    "triangle": ["pyramid", "triangular"],
    "cross": ["plus", "plus sign", "x"],
    "big": ["large", "huge"],
    "small": ["tiny", "little"],
    "left": ["left side", "on left"],
    "right": ["right side", "on right"],
    "above": ["on top", "higher"],
    "below": ["under", "lower"],
    "yes": ["yeah", "yep", "sure"],
    "no": ["nope", "not"],
}
NOUNS = {"circle", "square", "triangle", "cross"}
_ARTICLES = {"a", "an", "the"}


def normalize(ans: str) -> str:
    """A light VQA-style normalisation, enough to check the annotators this module produces."""
    s = ans.lower().strip()
    s = re.sub(r"[^\w\s]", "", s)
    words = [NUMBER_WORDS.index(w).__str__() if w in NUMBER_WORDS else w for w in s.split()]
    return " ".join(w for w in words if w not in _ARTICLES)


def _forgiven_variant(ans: str, rng) -> str:
    opts = [ans.capitalize(), ans + ".", ans.upper()]
    if ans in NOUNS:
        opts += ["a " + ans, "the " + ans]
    if ans.isdigit() and int(ans) < len(NUMBER_WORDS):
        opts += [NUMBER_WORDS[int(ans)]] * 3
    return opts[int(rng.integers(len(opts)))]


def _typo(ans: str, rng) -> str | None:
    if len(ans) < 3 or not ans.isalpha():
        return None
    i = int(rng.integers(len(ans)))
    op = int(rng.integers(3))
    if op == 0:
        out = ans[:i] + ans[i + 1:]
    elif op == 1:
        out = ans[:i] + ans[i] + ans[i:]
    else:
        out = ans[:i] + "abcdefghijklmnopqrstuvwxyz"[int(rng.integers(26))] + ans[i + 1:]
    return out if normalize(out) != normalize(ans) else None


def _wrong(ans: str, pool: list[str], rng) -> str:
    if ans.isdigit():
        n = int(ans) + int(rng.choice([-1, 1, 1]))
        return str(max(n, 0)) if n != int(ans) else str(int(ans) + 1)
    others = [p for p in pool if normalize(p) != normalize(ans)]
    return others[int(rng.integers(len(others)))] if others else "unanswerable"


def annotate(answer: str, pool: list[str], rng: np.random.Generator, *, unanswerable_p: float = 0.0
             ) -> list[tuple[str, str]]:
    """Ten (answer, confidence) pairs for an answerable question with canonical ``answer``."""
    difficulty = float(rng.beta(1.2, 5.0))
    canon = normalize(answer)
    for _attempt in range(30):
        out = []
        for _ in range(10):
            u = rng.random()
            if u < difficulty:
                out.append((_wrong(answer, pool, rng), "maybe" if rng.random() < 0.5 else "yes"))
            elif u < difficulty + unanswerable_p:
                out.append(("unanswerable", "no" if rng.random() < 0.5 else "maybe"))
            elif u < difficulty + unanswerable_p + 0.08 and answer in SYNONYMS:
                syn = SYNONYMS[answer]
                out.append((syn[int(rng.integers(len(syn)))], "yes" if rng.random() < 0.7 else "maybe"))
            elif u < difficulty + unanswerable_p + 0.12:
                out.append((_typo(answer, rng) or answer, "yes"))
            elif u < difficulty + unanswerable_p + 0.26:
                out.append((_forgiven_variant(answer, rng), "yes"))
            else:
                out.append((answer, "yes" if rng.random() < 0.9 else "maybe"))
        if _is_clear_mode(out, canon):
            return out
    # fall back: make the first four annotators agree with the canonical answer
    return [(answer, "yes")] * 4 + out[4:]


def annotate_unanswerable(guesses: list[str], rng: np.random.Generator) -> list[tuple[str, str]]:
    """Ten answers for a degraded image: mostly "unanswerable", some guesses."""
    for _attempt in range(30):
        out = []
        for _ in range(10):
            u = rng.random()
            if u < 0.70:
                out.append(("unanswerable", "yes" if rng.random() < 0.8 else "maybe"))
            elif u < 0.77:
                out.append(("unsuitable", "maybe"))
            elif guesses:
                out.append((guesses[int(rng.integers(len(guesses)))], "maybe" if rng.random() < 0.7 else "no"))
            else:
                out.append(("unanswerable", "yes"))
        if _is_clear_mode(out, "unanswerable"):
            return out
    return [("unanswerable", "yes")] * 4 + out[4:]


def _is_clear_mode(out: list[tuple[str, str]], canon: str) -> bool:
    counts: dict[str, int] = {}
    for a, _ in out:
        k = normalize(a)
        counts[k] = counts.get(k, 0) + 1
    c = counts.get(canon, 0)
    return c >= 3 and all(v < c for k, v in counts.items() if k != canon)
