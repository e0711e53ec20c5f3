#!/usr/bin/env bash
# One time-limited device call of the perf benchmark (issue 20): a CUDA self-test of every kernel
# candidate, then `qvlm-bench perf` on the llava-1.5-7b and -13b shapes (fp16 baseline, RTN w4a16,
# w8a8, w4a4, w6a6; batch 1, 8, 32), records and logs under $OUT, a summary table last.
#
# usage (repository root, one H200):
#   QVLM_GIT_COMMIT=<sha of the checkout> OUT=/path bash scripts/device_perf.sh [PHASES]
# PHASES: comma-separated among selftest, 7b, 13b (default: these three, ~7.5 minutes), tiny (the
# bundled trained model as the benchmarked model), fault (isolation under a real CUDA fault), 7b-prefill / 13b-prefill (batch 1, layouts chosen
# for prefill), 7b-sym / 13b-sym (W4A16 symmetric g128), 7b-decode / 13b-decode (the same with
# layouts chosen for decode: where tinygemm in bf16 can win), methods (every registered method at
# batch 1), qwen2.5-vl-7b / llava-onevision-7b (the newer families' shapes), default-join (every row of
# results/default on the bundled model, as the default suite makes its states, into $OUT/perf-default:
# `qvlm-bench table results/default --perf <that folder>` joins them; docs/results.md). Each phase is
# a separate process under its own time limit, so a phase that hangs or dies leaves the others'
# results; every finished (model, variant, batch) cell is in $OUT/perf/records.jsonl at once.
# Limits (seconds, env): SELFTEST_S (default 70), PERF_7B_S (185), PERF_13B_S (195), PERF_JOIN_S (240); each perf
# phase stops starting new cells BUDGET_MARGIN_S (50) before its limit (--time-budget), and shares
# its time fairly: every variant gets its batch-1 row before later variants' larger batches.
# Split over two calls, e.g.: PERF_7B_S=420 ... selftest,7b   then   PERF_13B_S=480 ... 13b
# Wheels of packages the device lacks (gemlite) travel in .whl/ and are installed to /tmp/site.
# DRY=1: the same plumbing on a CPU (tiny shapes, the bundled model; needs TRITON_INTERPRET=1).
set -u
: "${OUT:?set OUT to the folder whose files come back}"
PHASES=${1:-selftest,7b,13b}
T0=$(date +%s)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 OMP_NUM_THREADS=8
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/qvlm-triton-cache}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/qvlm-inductor-cache}
mkdir -p "$OUT/perf"
if [ -z "${QVLM_GIT_COMMIT:-}" ]; then
  echo "warning: QVLM_GIT_COMMIT is not set; records will carry whatever git says here" | tee -a "$OUT/device.log"
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}  # the harness without installing it
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.max.sm,power.limit \
  --format=csv,noheader 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" 2>&1 \
  | tee -a "$OUT/device.log"
python3 -c "import gemlite; print('gemlite', gemlite.__version__)" 2>&1 | tail -1 | tee -a "$OUT/device.log"

MARGIN=${BUDGET_MARGIN_S:-50}
# the perf command's arguments for every model; PERF_EXTRA is appended (e.g. "--schemes w4a16")
PERF_ARGS=(--methods rtn --schemes w4a16,w8a8,w4a4,w6a6 --batch 1,8,32 --new-tokens 64 --warmup 2
           --reps 5 --gate-tokens 4 --out "$OUT/perf")
phase() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  local t=$(date +%s)
  echo "=== $name (limit ${limit}s) at $((t - T0))s" | tee -a "$OUT/device.log"
  timeout --signal=TERM --kill-after=15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: exit $rc after $(( $(date +%s) - t ))s" | tee -a "$OUT/device.log"
  grep -E "^\[perf\].*(PASS|FAIL|failed checks|decode|not run)|FAILED|Error|^\[selftest\] [0-9]+ failed" "$OUT/$name.log" \
    | tail -n 40 | tee -a "$OUT/device.log"
}
DRY_ARGS=()
FAULT_DRY=()
# default-join's workload (the GPU: 64 new tokens, as every perf phase here)
JOIN_ARGS=(--new-tokens 64 --warmup 2 --reps 5 --gate-tokens 4)
if [ -n "${DRY:-}" ]; then
  DRY_ARGS=(--dry-cpu)
  FAULT_DRY=(--device cpu --dtype fp32)  # the later --dtype wins
  JOIN_ARGS=(--device cpu --dtype fp32 --new-tokens 3 --warmup 1 --reps 1 --gate-tokens 2 --text-tokens 8)
  PERF_ARGS=(--device cpu --dtype fp32 --trained-gate on --schemes w4a16,w4a4 --batch 1 --new-tokens 3
             --warmup 1 --reps 1 --gate-tokens 2 --text-tokens 8 --out "$OUT/perf")
