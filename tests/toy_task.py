"""A toy lm-eval generation task written into a temporary folder, for engine tests.

It lets the runner be tested without depending on any bundled task: the answer is the
image's dominant colour word, scored by exact match.
"""

from __future__ import annotations

from pathlib import Path

YAML = """task: {name}
dataset_path: parquet
dataset_kwargs:
  data_files:
    train: {data}/train.parquet
    test: {data}/test.parquet
training_split: train
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
doc_to_image: !function toy_utils.doc_to_image
process_results: !function toy_utils.process_results
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 3
  do_sample: false
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
  - metric: empty
    aggregation: mean
    higher_is_better: false
  - metric: unparsed
    aggregation: mean
    higher_is_better: false
metadata:
  version: 1.0
"""

UTILS = '''
def doc_to_image(doc):
    return [doc["image"].convert("RGB")]


def process_results(doc, results):
    pred = results[0].strip()
    return {"accuracy": float(pred == doc["answer"]), "empty": float(pred == ""),
            "unparsed": float(pred not in ("red", "blue", "yes", "no", ""))}
'''


def write_toy_task(folder: Path, name: str = "toy_colors", n_test: int = 12, n_train: int = 16) -> Path:
    """Create ``folder/<name>.yaml`` + utils + parquet splits; returns the include path."""
    import datasets
    import numpy as np
    from PIL import Image

    folder = Path(folder)
    data = folder / f"{name}_data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        rows = {"question_id": [], "question": [], "answer": [], "image": []}
        for i in range(n):
            red = bool(rng.integers(0, 2))
            arr = np.zeros((32, 32, 3), dtype=np.uint8)
            arr[..., 0 if red else 2] = 200 + int(rng.integers(0, 55))
            rows["question_id"].append(f"{split}-{i}")
            rows["question"].append("what color is the image ?" + " the" * int(rng.integers(0, 4)))
            rows["answer"].append("red" if red else "blue")
            rows["image"].append(Image.fromarray(arr))
        features = datasets.Features({"question_id": datasets.Value("string"),
                                      "question": datasets.Value("string"),
                                      "answer": datasets.Value("string"),
                                      "image": datasets.Image()})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(data / f"{split}.parquet"))
    (folder / f"{name}.yaml").write_text(YAML.format(name=name, data=data.as_posix()))
    (folder / "toy_utils.py").write_text(UTILS)
    return folder
