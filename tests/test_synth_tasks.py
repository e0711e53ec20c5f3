"""The bundled synthetic tasks (issue 4): determinism, real-dataset schemas, answer balance, lm-eval.

Everything here runs on small splits in a few seconds, on CPU, with no files but the repo.
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest

from tasks import metrics, synth
from tasks.synth import questions as qs
from tasks.synth.generators import caption_example

from conftest import shared_data

REPO = Path(__file__).resolve().parents[1]

# Columns (in order) of HF lmms-lab/ScienceQA (ScienceQA-IMG), lmms-lab/VizWiz-VQA, lmms-lab/VQAv2.
REAL_COLUMNS = {
    "synth_scienceqa": ["id", "image", "question", "choices", "answer", "hint", "task", "grade", "subject",
                        "topic", "category", "skill", "lecture", "solution"],
    "synth_vizwiz": ["question_id", "image", "question", "answers", "category"],
    "synth_vqav2": ["question_type", "multiple_choice_answer", "answers", "image_id", "answer_type",
                    "question_id", "question", "image"],
}


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """Validation and test splits in full, and the first 300 train rows, of every task (cached in tmp)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QVLM_BENCH_CACHE", str(tmp_path_factory.mktemp("cache")))
    out = {}
    for task in synth.TASKS:
        out[(task, "train")] = synth.load_split(task, "train", n=300)
        for split in ("validation", "test"):
            out[(task, split)] = synth.load_split(task, split)
    yield out
    mp.undo()


