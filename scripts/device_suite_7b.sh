#!/usr/bin/env bash
# The 7B random-weight accuracy pipeline (scripts/bench_suite_7b.py: a random-weight folder of
# ARCH, every method through the normal runner, per-stage times and peak GPU memory) in one
# time-limited device call; docs/benchmarks/suite_7b.md has the runs.
#
#   here, once:  bash scripts/device_suite_7b.sh prepare     # .whl: lm-eval, datasets & co.; .data: ScienceQA rows
#   device:      QVLM_GIT_COMMIT=<sha> OUT=$OUT bash scripts/device_suite_7b.sh          (carry: .whl .data)
#   CPU dry run: DRY=1 OUT=/tmp/s7 PYTHON=.venv/bin/python bash scripts/device_suite_7b.sh
#
# Env: ARCH (default qwen2.5-vl-7b; llava-1.5-7b needs TOKENIZER, a folder with the Llama-2
# tokenizer.model), METHODS (default every registered method, cheapest first), LIMIT (questions,
# 32), CALIB (calibration pairs, 16), BATCH (16), BUDGET_S (530: the run is stopped there so the
# call ends inside its 10 minutes; suite_7b.json and stages.md are rewritten after every cell, so
# the cells finished by then come back), DRY=1 (CPU, tiny shape, 4 questions, no wheels).
# What comes back from $OUT: stages.md (the table), suite_7b.json, records.jsonl, log.txt,
# versions.txt, gpu.txt.
set -u
PY=${PYTHON:-python3}
if [ "${1:-}" = prepare ]; then  # here, where pip reaches a registry and ../shared/data exists
  exclude=$(git rev-parse --git-path info/exclude)
  for d in /.whl/ /.data/; do grep -qxF "$d" "$exclude" 2>/dev/null || echo "$d" >> "$exclude"; done
  mkdir -p .whl .data/scienceqa_img
  cp ../shared/data/scienceqa_img_sample/test.parquet .data/scienceqa_img/test.parquet || exit 1
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more_itertools==11.2.1 || exit 1
  ls -la .whl .data/scienceqa_img; du -sh .whl .data; exit 0
fi
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
mkdir -p "$OUT"
ARCH=${ARCH:-qwen2.5-vl-7b}
METHODS=${METHODS:-fp16,rtn,smoothquant,quarot,awq,mbq,gptq,qvlm,quarot+gptq}
WORK=${WORK:-/tmp/suite7b}
ARGS=(--arch "$ARCH" --data-dir "${DATA_DIR:-.data}" --methods "$METHODS" --limit "${LIMIT:-32}"
      --calib "${CALIB:-16}" --batch "${BATCH:-16}" --skip-throughput --out "$WORK")
[ -n "${TOKENIZER:-}" ] && ARGS+=(--tokenizer "$TOKENIZER")
if [ -n "${DRY:-}" ]; then
  ARGS+=(--shape tiny --device cpu --limit 4 --calib 4 --batch 4)
else
  ls .whl/lm_eval-*.whl .whl/datasets-*.whl >/dev/null 2>&1 || {
    echo "error: no lm-eval/datasets wheels in .whl/: run 'bash scripts/device_suite_7b.sh prepare' here and carry .whl .data"; exit 1; }
  [ -f .data/scienceqa_img/test.parquet ] || { echo "error: no .data/scienceqa_img/test.parquet (prepare, carry .data)"; exit 1; }
  [ -d /tmp/site/lm_eval ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
  df -h /tmp | tail -1 | tee -a "$OUT/gpu.txt"
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}  # the harness without installing it
$PY -c "import torch, transformers, tokenizers, lm_eval, datasets, pyarrow; print('torch', torch.__version__,
'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'tokenizers', tokenizers.__version__,
'lm_eval', lm_eval.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tee "$OUT/versions.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "error: the packages above did not import"; exit 1; }
rm -rf "$WORK"
timeout "${BUDGET_S:-530}" $PY scripts/bench_suite_7b.py "${ARGS[@]}" > "$OUT/log.txt" 2>&1
rc=$?
grep -E "^(model folder|cell )" "$OUT/log.txt"
if [ $rc = 124 ]; then echo "stopped at BUDGET_S=${BUDGET_S:-530} s: the table holds the cells finished by then"
elif [ $rc != 0 ]; then tail -25 "$OUT/log.txt"; fi
cp "$WORK/suite_7b.json" "$WORK/stages.md" "$OUT/" 2>/dev/null
cp "$WORK/suite/records.jsonl" "$OUT/" 2>/dev/null
cat "$OUT/stages.md" 2>/dev/null
ls -la "$OUT"
exit $rc
