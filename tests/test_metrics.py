"""Parser and scorer values worked out by hand from the reference rules (see tasks/metrics.py).

ScienceQA: LLaVA-1.5 llava/eval/eval_science_qa.py. VQA: EvalAI answer processor (LLaVA
m4c_evaluator.py) on the prediction, then GT-Vision-Lab vqaEval.py against the human answers.
"""

import pytest

from tasks.metrics import (
    scienceqa_correct,
    scienceqa_letter,
    scienceqa_result,
    vqa_accuracy,
    vqa_normalize,
    vqa_process_digit_article,
    vqa_process_punctuation,
    vqa_result,
)

# ---------------------------------------------------------------- ScienceQA letter parsing


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("B", "B"),  # rule 1: the prediction is an option letter
        ("E", "E"),  # "E" is the fifth default option
        ("  C\n", "C"),  # model_vqa_science.py strips the output before parsing
        ("A. Topeka", "A"),  # rule 2: len >= 3, pred[0] in options, pred[1:3] == ". "
        ("A.", None),  # len 2: not rule 1/2, no "The answer is" -> FAILED in LLaVA
        ("A.Topeka", None),  # pred[1:3] == ".T" != ". "
        ("A) Topeka", None),  # only "X. " is accepted at the start
        ("The answer is B.", "B"),  # rule 3: one match of r"The answer is ([A-Z])."
        ("Because of the map, The answer is C, clearly", "C"),  # "." matches any char (",")
        ("The answer is B", None),  # nothing after B for the unescaped "." to match
        ("The answer is B\n", None),  # stripped to the previous case
        ("The answer is A. The answer is B.", None),  # two matches -> FAILED
        ("The answer is F.", "F"),  # [A-Z]: parsed, then wrong (beyond the options)
        ("b", None),  # case-sensitive: lower-case letters are not options
        ("a. topeka", None),  # lmms-eval #427 lower-cased the prediction; LLaVA does not
        ("the answer is b.", None),  # regex is case-sensitive
        ("F", None),  # rule 1 only knows A..E; F has no "The answer is"
        ("", None),  # empty output
        ("   ", None),
        ("Topeka", None),  # an answer text without a letter fails
    ],
)
def test_scienceqa_letter(pred, letter):
    assert scienceqa_letter(pred) == letter


def test_scienceqa_correct_and_choice_range():
    # 3 choices, gold index 1 ("B").
    assert scienceqa_correct("B", 1, 3) is True
    assert scienceqa_correct("B. Wichita", 1, 3) is True
    assert scienceqa_correct("The answer is B.", 1, 3) is True
    assert scienceqa_correct("A", 1, 3) is False
    # "D" parses (rule 1) but options[:3] == [A, B, C] -> get_pred_idx = -1 -> wrong, even if the
    # gold index were 3 (can't be with 3 choices, so index 3 never matches a valid letter).
    assert scienceqa_correct("D", 3, 3) is False
    assert scienceqa_correct("D", 3, 4) is True
    assert scienceqa_correct("The answer is F.", 5, 5) is False  # F not among A..E
    assert scienceqa_correct("", 0, 2) is False


def test_lmms_eval_bug_cases_427_723():
    # lmms-eval #427: pred lower-cased before `pred[0].isupper()` -> "A."-style never scored.
    # lmms-eval #723: after PR 174, "A." did not score when the answer was A.
    # Our rule is LLaVA's: "A." is a parse FAILURE (counted as unparsed, scored 0), while
    # "A. <text>" and upper-case letters parse; nothing is lower-cased.
    r = scienceqa_result("A.", answer_index=0, n_choices=4)
    assert (r.parsed, r.score, r.empty, r.unparsed) == (None, 0.0, False, True)
    r = scienceqa_result("A. Des Moines", answer_index=0, n_choices=4)
    assert (r.parsed, r.score, r.empty, r.unparsed) == ("A", 1.0, False, False)
    r = scienceqa_result("C", answer_index=2, n_choices=4)
    assert (r.parsed, r.score) == ("C", 1.0)


