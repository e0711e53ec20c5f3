"""Answer parsing and scoring for the real tasks, reproducing the reference protocols.

Why this file exists: published numbers are only comparable when parsing and scoring match the
reference code character for character, quirks included (docs/protocols.md). Each function says
which reference it follows. The code is written for this project; only the facts (rules and
lookup tables) come from the references.

Public API (imported by other tools; keep the signatures):
  scienceqa_letter, scienceqa_correct, vqa_normalize, vqa_accuracy,
  scienceqa_result, vqa_result (structured per-sample parse), Scored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ---------------------------------------------------------------- ScienceQA (LLaVA-1.5)

#: LLaVA eval_science_qa.py: ``--options`` defaults to ["A", "B", "C", "D", "E"].
SQA_OPTIONS: tuple[str, ...] = ("A", "B", "C", "D", "E")
# LLaVA-1.5's pattern, verbatim as a regex: the final "." is unescaped, so it matches ANY
# one character after the letter (but not end-of-string, and not a newline).
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(prediction: str) -> str | None:
    """Parse a ScienceQA prediction into an option letter, or None when parsing fails.

    Rules of LLaVA-1.5 ``llava/eval/eval_science_qa.py`` (the revision docs/protocols.md cites, whose
    parser gives 71.64 on the published 13B outputs), applied in order:
      1. the prediction itself when it is one of "A".."E" (the default ``--options``);
      2. its first character when it has >= 3 characters, starts with one of "A".."E" and
         characters 1..2 are ". " (so "A. text" -> "A", but "A." -> None);
      3. the single match of ``The answer is ([A-Z]).`` (two or more matches, or none -> None;
         "The answer is B" at the very end has no character for the "." -> None);
      otherwise None (LLaVA's "FAILED").
    Case-sensitive, as in LLaVA ("a" -> None). Rule 3 may return a letter beyond "E" (e.g. "F");
    LLaVA keeps it as the parsed answer and scores it wrong, see ``scienceqa_correct``.
    The prediction is stripped first: LLaVA's ``model_vqa_science.py`` strips the decoded
    output before writing it, so the parser only ever sees stripped text.
    A later revision of eval_science_qa.py (not the one behind the published numbers) also maps
    newlines to ". " and accepts "The answer is B" without a trailing character; not used here.
    """
    text = prediction.strip()
    if text in SQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _SQA_ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def _sqa_index(letter: str | None, n_choices: int) -> int:
    """LLaVA's get_pred_idx: index of the letter among the first n_choices options, else -1."""
    valid = SQA_OPTIONS[: max(n_choices, 0)]
    return valid.index(letter) if letter in valid else -1


def scienceqa_correct(prediction: str, answer_index: int, n_choices: int) -> bool:
    """True when the parsed letter is the gold option; a letter beyond n_choices is wrong."""
    return _sqa_index(scienceqa_letter(prediction), n_choices) == answer_index


# ---------------------------------------------------------------- VQA normalisation tables
# Facts shared by EvalAI's answer processor (LLaVA m4c_evaluator.py) and the official VQA
# evaluation (GT-Vision-Lab/VQA vqaEval.py, current revision): same tables, same punctuation.

_CONTRACTION_PAIRS = """
aint ain't|arent aren't|cant can't|couldve could've|couldnt couldn't|couldn'tve couldn't've|
couldnt've couldn't've|didnt didn't|doesnt doesn't|dont don't|hadnt hadn't|hadnt've hadn't've|
hadn'tve hadn't've|hasnt hasn't|havent haven't|hed he'd|hed've he'd've|he'dve he'd've|hes he's|
howd how'd|howll how'll|hows how's|Id've I'd've|I'dve I'd've|Im I'm|Ive I've|isnt isn't|itd it'd|
itd've it'd've|it'dve it'd've|itll it'll|let's let's|maam ma'am|mightnt mightn't|
mightnt've mightn't've|mightn'tve mightn't've|mightve might've|mustnt mustn't|mustve must've|
neednt needn't|notve not've|oclock o'clock|oughtnt oughtn't|ow's'at 'ow's'at|'ows'at 'ow's'at|
'ow'sat 'ow's'at|shant shan't|shed've she'd've|she'dve she'd've|she's she's|shouldve should've|
shouldnt shouldn't|shouldnt've shouldn't've|shouldn'tve shouldn't've|somebody'd somebodyd|
somebodyd've somebody'd've|somebody'dve somebody'd've|somebodyll somebody'll|
somebodys somebody's|someoned someone'd|someoned've someone'd've|someone'dve someone'd've|
someonell someone'll|someones someone's|somethingd something'd|somethingd've something'd've|
something'dve something'd've|somethingll something'll|thats that's|thered there'd|
thered've there'd've|there'dve there'd've|therere there're|theres there's|theyd they'd|
theyd've they'd've|they'dve they'd've|theyll they'll|theyre they're|theyve they've|twas 'twas|
wasnt wasn't|wed've we'd've|we'dve we'd've|weve we've|werent weren't|whatll what'll|
whatre what're|whats what's|whatve what've|whens when's|whered where'd|wheres where's|
whereve where've|whod who'd|whod've who'd've|who'dve who'd've|wholl who'll|whos who's|
whove who've|whyll why'll|whyre why're|whys why's|wont won't|wouldve would've|wouldnt wouldn't|
wouldnt've wouldn't've|wouldn'tve wouldn't've|yall y'all|yall'll y'all'll|y'allll y'all'll|
yall'd've y'all'd've|y'alld've y'all'd've|y'all'dve y'all'd've|youd you'd|youd've you'd've|
you'dve you'd've|youll you'll|youre you're|youve you've
"""
# Note the reference quirks kept on purpose: "somebody'd" maps to "somebodyd", and the keys with
# capitals (Im, Ive, Id've, I'dve) can never match because words are lower-cased first.
CONTRACTIONS: dict[str, str] = dict(
    pair.split() for pair in _CONTRACTION_PAIRS.replace("\n", "").split("|")
)
NUMBER_WORDS: dict[str, str] = {
    w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())
}
NUMBER_WORDS["none"] = "0"
ARTICLES: frozenset[str] = frozenset({"a", "an", "the"})
#: Characters removed or turned into spaces; note: no "'", ":" or "." (periods: PERIOD_STRIP).
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
    ",", "?", "!",
)
# "(?!<=\d)" is a negative LOOKAHEAD for the text "<=digit" (a typo for the lookbehind
# "(?<!\d)"); it never blocks, so every "." not followed by a digit is deleted ("5." -> "5").
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# Both references call periodStrip.sub(repl, text, re.UNICODE): the flag lands in the `count`
# parameter, so at most int(re.UNICODE) == 32 periods are deleted per string.
PERIOD_STRIP_COUNT = int(re.UNICODE)
# The "digit-comma rule": when the text has a comma between digits, every punctuation mark is
# deleted outright instead of being turned into a space. The official and EvalAI patterns differ
# slightly ("1,,2" only triggers EvalAI's); each is used where its reference uses it.
VQA_COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
EVALAI_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")


