#!/usr/bin/env bash
# The multi-GPU run of docs/benchmarks/scale.md ("Several GPUs") in two time-limited device calls
# on one warm multi-GPU machine: Ray's wheel (79 MB) is larger than one call may carry, so each
# call brings half of it (folders .ray1 and .ray2, git-ignored; build them with
# `scripts/device_scale.sh split RAY_WHEEL [DEP_WHEELS...]` here).
#
#   call 1: QVLM_GIT_COMMIT=<sha> OUT=... bash scripts/device_scale.sh serial   (carry .whl .data .ray1)
#   call 2: QVLM_GIT_COMMIT=<sha> OUT=... bash scripts/device_scale.sh ray      (carry .whl .data .ray2)
#
# `serial` starts the one-GPU run in the background (it may outlast the call) and waits for it up
# to SERIAL_WAIT_S; `ray` joins and installs the wheel, waits for the serial run, runs the suite
# on every GPU through Ray, and writes the comparison (scale.json, logs) under $OUT.
set -u
STEP=${1:?serial, ray or split}
if [ "$STEP" = split ]; then
  wheel=${2:?the ray wheel}; shift 2
  rm -rf .ray1 .ray2 && mkdir -p .ray1 .ray2
  half=$(( ($(stat -c %s "$wheel") + 1) / 2 ))
  split -b "$half" -d "$wheel" .ray1/part && mv .ray1/part01 .ray2/part01
  basename "$wheel" > .ray1/NAME
  for w in "$@"; do cp "$w" .ray1/; done
  du -sh .ray1 .ray2; exit 0
fi
: "${OUT:?set OUT}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
# (not again under a run that is importing from it)
[ -d /tmp/site/lm_eval ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=$(pwd):/tmp/site
ARGS=(--tokenizer .data/llama2_tokenizer --data-dir .data --out /tmp/scale)
if [ "$STEP" = serial ]; then
  mkdir -p /tmp/rayparts && cp .ray1/* /tmp/rayparts/
  nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
  setsid nohup python3 scripts/bench_ray_scale.py "${ARGS[@]}" --run serial > /tmp/scale_serial.log 2>&1 < /dev/null &
  echo "serial run started, pid $!"
  end=$(( SECONDS + ${SERIAL_WAIT_S:-540} ))
  while [ ! -f /tmp/scale/serial.json ] && [ $SECONDS -lt $end ]; do sleep 5; done
  tail -5 /tmp/scale_serial.log; ls /tmp/scale
  [ -f /tmp/scale/serial.json ] && echo "serial finished" || echo "serial still running at $SECONDS s"
  exit 0
fi
# ray
name=$(cat /tmp/rayparts/NAME)
cat /tmp/rayparts/part00 .ray2/part01 > "/tmp/$name"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "/tmp/$name" /tmp/rayparts/*.whl 2>&1 | tail -2
python3 -c "import ray; print('ray', ray.__version__)" || exit 1
end=$(( SECONDS + ${SERIAL_WAIT_S:-240} ))
while [ ! -f /tmp/scale/serial.json ] && [ $SECONDS -lt $end ]; do sleep 5; done
[ -f /tmp/scale/serial.json ] || { echo "the serial run has not finished"; tail -20 /tmp/scale_serial.log; exit 1; }
python3 scripts/bench_ray_scale.py "${ARGS[@]}" --run ray --report 2>&1 | tee /tmp/scale_ray.log | tail -30
cp /tmp/scale/scale.json "$OUT/"
tar czf "$OUT/logs.tgz" -C /tmp scale_serial.log scale_ray.log scale/serial.log scale/ray.log \
  scale/serial.gpu.csv scale/ray.gpu.csv scale/suite.yaml 2>/dev/null
tar czf "$OUT/records.tgz" -C /tmp/scale serial/records.jsonl ray/records.jsonl serial/samples ray/samples 2>/dev/null
ls -la "$OUT"
