#!/usr/bin/env bash
# One time-limited device call of a training run that may need several: prepares the data once,
# then trains every named run concurrently, resuming where the previous call stopped, and packs
# each run's model folder (no optimizer state) and the logs into $OUT.
#
# State lives outside the repository ($STATE, default /tmp/qvlm-train): on the device tool, the
# repository's ignored folders did not survive from one call to the next, /tmp did (same machine).
#
# usage (repeat the same command until each log says "trained steps ...25109"):
#   PREP_ARGS="--relation-rows 60000" MAX=580 bash scripts/device_train.sh \
#     "L2:--spec base --steps 25109 --eval-split validation \
#         --mix synth_scienceqa=0.45,synth_vizwiz=0.12,synth_vqav2=0.12,captions=0.16,relations=0.15"
# MAX: seconds this call may take; RESERVE: seconds kept for loading, saving and evaluation.
# The re-run that reproduced the bundled model (byte-identical, see its MODEL_CARD.md) passed
# --no-eval instead of --eval-split (no evaluation per call) with RESERVE=60: three calls
# (MAX=585, 590, 560) of ~26 min held in all, one H200.
set -u
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
S=${STATE:-/tmp/qvlm-train}; D=$S/data; R=$S/runs
MAX=${MAX:-580}
mkdir -p "$R"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | tee -a "$S/gpu.txt"
if [ ! -f "$D/text.json" ]; then
  python scripts/train_tiny_llava.py prepare --data "$D" --workers "${WORKERS:-15}" \
    --sqa-rows "${SQA_ROWS:-200000}" ${PREP_ARGS:-} > "$R/prepare.log" 2>&1 || { tail -20 "$R/prepare.log"; exit 1; }
  tail -2 "$R/prepare.log"
fi
echo "data ready at $(( $(date +%s) - T0 )) s"
LEFT=$(( MAX - ($(date +%s) - T0) ))
pids=()
for spec in "$@"; do
  name=${spec%%:*}; args=${spec#*:}
  res=""; [ -f "$R/$name/train_state.pt" ] && res="--resume"
  echo "=== call at $(date -u +%H:%M:%S) $res max-seconds $((LEFT - ${RESERVE:-130}))" >> "$R/$name.log"
  # shellcheck disable=SC2086  # $args holds several arguments
  python scripts/train_tiny_llava.py train --data "$D" --out "$R/$name" $args $res \
    --max-seconds $((LEFT - ${RESERVE:-130})) >> "$R/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
for spec in "$@"; do
  name=${spec%%:*}
  echo "== $name"
  grep -E "resumed|ms/step|schedule set|stopping at|trained steps|acc |by skill|Error" "$R/$name.log" | grep -v Warning | tail -12
  tar --exclude=train_state.pt -C "$R" -czf - "$name" | split -b 15M - "$OUT/m-$name.tgz."
done
cp "$S/gpu.txt" "$R/" 2>/dev/null
(cd "$R" && tar -czf "$OUT/logs.tgz" ./*.log)
echo "total $(( $(date +%s) - T0 )) s"