def _process_punctuation(text: str, comma_strip: re.Pattern[str]) -> str:
    # Conditions are tested on the ORIGINAL text, replacements applied cumulatively (as in both refs).
    delete_all = comma_strip.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_STRIP.sub("", out, count=PERIOD_STRIP_COUNT)


def vqa_process_punctuation(text: str) -> str:
    """Official vqaEval.py processPunctuation (its commaStrip pattern, its periodStrip quirks)."""
    return _process_punctuation(text, VQA_COMMA_STRIP)


def vqa_process_digit_article(text: str) -> str:
    """Official processDigitArticle: lower-case, number words -> digits, drop articles, contractions."""
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_normalize(answer: str) -> str:
    """EvalAI's answer processor (LLaVA m4c_evaluator.py EvalAIAnswerProcessor.__call__).

    Steps: lower-case; delete "," and "?"; "'s" -> " 's" (so "man's" -> "man 's"); strip;
    newlines/tabs -> spaces; strip; punctuation with EvalAI's digit-comma pattern (never fires
    here because commas are already gone); periodStrip; number words, articles, contractions.
    LLaVA applies it to every raw VQAv2/VizWiz output before submission.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return vqa_process_digit_article(_process_punctuation(text, EVALAI_COMMA_STRIP))


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQA accuracy in [0, 1] of vqa_normalize(prediction) against the raw human answers.

    Reproduces GT-Vision-Lab/VQA vqaEval.py (current revision) fed with LLaVA's normalised
    prediction: newlines/tabs -> spaces and strip on every string; only when the humans disagree
    (len(set(answers)) > 1) are the answers AND the prediction passed through processPunctuation
    and processDigitArticle; then the mean over the leave-one-out subsets (one per human answer,
    the other n-1 kept) of min(1, matches / 3). With 10 answers: 1 match -> 0.3, 2 -> 0.6,
    3 -> 0.9, 4+ -> 1.0. When all humans agree nothing is normalised on their side, so
    "2" scores 0 against ten "two" (kept quirk of the reference route).
    """
    if not answers:
        return 0.0
    pred = _clean_whitespace(vqa_normalize(prediction))
    gts = [_clean_whitespace(a) for a in answers]
    if len(set(gts)) > 1:
        gts = [vqa_process_digit_article(vqa_process_punctuation(a)) for a in gts]
        pred = vqa_process_digit_article(vqa_process_punctuation(pred))
    matches = sum(gt == pred for gt in gts)
    # Leaving out human i removes one match exactly when human i matched.
    total = sum(min(1.0, (matches - (gt == pred)) / 3.0) for gt in gts)
    return total / len(gts)


# ---------------------------------------------------------------- structured per-sample results


@dataclass(frozen=True)
class Scored:
    """One scored generation: what was parsed, its score, and why it may have failed.

    empty: the generation was blank (e.g. an exception swallowed into ""), counted apart.
    unparsed: not empty, but no answer could be read from it (scored 0).
    """

    parsed: str | None
    score: float
    empty: bool
    unparsed: bool

    def metrics(self) -> dict[str, float | int]:
        """The per-doc metric dict every task returns from process_results."""
        return {"accuracy": float(self.score), "empty": int(self.empty), "unparsed": int(self.unparsed)}


def scienceqa_result(prediction: str, answer_index: int, n_choices: int) -> Scored:
    """ScienceQA: parsed letter (or None), 1.0/0.0, empty and unparsed flags."""
    empty = not prediction.strip()
    letter = scienceqa_letter(prediction)
    correct = _sqa_index(letter, n_choices) == answer_index
    return Scored(letter, 1.0 if correct else 0.0, empty, letter is None and not empty)


def vqa_result(prediction: str, answers: list[str]) -> Scored:
    """VQAv2/VizWiz: EvalAI-normalised answer, VQA accuracy, empty and unparsed flags.

    unparsed: a non-blank generation that normalises to "" (e.g. "?" or "...").
    """
    empty = not prediction.strip()
    parsed = vqa_normalize(prediction)
    return Scored(parsed, vqa_accuracy(prediction, answers), empty, not parsed and not empty)