def test_scienceqa_result_flags():
    assert scienceqa_result("", 0, 3).metrics() == {"accuracy": 0.0, "empty": 1, "unparsed": 0}
    assert scienceqa_result("Topeka", 2, 4).metrics() == {"accuracy": 0.0, "empty": 0, "unparsed": 1}
    # Parsed but beyond the choices: wrong, not unparsed (LLaVA keeps parsed_ans "D").
    assert scienceqa_result("D", 0, 3).metrics() == {"accuracy": 0.0, "empty": 0, "unparsed": 0}


# ---------------------------------------------------------------- EvalAI normalisation


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Yes.", "yes"),  # lower; "." not followed by a digit is deleted
        ("man's hat", "man 's hat"),  # "'s" -> " 's" (word_tokenize)
        ("Two", "2"),  # number words -> digits
        ("two dogs", "2 dogs"),
        ("none", "0"),  # "none" maps to "0" in the table
        ("A dog", "dog"),  # articles dropped
        ("the an a", ""),
        ("What?", "what"),  # "?" deleted
        ("1,000", "1000"),  # "," deleted up front
        ("dont", "don't"),  # contractions table
        ("Im", "im"),  # capitalised table keys never match after lower-casing
        ("black/white", "black white"),  # "/" with no space next to it -> space
        ("black / white", "black white"),  # " /" present -> "/" deleted, spaces collapse
        ("3.5", "3.5"),  # "." followed by a digit is kept
        ("5.", "5"),  # periodStrip's "(?!<=\d)" is a lookahead: "." after a digit still goes
        ("u.s.a.", "usa"),  # periods deleted, not spaced
        ("Unanswerable", "unanswerable"),
        ("  hot\tdog \n", "hot dog"),
        ("?", ""),
    ],
)
def test_vqa_normalize(raw, norm):
    assert vqa_normalize(raw) == norm


def test_period_strip_count_quirk():
    # Both references call periodStrip.sub("", text, re.UNICODE): re.UNICODE == 32 lands in
    # `count`, so at most 32 of 40 periods go -> 8 remain.
    assert vqa_normalize("." * 40) == "." * 8
    assert vqa_process_punctuation("x" + "." * 33) == "x."


def test_official_digit_comma_rule():
    # commaStrip (\d)(,)(\d) found -> EVERY mark is deleted instead of spaced:
    # "1,000/2" -> "," and "/" deleted -> "10002" (without the rule: "1 000 2").
    assert vqa_process_punctuation("1,000/2") == "10002"
    assert vqa_process_punctuation("red,blue") == "red blue"  # no digit-comma: "," -> space
    assert vqa_process_punctuation("red, blue") == "red blue"  # ", " present: "," deleted
    assert vqa_process_digit_article("The Two Cats") == "2 cats"


# ---------------------------------------------------------------- VQA accuracy

TEN = 10


def test_yes_vs_ten_yes():
    # "Yes." -> "yes"; humans agree (no processing); 10 matches; every leave-one-out subset has
    # 9 matches -> min(1, 9/3) = 1 -> 1.0.
    assert vqa_accuracy("Yes.", ["yes"] * TEN) == 1.0


def test_two_humans_give_point_six():
    # 2 of 10 match. The 2 matching humans, left out, leave 1 match: 1/3 each;
    # the 8 others leave 2 matches: 2/3 each. (2/3 + 16/3) / 10 = 18/30 = 0.6 (not 2/3).
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx(0.6)


def test_one_three_four_humans():
    # 1 match: 9 subsets x 1/3, 1 subset x 0 -> 3/10 = 0.3.
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    # 3 matches: 3 subsets x 2/3 + 7 subsets x 1 = 9 -> 0.9 (leave-one-out, not 1.0).
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 4 matches: 4 subsets x min(1, 3/3) + 6 x min(1, 4/3) = 10 -> 1.0.
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == 1.0
    assert vqa_accuracy("green", ["red"] * 4 + ["blue"] * 6) == 0.0