def _same(a: dict, b: dict) -> bool:
    return ({k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
            and a["image"].tobytes() == b["image"].tobytes() and a["image"].size == b["image"].size)


@pytest.mark.parametrize("task", synth.TASKS)
def test_generation_is_deterministic_and_prefix_stable(task):
    a = synth.generate_rows(task, "test", n=6)
    b = synth.generate_rows(task, "test", n=6)
    assert all(_same(x, y) for x, y in zip(a, b))
    # row i depends only on (seed, task, split, i): any slice of a split is the same rows
    assert all(_same(x, y) for x, y in zip(a[2:5], synth.generate_rows(task, "test", n=3, start=2)))
    other_seed = synth.generate_rows(task, "test", n=6, seed=synth.DEFAULT_SEED + 1)
    assert not all(_same(x, y) for x, y in zip(a, other_seed))
    other_split = synth.generate_rows(task, "validation", n=6)
    assert not any(_same(x, y) for x, y in zip(a, other_split))


def test_cache_roundtrip_is_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("QVLM_BENCH_CACHE", str(tmp_path))
    fresh = synth.generate_rows("synth_vqav2", "validation", n=5)
    first = synth.load_split("synth_vqav2", "validation", n=5)
    files = list((tmp_path / "synth" / f"v{synth.SYNTH_VERSION}").glob("*.parquet"))
    assert len(files) == 1
    synth._MEMO.clear()  # force the disk path
    cached = synth.load_split("synth_vqav2", "validation", n=5)
    assert all(_same(x, y) for x, y in zip(fresh, first))
    assert all(_same(x, y) for x, y in zip(fresh, cached))


@pytest.mark.parametrize("task", synth.TASKS)
def test_lm_eval_docs_are_the_generated_rows(task, tmp_path, monkeypatch):
    """load_docs serves the cache's Arrow table as it is (no PNG round trip): the same rows and pixels."""
    from tasks.synth.lmeval import features, load_docs

    monkeypatch.setenv("QVLM_BENCH_CACHE", str(tmp_path))
    fresh = synth.generate_rows(task, "validation", n=7)
    ds = load_docs(task_name=task, split="validation", n=7)["validation"]
    assert ds.features == features(task) and len(ds) == 7
    assert all(_same(dict(d, image=d["image"].convert("RGB")), r) for d, r in zip(ds, fresh))
    files = list((tmp_path / "synth" / f"v{synth.SYNTH_VERSION}").glob("*.parquet"))
    assert len(files) == 1
    files[0].write_bytes(b"not parquet")  # a corrupt cache falls back to the rows (regenerated)
    synth._MEMO.clear()
    ds = load_docs(task_name=task, split="validation", n=7)["validation"]
    assert all(_same(dict(d, image=d["image"].convert("RGB")), r) for d, r in zip(ds, fresh))


@pytest.mark.parametrize("task", synth.TASKS)
def test_columns_are_the_real_datasets(task, splits):
    for split in ("train", "validation", "test"):
        for row in splits[(task, split)][:20]:
            assert list(row) == REAL_COLUMNS[task]
            assert row["image"].mode == "RGB" and row["image"].size == (64, 64)


@pytest.mark.parametrize("task,sample", [("synth_scienceqa", ("scienceqa_img_sample", "test.parquet")),
                                         ("synth_vqav2", ("vqav2_sample", "validation.parquet"))])
def test_columns_and_types_match_the_real_samples(task, sample, splits):
    import pyarrow.parquet as pq

    real = pq.read_schema(shared_data(*sample))
    names = [n for n in real.names]
    assert names == REAL_COLUMNS[task]
    row = splits[(task, "test")][0]
    for name in names:
        t = real.field(name).type
        v = row[name]
        if name == "image":
            continue
        if str(t) == "string":
            assert isinstance(v, str), name
        elif str(t).startswith("int"):
            assert isinstance(v, int), name
        elif str(t).startswith("list"):
            assert isinstance(v, list), name
    if task == "synth_vqav2":
        assert list(row["answers"][0]) == ["answer", "answer_confidence", "answer_id"]


def test_row_contents(splits):
    for row in splits[("synth_scienceqa", "test")]:
        assert 2 <= len(row["choices"]) <= 5 and 0 <= row["answer"] < len(row["choices"])
        assert len(set(row["choices"])) == len(row["choices"])
    sqa = splits[("synth_scienceqa", "validation")]
    assert {len(r["choices"]) for r in sqa} == {2, 3, 4, 5}
    assert sum(r["skill"].startswith("context_") for r in sqa) > 20  # questions that need the hint
    for row in splits[("synth_vizwiz", "test")]:
        assert len(row["answers"]) == 10 and all(isinstance(a, str) for a in row["answers"])
        assert row["category"] in ("unanswerable", "yes/no", "number", "other")
    share = sum(r["category"] == "unanswerable" for r in splits[("synth_vizwiz", "validation")]) / 150
    assert 0.12 < share < 0.32
    for row in splits[("synth_vqav2", "test")]:
        assert [a["answer_id"] for a in row["answers"]] == list(range(1, 11))
        assert row["answer_type"] in ("yes/no", "number", "other")
        # the canonical answer is what the humans agree on most: full VQA accuracy for it
        assert metrics.vqa_accuracy(row["multiple_choice_answer"], [a["answer"] for a in row["answers"]]) >= 0.9
    types = collections.Counter(r["answer_type"] for r in splits[("synth_vqav2", "validation")])
    assert set(types) == {"yes/no", "number", "other"}
    # annotators disagree in realistic ways (synonyms, typos, casing, articles, wrong answers)
    raw = [a["answer"] for r in splits[("synth_vqav2", "validation")] for a in r["answers"]]
    assert sum(a != r for a, r in zip(raw, [metrics.vqa_normalize(x) for x in raw])) > 30
    disagree = sum(len({metrics.vqa_normalize(a["answer"]) for a in r["answers"]}) > 1
                   for r in splits[("synth_vqav2", "validation")])
    assert disagree > 50


def _answers(row):
    return [a["answer"] if isinstance(a, dict) else a for a in row["answers"]]


@pytest.mark.parametrize("task", synth.TASKS)
@pytest.mark.parametrize("split", ["train", "validation", "test"])
def test_no_constant_answer_scores_above_40_percent(task, split, splits):
    rows = splits[(task, split)]
    if task == "synth_scienceqa":
        scores = {c: sum(metrics.scienceqa_correct(c, r["answer"], len(r["choices"])) for r in rows) / len(rows)
                  for c in "ABCDE"}
    else:
        common = collections.Counter(synth.canonical_answer(task, r) for r in rows).most_common(10)
        cands = {c for c, _ in common} | {"yes", "no", "unanswerable", "1", "2"}
        scores = {c: sum(metrics.vqa_accuracy(c, _answers(r)) for r in rows) / len(rows) for c in cands}
    best = max(scores, key=scores.get)
    assert scores[best] < 0.40, (best, scores[best])


@pytest.mark.parametrize("task,module", [("synth_scienceqa", "scienceqa"), ("synth_vizwiz", "vizwiz"),
                                         ("synth_vqav2", "vqav2")])
def test_prompts_are_the_real_tasks_prompts(task, module, splits):
    import importlib

    real = importlib.import_module(f"tasks.{module}")
    for row in splits[(task, "test")][:40]:
        assert synth.prompt_text(task, row) == real.doc_to_text(row)


def test_canonical_answer_scores_full_marks(splits):
    for task in ("synth_vizwiz", "synth_vqav2"):
        rows = splits[(task, "test")]
        acc = sum(metrics.vqa_accuracy(synth.canonical_answer(task, r), _answers(r)) for r in rows) / len(rows)
        assert acc > 0.97
    for r in splits[("synth_scienceqa", "test")]:
        assert metrics.scienceqa_correct(synth.canonical_answer("synth_scienceqa", r), r["answer"], len(r["choices"]))


def test_captions_describe_the_scene():
    meta: dict = {}
    ex = caption_example(1, 3, meta)
    objs = sorted(meta["scene"].objects, key=lambda o: o.x)
    assert ex["answer"].startswith(f"{len(objs)} shape")
    for o in objs:
        assert f"{o.size} {o.color} {o.shape}" in ex["answer"]


def test_context_questions_need_the_hint_and_the_image():
    """Version 4: the hint names the object(s), the picture gives the answer. Checked against the
    scene itself: the object the hint describes, read off the scene, gives the row's answer; the
    question names no attribute (the hint is needed) and the hint doesn't hold the answer (the
    image is needed)."""
    import re

    from tasks.synth.generators import sqa_row
    from tasks.synth.scene import COLORS, SHAPES, SIZES

    words = set(COLORS) | set(SHAPES) | set(SIZES) | {p for p in qs.PLURAL.values()}
    singular = {v: k for k, v in qs.PLURAL.items()}

    def matching(scene, phrase):
        want = {}
        for w in phrase.split():
            w = singular.get(w, w)
            key = "color" if w in COLORS else "shape" if w in SHAPES else "size" if w in SIZES else None
            if key:
                want[key] = w
        return [o for o in scene.objects if all(getattr(o, k) == v for k, v in want.items())]

    seen = collections.Counter()
    for i in range(400):
        meta = {}
        r = sqa_row(synth.DEFAULT_SEED, "train", i, meta)
        if not r["skill"].startswith("context_"):
            continue
        scene, answer = meta["scene"], r["choices"][r["answer"]]
        seen[r["skill"]] += 1
        assert not set(re.findall(r"\w+", r["question"].lower())) & words, r["question"]
        assert not re.search(rf"\b{answer}\b", r["hint"]), (r["hint"], answer)
        if r["skill"] == "context_owner":
            (obj,) = matching(scene, re.fullmatch(r"\w+ drew the ([\w ]+)\.", r["hint"]).group(1))
            assert answer == obj.color and len({o.color for o in scene.objects}) > 1
        elif r["skill"] == "context_labels":
            (obj,) = matching(scene, re.fullmatch(r"In this game the ([\w ]+) is \w+\.", r["hint"]).group(1))
            assert answer == obj.shape and len({o.shape for o in scene.objects}) > 1
        else:
            group = matching(scene, re.fullmatch(r"The ([\w ]+) are made of \w+\.", r["hint"]).group(1))
            assert answer == str(len(group)) and len(group) >= 1
    assert min(seen.values()) > 20 and len(seen) == 3, seen


def test_patch_labels_locate_each_object():
    """Label rows (shape, colour, size, centre column, centre row) against a scene drawn by hand."""
    from tasks.synth.scene import Obj, Scene, patch_labels

    scene = Scene((Obj("square", "blue", "big", 12.0, 50.0, 9.0), Obj("circle", "red", "small", 52.0, 8.0, 5.0)),
                  (255, 255, 255))
    lab = patch_labels(scene, 8)
    assert lab.shape == (5, 64)
    blue = lab[1] == 3  # COLORS order: red, green, blue, ...
    red = lab[1] == 1
    assert blue.sum() >= 4 and red.sum() >= 1
    # the square's centre (12, 50) is in column 12*8//64 = 1 and row 50*8//64 = 6 (stored +1)
    assert set(lab[3][blue]) == {2} and set(lab[4][blue]) == {7}
    assert set(lab[3][red]) == {7} and set(lab[4][red]) == {2}
    assert set(lab[0][blue]) == {2} and set(lab[2][blue]) == {2}  # square, big
    assert (lab[:, lab[1] == 0] == 0).all()  # background patches carry no object


def test_lm_eval_builds_the_synthetic_tasks(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("QVLM_BENCH_CACHE", str(tmp_path))
    tm = TaskManager(include_path=str(REPO / "tasks"), include_defaults=False)
    names = ["synth_scienceqa", "synth_vizwiz", "synth_vqav2"]
    assert set(names) <= set(tm.all_subtasks)
    tasks = tm.load(names)["tasks"]
    for name in names:
        t = tasks[name]
        docs = list(t.test_docs())
        assert len(docs) == synth.SPLIT_SIZES["test"]
        doc = docs[0]
        assert t.doc_to_text(doc) == synth.prompt_text(name, doc)
        img = t.doc_to_image(doc)
        assert len(img) == 1 and img[0].size == (64, 64)
        gold = synth.canonical_answer(name, doc)
        res = t.process_results(doc, [gold])
        assert res == {"accuracy": 1.0, "empty": 0, "unparsed": 0}
        assert t.config.generation_kwargs["do_sample"] is False


def test_kept_task_objects_do_not_carry_results_between_models(tiny_lm):
    """evaluate_tasks keeps lm-eval's task objects between calls (load_tasks): a second model's
    results must be its own, and the first model scores as before."""
    from harness.evaluate import _TASKS, evaluate_tasks
    from harness.models.loading import load_model

    bundled = load_model("qvlm-tiny-llava", dtype="fp32")
    first = evaluate_tasks(bundled, ["synth_vqav2"], limit=12, batch_size=12, show_progress=False)[0]
    assert _TASKS  # kept
    other = evaluate_tasks(tiny_lm, ["synth_vqav2"], limit=12, batch_size=12, show_progress=False)[0]
    again = evaluate_tasks(bundled, ["synth_vqav2"], limit=12, batch_size=12, show_progress=False)[0]
    assert [s["generation"] for s in other.samples] != [s["generation"] for s in first.samples]
    assert (again.value, again.samples) == (first.value, first.samples)
    assert first.value > 50 and other.value < first.value
