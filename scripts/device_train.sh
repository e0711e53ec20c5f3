#!/usr/bin/env bash
# One time-limited device call of a training run that may need several: prepares the data (once
# per machine), then trains every named run concurrently, resuming where the previous call
# stopped, and packs into $OUT each run's model folder (no optimizer state), its training state
# while the schedule is unfinished, and the logs.
#
# State lives outside the repository ($STATE, default /tmp/qvlm-train). On the device tool a call
# usually gets a fresh machine (a warm one is given back 30 s after a call), so /tmp does not
# survive either: the state then travels through this machine. Each call whose schedule is not
# finished writes it to $OUT as s-NAME.pack.aa, .ab, ... (15 MiB pieces of the full state: fp32
# weights, AdamW moments, sampler and RNG states, step; packed losslessly by
# `train_tiny_llava.py pack-state`, ~84 % of train_state.pt) and s-NAME.sha256; put those files
# in a git-ignored folder of the repository (.train-state/), carry it into the next call and set
# STATE_IN=.train-state: the state is checked, unpacked into the run folder and resumed, bit for
# bit as if the run had not stopped (tests/test_train_resume.py). The data are prepared again on
# each fresh machine (`prepare` is deterministic; the resumed run checks a digest of them).
#
# usage (repeat the same command until each log says "trained steps ...25109"):
#   PREP_ARGS="--relation-rows 60000" MAX=580 bash scripts/device_train.sh \
#     "L2:--spec base --steps 25109 --eval-split validation \
#         --mix synth_scienceqa=0.45,synth_vizwiz=0.12,synth_vqav2=0.12,captions=0.16,relations=0.15"
# MAX: seconds this call may take; RESERVE: seconds kept for loading, saving and evaluation.
# STATE_IN: a folder holding the s-NAME.* files an earlier call returned (optional).
# The re-run that reproduced the bundled model (byte-identical, see its MODEL_CARD.md) passed
# --no-eval instead of --eval-split (no evaluation per call) with RESERVE=60: three calls
# (MAX=585, 590, 560) of ~26 min held in all, one H200, on one warm machine (state in /tmp).
# The deep model's commands (STATE_IN across fresh machines): harness/models/bundled/README.md.
set -u
: "${OUT:?set OUT to the folder whose files come back}"
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${THREADS:-4}  # CPU threads of each process (THREADS)
S=${STATE:-/tmp/qvlm-train}; D=$S/data; R=$S/runs
MAX=${MAX:-580}
mkdir -p "$R"
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null | tee -a "$S/gpu.txt"
state_step() {  # the step a saved training state stopped at (-1: none)
  python -c 'import sys, torch; print(torch.load(sys.argv[1], map_location="cpu", weights_only=False)["step"])' \
    "$1" 2>/dev/null || echo -1
}
# a carried state: checked against its sha256, unpacked into the run folder (replacing a state
# left on a warm machine only when the carried one is at least as far along)
for spec in "$@"; do
  name=${spec%%:*}
  [ -n "${STATE_IN:-}" ] && [ -f "$STATE_IN/s-$name.sha256" ] || continue
  got=$(cat "$STATE_IN/s-$name.pack".* | sha256sum | cut -d' ' -f1)
  want=$(head -1 "$STATE_IN/s-$name.sha256" | cut -d' ' -f1)
  if [ "$got" != "$want" ]; then
    echo "STATE_IN: $STATE_IN/s-$name.pack.* do not match s-$name.sha256 (a piece missing, stale or" \
         "truncated: copy exactly the files one call returned)"; exit 1
  fi
  tmp=$S/carried; rm -rf "$tmp"; mkdir -p "$tmp"
  cat "$STATE_IN/s-$name.pack".* > "$tmp/state.pack"
  python scripts/train_tiny_llava.py unpack-state --packed "$tmp/state.pack" --state "$tmp/train_state.pt" \
    || { echo "STATE_IN: cannot unpack s-$name.pack.*"; exit 1; }
  new=$(state_step "$tmp/train_state.pt"); old=$(state_step "$R/$name/train_state.pt")
  if [ "$new" -ge "$old" ]; then
    mkdir -p "$R/$name"; mv "$tmp/train_state.pt" "$R/$name/train_state.pt"
    echo "$name: carried state at step $new unpacked from $STATE_IN"
  else
    echo "$name: keeping this machine's state (step $old) over the carried one (step $new)"
  fi
  rm -rf "$tmp"
done
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
  if [ -f "$R/$name/train_state.pt" ] && { [ -n "${KEEP_STATE:-}" ] \
       || ! grep -q '"stopped_at": null' "$R/$name/training_info.json" 2>/dev/null; }; then
    # the schedule is not finished (or KEEP_STATE is set): the state comes back for the next call
    python scripts/train_tiny_llava.py pack-state --state "$R/$name/train_state.pt" --packed "$R/$name.pack"
    split -b 15M "$R/$name.pack" "$OUT/s-$name.pack."
    sha256sum < "$R/$name.pack" > "$OUT/s-$name.sha256"
    echo "$name: state at step $(state_step "$R/$name/train_state.pt") in \$OUT/s-$name.*" \
         "($(wc -c < "$R/$name.pack") bytes): copy exactly these files into an emptied" \
         ".train-state/ and carry it into the next call with STATE_IN=.train-state"
  fi
done
cp "$S/gpu.txt" "$R/" 2>/dev/null
(cd "$R" && tar -czf "$OUT/logs.tgz" ./*.log)
echo "total $(( $(date +%s) - T0 )) s"
