"""The real tasks (scienceqa_img, vizwiz_vqa_val, vqav2_val) built by lm-eval from tasks/.

Rows come from the real samples in <repo>/../shared/data (loaded through the same code as the
Hub path: tasks.sources.load_docs via task_spec) and from a VizWiz fixture generated here.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import tasks
from tasks import sources
from tasks.sampling import stratified_indices
from tasks.sources import DatasetUnavailableError, task_spec

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SQA_FILE = DATA / "scienceqa_img_sample" / "test.parquet"
VQA_FILE = DATA / "vqav2_sample" / "validation.parquet"
needs_data = pytest.mark.skipif(
    not (SQA_FILE.exists() and VQA_FILE.exists()), reason=f"real samples absent under {DATA}"
)

SQA_POST = "Answer with the option's letter from the given choices directly."
VQA_POST = "Answer the question using a single word or phrase."
VIZWIZ_POST = (
    "When the provided information is insufficient, respond with 'Unanswerable'.\n" + VQA_POST
)


def build(spec):
    """Build one task exactly as the harness does: TaskManager on tasks/, no lm-eval defaults."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks.TASKS_DIR), include_defaults=False)
    (task,) = tm.load([spec])["tasks"].values()
    return task


@pytest.fixture(scope="module")
def sqa_task():
    return build(task_spec("scienceqa_img", str(SQA_FILE)))


@pytest.fixture(scope="module")
def vqa_task():
    return build(task_spec("vqav2_val", str(VQA_FILE.parent)))


def _vizwiz_rows():
    # (question, 10 answers, category); images are tiny solid colours.
    return [
        ("What is this?", ["unanswerable"] * 5 + ["unsuitable"] * 3 + ["soup"] * 2, "unanswerable"),
        ("What color is this shirt?", ["blue"] * 10, "other"),
        ("How many coins are there?", ["2"] * 4 + ["two"] * 3 + ["two coins"] * 3, "number"),
    ]


