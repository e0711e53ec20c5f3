#!/usr/bin/env bash
# One device call (about 4-6 minutes on one H100/H200) measuring issue 29.7: do two GPU runs of a
# suite give identical records, with `deterministic: false` (the default) and with `true`, and what
# does `true` cost? scripts/check_determinism.py runs the bundled model's fp16 reference and Q-VLM
# (`fast` preset) at W4A4 on the three synthetic tasks (64 questions each) four times, each a fresh
# `qvlm-bench run` into its own results folder under $OUT/runs (false, true, false, true), then
# compares answers, accuracies and Q-VLM's recorded numbers (dependency scores, partition,
# percentiles, ...) and prints the table and each run's wall time. docs/reliability.md has the result.
#
#   here, once:  bash scripts/device_determinism.sh wheels        # lm-eval, datasets & co. into .whl/
#   device:      QVLM_GIT_COMMIT=<sha> OUT=... bash scripts/device_determinism.sh       (carry: .whl)
#   CPU dry run: DRY=1 OUT=/tmp/determinism PYTHON=.venv/bin/python bash scripts/device_determinism.sh
#
# Env: LIMIT (questions per task, default 64), RUN_TIMEOUT_S (per run, default 110: four runs end
# inside an 8-minute call even if each one hangs), DRY=1 (CPU, one task, 4 questions, no wheels).
# What comes back from $OUT: determinism.md (the table), determinism.json, runs.tgz (each run's
# records, samples and log), gpu.txt, versions.txt.
set -u
PY=${PYTHON:-python3}
if [ "${1:-}" = wheels ]; then  # here, where pip reaches a registry: the GPU image lacks these
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || grep -qx '.whl/' .gitignore || echo /.whl/ >> .git/info/exclude
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    lm_eval==0.4.13 datasets==5.2.0 evaluate==0.4.6 dill==0.4.1 multiprocess==0.70.19 more_itertools==11.2.1
  ls -la .whl; du -sh .whl; exit 0
fi
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
unset CUBLAS_WORKSPACE_CONFIG  # the deterministic runs must set it themselves
mkdir -p "$OUT"
if [ -z "${DRY:-}" ]; then
  if [ -z "${QVLM_GIT_COMMIT:-}" ]; then
    echo "warning: QVLM_GIT_COMMIT is not set; records will carry whatever git says here"
  fi
  ls .whl/lm_eval-*.whl .whl/datasets-*.whl >/dev/null 2>&1 || {
    echo "error: no lm-eval/datasets wheels in .whl/: run 'bash scripts/device_determinism.sh wheels' here and carry .whl"; exit 1; }
  [ -d /tmp/site/lm_eval ] || $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}  # the harness without installing it
$PY -c "import torch, transformers, lm_eval, datasets, pyarrow; print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'transformers', transformers.__version__, 'lm_eval', lm_eval.__version__, 'datasets',
datasets.__version__, 'pyarrow', pyarrow.__version__)" 2>&1 | tee "$OUT/versions.txt"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "error: the packages above did not import"; exit 1; }
rm -rf "$OUT/runs"
$PY scripts/check_determinism.py --out "$OUT" --work "$OUT/runs" ${DRY:+--dry} --limit "${LIMIT:-64}" \
  --run-timeout "${RUN_TIMEOUT_S:-110}"
rc=$?
# results folders are more than 2 levels deep and more than 8 files: one archive (states left out)
tar czf "$OUT/runs.tgz" -C "$OUT" --exclude=cache runs && rm -rf "$OUT/runs"
ls -la "$OUT"
exit $rc
