"""Where task rows and task definitions come from: include-path tasks with a local data copy,
in-repo import errors that surface, one lm-eval TaskManager per set of task folders."""

import shutil
import sys

import pytest

from tasks.index import task_manager
from tasks.sources import task_config, task_spec
from toy_task import write_toy_task


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """An include-path task (12 test rows) and a --data-dir holding a 5-row copy of its test split."""
    root = tmp_path_factory.mktemp("toy-sources")
    include = write_toy_task(root / "include")
    other = write_toy_task(root / "other", n_test=5)
    data_dir = root / "data"
    (data_dir / "toy_colors").mkdir(parents=True)
    shutil.copy(other / "toy_colors_data" / "test.parquet", data_dir / "toy_colors" / "test.parquet")
    return include, data_dir


def test_data_dir_with_a_task_from_include_paths(toy):
    include, data_dir = toy
    with pytest.raises(KeyError, match="needs that folder in the suite's include_paths"):
        task_spec("toy_colors", str(data_dir))  # the task is not under tasks/
    assert task_config("toy_colors", [include])["task"] == "toy_colors"
    spec = task_spec("toy_colors", str(data_dir), include_paths=[include])
    assert spec["dataset_kwargs"]["data_files"] == [str(data_dir / "toy_colors" / "test.parquet")]
    task = next(iter(task_manager([include]).load([spec])["tasks"].values()))
    assert len(task.test_docs()) == 5  # the data dir's copy, not the task's own 12 rows


def test_calibration_pairs_from_an_include_path_task_and_a_data_dir(toy):
    from harness.task_data import task_pairs

    include, data_dir = toy
    pairs = task_pairs("toy_colors", "test", data=str(data_dir), include_paths=[str(include)])
    assert len(pairs) == 5 and {answer for _, _, answer in pairs} <= {"red", "blue"}


def test_a_broken_in_repo_module_raises_instead_of_changing_the_task(toy, monkeypatch):
    """Before: an ImportError in tasks.sources was swallowed and the task loaded from its own rows
    (12), silently ignoring the data dir. Now the error surfaces."""
    from harness.task_data import task_pairs

    include, data_dir = toy
    monkeypatch.setitem(sys.modules, "tasks.sources", None)  # importing it now raises ImportError
    with pytest.raises(ImportError, match="tasks.sources"):
        task_pairs("toy_colors", "test", data=str(data_dir), include_paths=[str(include)])


def test_one_task_manager_per_set_of_folders(toy, monkeypatch):
    import lm_eval.tasks

    from harness.evaluate import task_manager as harness_task_manager

    include, _ = toy
    built = []

    class Counting(lm_eval.tasks.TaskManager):
        def __init__(self, *a, **k):
            built.append(k.get("include_path"))
            super().__init__(*a, **k)

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Counting)
    task_manager.cache_clear()
    try:
        first = harness_task_manager([include])
        assert harness_task_manager([str(include)]) is first  # per cell
        task_config("toy_colors", [include])  # per task spec
        monkeypatch.chdir(include.parent)
        assert task_manager(["include"]) is first  # a relative path names the same folder
        assert task_manager([]) is not first
        assert len(built) == 2 and built[0][1:] == [str(include.resolve())]
    finally:
        task_manager.cache_clear()


def test_a_suite_runs_an_include_path_task_on_a_data_dir(toy, tiny_llava_path, tmp_path):
    """End to end (the reported KeyError): `--data-dir` with a task from include_paths."""
    from harness.suite_config import parse_suite
    from harness.runner import run_suite

    include, data_dir = toy
    suite = parse_suite({"name": "toy", "models": [str(tiny_llava_path)], "methods": ["fp16"],
                         "tasks": ["toy_colors"], "include_paths": [str(include)], "data_dir": str(data_dir),
                         "batch_size": 8, "output": str(tmp_path), "device": "cpu"})
    summary = run_suite(suite, show_progress=False)
    assert (summary.ok, summary.failed) == (1, 0), [r.get("error") for r in summary.records]
    assert summary.records[0]["n"] == 5  # the data dir's rows