def test_two_vs_2():
    # "two" -> "2". Humans agree on "2": exact -> 1.0.
    assert vqa_accuracy("two", ["2"] * TEN) == 1.0
    # Humans agree on "two": no processing on their side, "2" != "two" -> 0.0 (reference quirk).
    assert vqa_accuracy("two", ["two"] * TEN) == 0.0
    # Humans disagree (9 "two", 1 "2"): all processed -> ten "2" -> 1.0.
    assert vqa_accuracy("two", ["two"] * 9 + ["2"]) == 1.0


def test_a_dog_vs_dog():
    assert vqa_accuracy("a dog", ["dog"] * TEN) == 1.0  # "a dog" -> "dog"
    assert vqa_accuracy("a dog", ["a dog"] * TEN) == 0.0  # agreeing humans keep "a dog"
    # Disagreeing humans are processed: "a dog" -> "dog": 5 + 3 = 8 matches -> 1.0.
    assert vqa_accuracy("A dog.", ["a dog"] * 5 + ["dog"] * 3 + ["cat"] * 2) == 1.0


def test_mans_hat():
    # vqa_normalize("man's hat") == "man 's hat"; the official punctuation list has no "'",
    # so a human "man's hat" never becomes "man 's hat": 0 matches either way.
    assert vqa_accuracy("man's hat", ["man's hat"] * TEN) == 0.0
    assert vqa_accuracy("man's hat", ["man's hat"] * 5 + ["hat"] * 5) == 0.0
    # ... while "hat" matches 5 humans -> 1.0.
    assert vqa_accuracy("hat", ["man's hat"] * 5 + ["hat"] * 5) == 1.0


def test_unanswerable():
    # VizWiz: "unanswerable" is an ordinary string. 6 matches -> 1.0; 2 matches -> 0.6.
    answers = ["unanswerable"] * 6 + ["unsuitable"] * 4
    assert vqa_accuracy("Unanswerable", answers) == 1.0
    assert vqa_accuracy("unanswerable", ["unanswerable"] * 2 + ["soup"] * 8) == pytest.approx(0.6)


def test_digit_comma_rule_in_scoring():
    # Humans disagree; "1,000" has a digit-comma -> punctuation deleted -> "1000" (x3);
    # "1000" (x1); "a lot" -> "lot". Prediction "1,000" -> EvalAI deletes "," -> "1000".
    # 4 matches -> 1.0.
    answers = ["1,000"] * 3 + ["1000"] + ["a lot"] * 6
    assert vqa_accuracy("1,000", answers) == 1.0
    # Humans agree on "1,000": not processed; prediction "1000" != "1,000" -> 0.0.
    assert vqa_accuracy("1,000", ["1,000"] * TEN) == 0.0


def test_period_strip_in_scoring():
    # Disagreeing humans: "3.5" keeps its period (followed by a digit) x4 -> match "3.5".
    assert vqa_accuracy("3.5", ["3.5"] * 4 + ["3"] * 6) == 1.0
    # "5." -> "5" on both sides when processed: 3 humans "5." + 1 "5" = 4 matches -> 1.0.
    assert vqa_accuracy("5.", ["5."] * 3 + ["5"] + ["6"] * 6) == 1.0


def test_whitespace_and_empty():
    assert vqa_accuracy("yes", []) == 0.0
    assert vqa_accuracy("", ["yes"] * TEN) == 0.0
    assert vqa_accuracy(" yes\n", [" yes "] * TEN) == 1.0  # both sides stripped


def test_vqa_result_flags():
    answers = ["yes"] * TEN
    assert vqa_result("Yes", answers).metrics() == {"accuracy": 1.0, "empty": 0, "unparsed": 0}
    assert vqa_result("", answers).metrics() == {"accuracy": 0.0, "empty": 1, "unparsed": 0}
    r = vqa_result("...", answers)  # normalises to "" -> unparsed
    assert (r.parsed, r.score, r.empty, r.unparsed) == ("", 0.0, False, True)