fi
for ph in ${PHASES//,/ }; do
  case $ph in
    selftest) S=${SELFTEST_S:-70}
              phase selftest "$S" python3 scripts/device_perf.py selftest --budget $((S - 20)) \
                --out "$OUT/selftest.json" "${DRY_ARGS[@]}" ;;
    7b|13b)   if [ "$ph" = 7b ]; then S=${PERF_7B_S:-185}; else S=${PERF_13B_S:-195}; fi
              M="llava-1.5-$ph"; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086  # PERF_EXTRA holds several arguments
              phase "perf-$ph" "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} ;;
    # the same model, batch 1, layouts chosen for prefill alone (what each scheme can do there)
    7b-prefill|13b-prefill)
              S=${PERF_PREFILL_S:-150}; M="llava-1.5-${ph%-prefill}"; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086
              phase "perf-$ph" "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} --objective prefill --batch 1 ;;
    # W4A16 symmetric, groups of 128: tinygemm's zero point is exact for every layer (bf16 pass)
    7b-sym|13b-sym)
              S=${PERF_SYM_S:-150}; M="llava-1.5-${ph%-sym}"; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086
              phase "perf-$ph" "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} --schemes w4a16 --batch 1 \
                --override w_sym=true --override w_group_size=128 ;;
    # W4A16 symmetric g128 with layouts chosen for decode alone: tinygemm's layout can win there
    # (its prefill is ~24x cuBLAS, so the generate objective never picks it); bf16 pass with its own
    # bf16 baseline
    7b-decode|13b-decode)
              S=${PERF_DECODE_S:-180}; M="llava-1.5-${ph%-decode}"; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086
              phase "perf-$ph" "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} --schemes w4a16 --batch 1 --objective decode \
                --override w_sym=true --override w_group_size=128 ;;
    # the bundled trained model itself on the GPU: every gate record in full, in its own folder
    tiny)     S=${PERF_TINY_S:-120}
              phase perf-tiny "$S" python3 -m harness.perf.command --model qvlm-tiny-llava "${PERF_ARGS[@]}" \
                --batch 1 --trained-gate on --out "$OUT/perf-tiny" ;;
    # every registered method (its own state: folded scales, rotations, tuned towers) at batch 1:
    # METHODS_MODEL (default llava-1.5-7b), METHODS_SCHEMES (default w4a4,w8a8), METHODS_LIST
    # (default all; fp16 is always the baseline)
    methods)  S=${PERF_METHODS_S:-300}; M=${METHODS_MODEL:-llava-1.5-7b}; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086
              phase perf-methods "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --methods "${METHODS_LIST:-all}" --schemes "${METHODS_SCHEMES:-w4a4,w8a8}" --batch 1 \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} ;;
    # the newer families' 7B shapes (random weights): fp16 and RTN at each scheme, batch 1
    qwen2.5-vl-7b|llava-onevision-7b)
              S=${PERF_FAMILY_S:-200}; M=$ph; [ -n "${DRY:-}" ] && M=qvlm-tiny-llava
              # shellcheck disable=SC2086
              phase "perf-$ph" "$S" python3 -m harness.perf.command --model "$M" "${PERF_ARGS[@]}" \
                --schemes "${FAMILY_SCHEMES:-w4a16,w4a4,w8a8}" --batch 1 \
                --time-budget $((S - MARGIN)) ${PERF_EXTRA:-} ;;
    # the isolation path under a real CUDA fault: the bundled model, one process per variant, the
    # RTN W4A4 child trips a device-side assert once its model is loaded; W8A8's child after it
    # must pass (fp16 only and batch 1: the first child's compile takes ~45 s of the budget)
    fault)    S=${PERF_FAULT_S:-110}
              QVLM_PERF_INJECT_FAULT=${FAULT_SPEC:-rtn:w4a4:start:cuda-assert} \
              phase perf-fault "$S" python3 -m harness.perf.command --model qvlm-tiny-llava --methods rtn \
                --schemes w4a4,w8a8 --batch 1 --dtype fp16 --new-tokens 8 --warmup 1 --reps 2 --gate-tokens 4 \
                --isolate on --time-budget $((S - 15)) --out "$OUT/perf-fault" "${FAULT_DRY[@]}" ;;
    # every row of results/default as the default suite makes its states (JOIN_METHODS: only those
    # methods' entries, e.g. rtn,qvlm; default all of them)
    default-join)
              S=${PERF_JOIN_S:-240}
              python3 -c "import lm_eval, datasets" > /dev/null 2>&1 \
                || echo "default-join: lm-eval/datasets not importable: the suite's calibration set cannot be" \
                        "built, rows that use data get random batches and will not join" | tee -a "$OUT/device.log"
              JM=(); [ -n "${JOIN_METHODS:-}" ] && JM=(--methods "$JOIN_METHODS")
              # shellcheck disable=SC2086
              phase perf-default-join "$S" python3 -m harness.perf.command --model qvlm-tiny-llava \
                --methods-from default "${JM[@]}" --schemes w4a4,w6a6 --batch 1 --isolate on "${JOIN_ARGS[@]}" \
                --time-budget $((S - MARGIN)) --out "$OUT/perf-default" ${PERF_EXTRA:-} ;;
    *)        echo "unknown phase $ph (selftest, tiny, fault, 7b, 13b, 7b-prefill, 13b-prefill, 7b-sym, 13b-sym," \
                   "7b-decode, 13b-decode, methods, qwen2.5-vl-7b, llava-onevision-7b, default-join)" ;;
  esac
