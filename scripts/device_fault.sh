#!/usr/bin/env bash
# One device call that hunts the W4A4 batch-8 CUDA fault (issue 31): the kernel self-test, then the
# failing sequence (w4a16, w8a8, w4a4 at batch 1 and 8 in one process) with every candidate traced
# and CUDA_LAUNCH_BLOCKING=1, then the same with compute-sanitizer on the candidate named by the
# trace when there is one (SANITIZE_ONLY=<kernel prefix>). Logs under $OUT.
set -u
: "${OUT:?}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
which compute-sanitizer >> "$OUT/gpu.txt" 2>&1 || ls /usr/local/cuda*/bin/compute-sanitizer >> "$OUT/gpu.txt" 2>&1
timeout ${SELFTEST_S:-90} python3 scripts/device_perf.py selftest --budget $(( ${SELFTEST_S:-90} - 20 )) \
  --out "$OUT/selftest.json" > "$OUT/selftest.log" 2>&1
echo "selftest exit $?" | tee -a "$OUT/gpu.txt"
CUDA_LAUNCH_BLOCKING=1 timeout ${TRACE_S:-330} python3 scripts/trace_kernel_fault.py perf --model llava-1.5-7b \
  --methods rtn --schemes ${TRACE_SCHEMES:-w4a16,w8a8,w4a4} --batch ${TRACE_BATCH:-1,8} --new-tokens 16 \
  --warmup 1 --reps 2 --gate-tokens 4 --out "$OUT/perf" ${TRACE_EXTRA:-} > "$OUT/trace.log" 2>&1
echo "trace exit $?" | tee -a "$OUT/gpu.txt"
grep -n "illegal\|CUDA error\|Error" "$OUT/trace.log" | head -20 | tee -a "$OUT/gpu.txt"
grep "\[trace\] try" "$OUT/trace.log" | tail -3 | tee -a "$OUT/gpu.txt"