@pytest.fixture(scope="module")
def vizwiz_dir(tmp_path_factory):
    """A DIR/vizwiz_vqa_val/val.parquet in the lmms-lab/VizWiz-VQA schema."""
    import datasets

    rows = _vizwiz_rows()
    features = datasets.Features(
        {
            "question_id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
            "category": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict(
        {
            "question_id": [f"VizWiz_val_{i:08d}.jpg" for i in range(len(rows))],
            "image": [Image.new("L", (8, 6), 40 * i) for i in range(len(rows))],
            "question": [r[0] for r in rows],
            "answers": [r[1] for r in rows],
            "category": [r[2] for r in rows],
        },
        features=features,
    )
    root = tmp_path_factory.mktemp("data")
    (root / "vizwiz_vqa_val").mkdir()
    ds.to_parquet(str(root / "vizwiz_vqa_val" / "val.parquet"))
    return root


@pytest.fixture(scope="module")
def vizwiz_task(vizwiz_dir):
    return build(task_spec("vizwiz_vqa_val", str(vizwiz_dir)))


# ---------------------------------------------------------------- discovery and config


def test_list_tasks_includes_real_tasks():
    names = tasks.list_tasks()
    assert {"scienceqa_img", "vizwiz_vqa_val", "vqav2_val"} <= set(names)
    assert names == sorted(names)


def test_task_spec_plain_name_and_errors():
    assert task_spec("scienceqa_img") == "scienceqa_img"
    with pytest.raises(ValueError, match="Unknown option"):
        task_spec("vqav2_val", subset=5)
    with pytest.raises(KeyError):
        task_spec("no_such_task", subset_size=3)


def test_task_spec_dict_keeps_yaml_and_overrides_source(tmp_path):
    spec = task_spec("vqav2_val", subset_size=None)
    assert spec["task"] == "vqav2_val"
    assert spec["dataset_kwargs"]["subset_size"] is None  # full split on request
    assert spec["dataset_kwargs"]["path"] == "lmms-lab/VQAv2"
    assert "data_files" not in spec["dataset_kwargs"]  # still the Hub
    assert callable(spec["process_results"]) and spec["generation_kwargs"]["max_gen_toks"] == 16


@needs_data
def test_local_layouts(tmp_path):
    # DIR/<task>/<split>.parquet
    (tmp_path / "a" / "scienceqa_img").mkdir(parents=True)
    shutil.copy(SQA_FILE, tmp_path / "a" / "scienceqa_img" / "test.parquet")
    got = task_spec("scienceqa_img", str(tmp_path / "a"))["dataset_kwargs"]["data_files"]
    assert got == [str(tmp_path / "a" / "scienceqa_img" / "test.parquet")]
    # a folder holding <split>.parquet; a parquet file; Hub-style shards under <config>/
    assert task_spec("scienceqa_img", str(SQA_FILE.parent))["dataset_kwargs"]["data_files"] == [
        str(SQA_FILE)
    ]
    assert task_spec("scienceqa_img", str(SQA_FILE))["dataset_kwargs"]["data_files"] == [str(SQA_FILE)]
    shard = tmp_path / "hub" / "ScienceQA-IMG" / "test-00000-of-00001.parquet"
    shard.parent.mkdir(parents=True)
    shutil.copy(SQA_FILE, shard)
    assert task_spec("scienceqa_img", str(tmp_path / "hub"))["dataset_kwargs"]["data_files"] == [
        str(shard)
    ]
    with pytest.raises(DatasetUnavailableError, match="test.parquet.*--data-dir DIR"):
        task_spec("scienceqa_img", str(tmp_path / "empty"))


@needs_data
def test_split_option_and_tasks_with_their_own_rows(tmp_path, monkeypatch):
    # split= loads (and evaluates) another split of the same source.
    spec = task_spec("scienceqa_img", str(SQA_FILE.parent), split="test")
    assert spec["test_split"] == "test" and spec["dataset_kwargs"]["split"] == "test"
    spec = task_spec("scienceqa_img", split="train")
    assert spec["test_split"] == "train" and spec["dataset_kwargs"]["name"] == "ScienceQA-IMG"

    # A task with its own loader (like the synthetic ones): a shared data dir without a copy for
    # it is ignored, options go to its loader; a copy for it switches to the parquet files.
    def own_rows(**kwargs):
        raise AssertionError("not called by task_spec")

    fake = {"task": "own_rows_task", "custom_dataset": own_rows, "test_split": "test",
            "dataset_kwargs": {"n": 5}}
    monkeypatch.setattr(sources, "task_config", lambda name, include_paths=(): dict(fake, dataset_kwargs={"n": 5}))
    assert task_spec("own_rows_task", str(tmp_path)) == "own_rows_task"
    assert task_spec("own_rows_task", str(tmp_path), n=7)["dataset_kwargs"] == {"n": 7}
    (tmp_path / "own_rows_task").mkdir()
    shutil.copy(SQA_FILE, tmp_path / "own_rows_task" / "test.parquet")
    spec = task_spec("own_rows_task", str(tmp_path))
    assert spec["custom_dataset"] is sources.load_docs
    assert spec["dataset_kwargs"]["data_files"] == [str(tmp_path / "own_rows_task" / "test.parquet")]


def test_generation_and_metric_config(vizwiz_task):
    gk = vizwiz_task.config.generation_kwargs
    assert gk == {"until": [], "max_gen_toks": 32, "do_sample": False, "temperature": 0.0}
    assert vizwiz_task.OUTPUT_TYPE == "generate_until" and vizwiz_task.MULTIMODAL
    assert vizwiz_task.aggregation().keys() == {"accuracy", "empty", "unparsed"}
    assert vizwiz_task.higher_is_better() == {"accuracy": True, "empty": False, "unparsed": False}


# ---------------------------------------------------------------- ScienceQA on the real sample


@needs_data
def test_scienceqa_prompts_literal(sqa_task):
    docs = {d["id"]: d for d in sqa_task.eval_docs}
    assert len(sqa_task.eval_docs) == 64
    # Row without a hint (id 640): no "Context:" line.
    assert sqa_task.doc_to_text(docs["640"]) == (
        "What is the capital of Kansas?\nA. Des Moines\nB. Wichita\nC. Topeka\nD. Lincoln\n"
        + SQA_POST
    )
    # Row with a hint (id 301).
    assert sqa_task.doc_to_text(docs["301"]) == (
        "Context: This organism is a pink-backed pelican. Its scientific name is Pelecanus "
        "rufescens.\nSelect the organism in the same species as the pink-backed pelican.\n"
        "A. Balearica pavonina\nB. Tyto alba\nC. Pelecanus rufescens\n" + SQA_POST
    )


@needs_data
def test_scienceqa_through_task(sqa_task):
    doc = next(d for d in sqa_task.eval_docs if d["id"] == "640")  # gold: C (Topeka)
    (img,) = sqa_task.doc_to_image(doc)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    assert sqa_task.doc_to_target(doc) == "C"
    assert sqa_task.process_results(doc, ["C"]) == {"accuracy": 1.0, "empty": 0, "unparsed": 0}
    assert sqa_task.process_results(doc, ["C. Topeka"]) == {"accuracy": 1.0, "empty": 0, "unparsed": 0}
    assert sqa_task.process_results(doc, ["B"]) == {"accuracy": 0.0, "empty": 0, "unparsed": 0}
    assert sqa_task.process_results(doc, ["Topeka"]) == {"accuracy": 0.0, "empty": 0, "unparsed": 1}
    assert sqa_task.process_results(doc, [""]) == {"accuracy": 0.0, "empty": 1, "unparsed": 0}
    # Every real row: the gold letter scores 1, the prompt lists every choice.
    for d in sqa_task.eval_docs:
        letter = "ABCDE"[d["answer"]]
        assert sqa_task.process_results(d, [letter])["accuracy"] == 1.0
        assert sqa_task.doc_to_text(d).count("\n") >= len(d["choices"]) + 1


@needs_data
def test_sample_logger_metadata(sqa_task):
    # The harness finds the logger through task.config.metadata (lm-eval keeps the key).
    ref = sqa_task.config.metadata["sample_logger"]
    assert ref == "tasks.scienceqa:log_sample"
    module, fn = ref.split(":")
    log = getattr(importlib.import_module(module), fn)
    doc = next(d for d in sqa_task.eval_docs if d["id"] == "640")
    assert log(doc, "C") == {"question_id": "640", "parsed": "C", "score": 1.0}
    assert log(doc, "A.") == {"question_id": "640", "parsed": None, "score": 0.0}
    # Hub rows have no id: a stable content hash stands in.
    no_id = {k: v for k, v in doc.items() if k != "id"}
    assert log(no_id, "C")["question_id"] == log(dict(no_id), "B")["question_id"]
    assert log(no_id, "C")["question_id"].startswith("sha1:")


def test_sample_logger_on_name_spec():
    from tasks.sources import task_config

    for name, module in [("scienceqa_img", "scienceqa"), ("vizwiz_vqa_val", "vizwiz"), ("vqav2_val", "vqav2")]:
        assert task_config(name)["metadata"]["sample_logger"] == f"tasks.{module}:log_sample"


# ---------------------------------------------------------------- VQAv2 on the real sample


@needs_data
def test_vqav2_through_task(vqa_task):
    docs = list(vqa_task.eval_docs)
    assert [d["question_id"] for d in docs] == [458752000, 458752001, 458752002]
    assert vqa_task.doc_to_text(docs[0]) == "What is this photo taken looking through?\n" + VQA_POST
    (img,) = vqa_task.doc_to_image(docs[0])
    assert img.mode == "RGB"
    assert vqa_task.doc_to_target(docs[0]) == "net"
    # Row 0 answers: net x6, netting, mesh, pitcher, orange (humans disagree).
    # "Net" -> "net": 6 matches -> every leave-one-out subset has >= 5 -> 1.0.
    assert vqa_task.process_results(docs[0], ["Net"])["accuracy"] == 1.0
    # "mesh": 1 match -> 9 x 1/3 + 1 x 0 = 3 -> 0.3.
    assert vqa_task.process_results(docs[0], ["mesh"])["accuracy"] == pytest.approx(0.3)
    # Row 1: pitcher x9, catcher x1. "catcher" -> 0.3; "The pitcher." -> "pitcher" -> 1.0.
    assert vqa_task.process_results(docs[1], ["catcher"])["accuracy"] == pytest.approx(0.3)
    assert vqa_task.process_results(docs[1], ["The pitcher."])["accuracy"] == 1.0
    # Row 2: orange x10 (agree).
    assert vqa_task.process_results(docs[2], ["Orange"]) == {"accuracy": 1.0, "empty": 0, "unparsed": 0}
    assert vqa_task.process_results(docs[2], ["  "]) == {"accuracy": 0.0, "empty": 1, "unparsed": 0}
    from tasks.vqav2 import log_sample

    assert log_sample(docs[0], "Mesh!") == {"question_id": 458752000, "parsed": "mesh", "score": pytest.approx(0.3)}


@needs_data
def test_vqav2_subset_options():
    # Default subset (2000) exceeds the 3 rows -> all rows; explicit sizes are seeded samples.
    assert len(build(task_spec("vqav2_val", str(VQA_FILE))).eval_docs) == 3
    two = build(task_spec("vqav2_val", str(VQA_FILE), subset_size=2, subset_seed=7)).eval_docs
    again = build(task_spec("vqav2_val", str(VQA_FILE), subset_size=2, subset_seed=7)).eval_docs
    assert len(two) == 2 and list(two["question_id"]) == list(again["question_id"])
    assert len(build(task_spec("vqav2_val", str(VQA_FILE), subset_size=None)).eval_docs) == 3


def test_stratified_indices_by_hand():
    labels = ["yes/no"] * 6 + ["number"] * 3 + ["other"]
    # size 5 of 10: quotas yes/no 3.0, number 1.5, other 0.5 -> floors 3, 1, 0; one left over;
    # equal remainders (0.5) -> tie broken by label name: "number" < "other" -> 3, 2, 0.
    picked = stratified_indices(labels, 5, seed=0)
    assert len(picked) == 5 and picked == sorted(picked)
    assert [labels[i] for i in picked].count("yes/no") == 3
    assert [labels[i] for i in picked].count("number") == 2
    assert stratified_indices(labels, 5, seed=0) == picked  # seeded
    assert stratified_indices(labels, 50, seed=0) == list(range(10))  # size >= rows: all


# ---------------------------------------------------------------- VizWiz on a generated fixture


def test_vizwiz_through_task(vizwiz_task):
    docs = list(vizwiz_task.eval_docs)
    assert len(docs) == 3
    assert vizwiz_task.doc_to_text(docs[0]) == "What is this?\n" + VIZWIZ_POST
    (img,) = vizwiz_task.doc_to_image(docs[0])
    assert img.mode == "RGB" and img.size == (8, 6)  # converted from "L"
    # Row 0: unanswerable x5, unsuitable x3, soup x2. "Unanswerable" 5 matches -> 1.0;
    # "soup" 2 matches -> 0.6.
    assert vizwiz_task.process_results(docs[0], ["Unanswerable"])["accuracy"] == 1.0
    assert vizwiz_task.process_results(docs[0], ["soup"])["accuracy"] == pytest.approx(0.6)
    # Row 1: blue x10. "Blue." -> "blue" -> 1.0; "The shirt is blue" -> "shirt is blue" -> 0.
    assert vizwiz_task.process_results(docs[1], ["Blue."])["accuracy"] == 1.0
    assert vizwiz_task.process_results(docs[1], ["The shirt is blue"])["accuracy"] == 0.0
    # Row 2: "2" x4, "two" x3, "two coins" x3 disagree -> processed to "2" x7, "2 coins" x3.
    # "Two" -> "2": 7 matches -> 1.0; "two coins" -> "2 coins": 3 matches -> 0.9.
    assert vizwiz_task.process_results(docs[2], ["Two"])["accuracy"] == 1.0
    assert vizwiz_task.process_results(docs[2], ["two coins"])["accuracy"] == pytest.approx(0.9)
    assert vizwiz_task.process_results(docs[2], ["?"]) == {"accuracy": 0.0, "empty": 0, "unparsed": 1}
    from tasks.vizwiz import log_sample

    assert log_sample(docs[0], "Unanswerable") == {
        "question_id": "VizWiz_val_00000000.jpg",
        "parsed": "unanswerable",
        "score": 1.0,
    }


def test_image_cell_without_features():
    # A plain parquet (no HF features) yields {"bytes", "path"} cells; they decode the same way.
    import io

    from tasks.rows import rgb_images

    buf = io.BytesIO()
    Image.new("RGBA", (3, 2), (1, 2, 3, 4)).save(buf, format="PNG")
    (img,) = rgb_images({"bytes": buf.getvalue(), "path": None})
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (1, 2, 3)
    assert rgb_images(None) == []


# ---------------------------------------------------------------- offline error


OFFLINE_SCRIPT = """
import json, tasks
from lm_eval.tasks import TaskManager
from tasks.sources import DatasetUnavailableError
tm = TaskManager(include_path=str(tasks.TASKS_DIR), include_defaults=False)
try:
    tm.load_task_or_group(["vizwiz_vqa_val"])
    print(json.dumps({"raised": None}))
except DatasetUnavailableError as err:
    print(json.dumps({"raised": type(err).__name__, "msg": str(err),
                      "chained": err.__cause__ is not None or not err.__suppress_context__}))
"""


def test_offline_error_surfaces_from_lm_eval(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path),
               HF_DATASETS_CACHE=str(tmp_path / "datasets"))
    out = subprocess.run([sys.executable, "-c", OFFLINE_SCRIPT], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["raised"] == "DatasetUnavailableError"
    assert result["chained"] is False  # one clear message, no chained deep trace
    msg = result["msg"]
    assert "'lmms-lab/VizWiz-VQA'" in msg and "split 'val'" in msg and "'vizwiz_vqa_val'" in msg
    assert "--data-dir DIR" in msg and "`data:` for the task in the suite file" in msg
    assert "DIR/vizwiz_vqa_val/val.parquet" in msg


# ---------------------------------------------------------------- through lm-eval's evaluator


@needs_data
def test_lm_eval_evaluate_aggregates(sqa_task):
    """lm-eval's evaluate() runs the task and averages the per-doc metrics."""
    from lm_eval.api.model import LM
    from lm_eval.evaluator import evaluate

    class AlwaysC(LM):
        MULTIMODAL = True

        def loglikelihood(self, requests):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests):
            raise NotImplementedError

        def generate_until(self, requests):
            for r in requests:
                _, gen_kwargs, visual = r.args
                assert len(visual["visual"]) == 1 and gen_kwargs["max_gen_toks"] == 16
            return ["C"] * len(requests)

    out = evaluate(AlwaysC(), {"scienceqa_img": sqa_task}, log_samples=False)["results"]
    # 10 of the 64 sample rows have gold index 2 ("C") -> 10/64 = 0.15625.
    assert out["scienceqa_img"]["accuracy,none"] == pytest.approx(10 / 64)
    assert out["scienceqa_img"]["empty,none"] == 0.0 and out["scienceqa_img"]["unparsed,none"] == 0.0