done
echo "=== summary at $(( $(date +%s) - T0 ))s"
python3 scripts/device_perf.py summary "$OUT/perf/records.jsonl" 2>&1 | tee "$OUT/summary.txt"
if [ -f "$OUT/perf-fault/records.jsonl" ]; then
  python3 - "$OUT/perf-fault/records.jsonl" <<'PY' 2>&1 | tee -a "$OUT/device.log"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("[fault]", r.get("method"), r.get("scheme"), "batch", r.get("batch_size"), r.get("status"),
          (r.get("error") or "")[:160].replace("\n", " | "))
PY
fi
echo "total $(( $(date +%s) - T0 ))s"
if [ -f "$OUT/perf-default/records.jsonl" ]; then  # which rows of results/default got a timed row
  echo "=== perf-default (results/default's rows)" | tee -a "$OUT/summary.txt"
  python3 scripts/device_perf.py summary "$OUT/perf-default/records.jsonl" 2>&1 | tee -a "$OUT/summary.txt"
fi
# The device tool returns at most 8 files: keep records, table and summary as they are, the logs
# in one archive (seen: a 9th file pushed perf/records.jsonl out of run 5660f8744dbb's return), and
# the records' detail sidecars (one per record, harness/perf/detail.py) in another: unpack it where
# the records go, `tar xzf perf-detail.tgz -C <folder>` gives <folder>/perf/perf-detail/... (copy
# those files into results/perf/perf-detail/ with the records appended to results/perf/records.jsonl).
# Of perf-default only records.jsonl stays outside the archives (its leaderboard.md and lock go in logs).
if ls -d "$OUT"/*/perf-detail >/dev/null 2>&1; then
  ( cd "$OUT" && tar czf perf-detail.tgz --remove-files ./*/perf-detail )
fi
JOIN_EXTRA=()
[ -d "$OUT/perf-default" ] && mapfile -t JOIN_EXTRA < <(cd "$OUT" && find perf-default -type f ! -name records.jsonl)
( cd "$OUT" && tar czf logs.tgz --remove-files ./*.log selftest.json gpu.txt perf-fault "${JOIN_EXTRA[@]}" 2>/dev/null )
ls -R "$OUT" | head -20
