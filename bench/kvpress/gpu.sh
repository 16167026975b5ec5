#!/usr/bin/env bash
# kvpress's presses beside headwise's plans on the GPU machine (issue 19), after bench/retrieval_quality.sh has
# joined the weights and run the eval in $WORK/eval-$EVAL (same MODEL, TASKS, LENGTHS, DEPTHS, samples and seed).
#
#   bench/kvpress/gpu.sh setup          # .whl-kvpress/ (bench/kvpress/wheels.sh; carry it) into /tmp/kvsite
#                                       # (KV_WHEELS=DIR: from DIR, e.g. /tmp/kvwhl after calls that copied the
#                                       # wheels there a few at a time, when the tree leaves no room for all)
#   bench/kvpress/gpu.sh run SECONDS    # export the eval's prompts, run the presses at the plan's measured KV
#                                       # fraction per length, merge into $WORK/eval-$EVAL/results.json, pack
#   bench/kvpress/gpu.sh merge          # only the merge and pack, of outputs-*.jsonl already in $WORK/kvpress
#                                       # (e.g. presses run beside the eval: logs in $WORK/kvpress/logs/shard*.log)
#
# transformers 4.57.6 (kvpress 0.5.5 needs < 5.3) shadows the machine's 5.17 only in run_presses.py's processes:
# /tmp/kvsite is first on their PYTHONPATH; headwise's commands here never see it.
# MODEL (smollm2-135m), EVAL (main), PLAN ($MODEL: the label the eval gave the plan whose memory is
# matched), PRESSES, TASKS, LENGTHS, DEPTHS, SAMPLES (100), SHARDS (8 processes on the one GPU) change what runs.
# KV_FRACTION (e.g. 2048=0.2261) sets the presses' kept share after the prompt instead of matching the plan's
# measured KV after it (the press cuts layer by layer inside the prefill, so its peak is ~0.03 of dense higher: 0.2261
# puts SmolLM2's 2K peak at the plan's 25.9%); KV_DTYPE (float32, bfloat16) the presses' dtype (run_presses.py's
# default otherwise), e.g. float32 beside an eval run with `--dtype float32` or `--fp32-logits`.
# HWPY / KVPY (python3) name the interpreters; the whole run phase was tried on a CPU with
#   WORK=/tmp/kvsim SHARDS=2 TASKS=passkey LENGTHS=512 DEPTHS=0.25,0.75 SAMPLES=2 HEADWISE_CACHE=~/.cache/headwise \
#   HWPY=.venv/bin/python KVPY=.venv-kvpress/bin/python bench/kvpress/gpu.sh run 600
set -uo pipefail
phase=${1:?phase}
arg=${2:-600}
WORK=${WORK:-/tmp/q}
MODEL=${MODEL:-smollm2-135m}
EVAL=${EVAL:-main}
PLAN=${PLAN:-$MODEL}
PRESSES=${PRESSES:-streaming,snapkv,expected_attention,knorm}
TASKS=${TASKS:-passkey,needle,multikey_needle,multivalue_needle,multiquery_needle,variable_tracking,probe}
LENGTHS=${LENGTHS:-1k,2k}
DEPTHS=${DEPTHS:-0.1,0.3,0.5,0.7,0.9}
SAMPLES=${SAMPLES:-100}
SHARDS=${SHARDS:-8}
KV=$WORK/kvpress
export HEADWISE_CACHE=${HEADWISE_CACHE:-/tmp/hwcache} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
HWPY=${HWPY:-python3}  # headwise's python (the machine's); KVPY: the one /tmp/kvsite is put in front of
KVPY=${KVPY:-python3}
hw() { PYTHONPATH=/tmp/site:$PWD/src $HWPY -m headwise.cli "$@"; }

case $phase in
setup)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/kvsite \
    "${KV_WHEELS:-.whl-kvpress}"/*.whl || exit 1
  # kvpress imports datasets at import time; where it is missing (or needs another huggingface_hub), the stand-in
  PYTHONPATH=/tmp/kvsite $KVPY -c "import datasets" 2>/dev/null || cp -r bench/kvpress/offline/datasets /tmp/kvsite/
  PYTHONPATH=/tmp/kvsite $KVPY -c "import kvpress, transformers, torch; from importlib.metadata import version; \
print('kvpress env:', version('kvpress'), 'transformers', transformers.__version__, 'torch', torch.__version__)"
  $HWPY -c "import transformers; print('machine env: transformers', transformers.__version__)"
  ;;
run)
  mkdir -p "$KV/logs"
  results=$WORK/eval-$EVAL/results.json
  [ -f "$results" ] || { echo "no $results: run bench/retrieval_quality.sh first"; exit 2; }
  [ -f "$KV/prompts.jsonl" ] || hw eval "$MODEL" --tasks "$TASKS" --lengths "$LENGTHS" --depths "$DEPTHS" \
    --samples "$SAMPLES" --export-prompts "$KV/prompts.jsonl" || exit 1
  secs=$(( arg - ($(date +%s) - T0) - 60 ))
  memory=(--match "$results:$PLAN")
  [ -n "${KV_FRACTION:-}" ] && memory=(--kv-fraction "$KV_FRACTION")
  for i in $(seq 0 $((SHARDS - 1))); do
    PYTHONPATH=/tmp/kvsite timeout "$secs" $KVPY bench/kvpress/run_presses.py "$KV/prompts.jsonl" \
      --presses "$PRESSES" "${memory[@]}" ${KV_DTYPE:+--dtype "$KV_DTYPE"} --shard "$i/$SHARDS" --out "$KV/outputs-$i.jsonl" \
      > "$KV/logs/shard$i.log" 2>&1 &
  done
  wait
  bash "$0" merge
  ;;
merge)
  # the shards' outputs (of `run`, or of run_presses.py processes started beside the eval) into the eval's table
  results=$WORK/eval-$EVAL/results.json
  [ -f "$results" ] || { echo "no $results: run bench/retrieval_quality.sh first"; exit 2; }
  tail -n 2 "$KV"/logs/shard*.log
  # every complete line of every shard (a shard cut by the timeout may leave half a line)
  $HWPY -c 'import json, sys
for f in sys.argv[1:]:
    for line in open(f):
        try:
            json.loads(line)
        except ValueError:
            continue
        sys.stdout.write(line if line.endswith("\n") else line + "\n")' "$KV"/outputs-*.jsonl > "$KV/outputs.jsonl"
  PYTHONPATH=/tmp/site:$PWD/src $HWPY bench/kvpress/import_outputs.py "$WORK/eval-$EVAL" "$KV/outputs.jsonl" \
    --prompts "$KV/prompts.jsonl" --out "$KV/eval" | tail -c 300
  cp "$WORK/eval-$EVAL"/*.png "$KV/eval/" 2>/dev/null
  hw eval --report-only "$KV/eval" | tail -n 60
  echo "merged in $(( $(date +%s) - T0 )) s"
  [ -n "${OUT:-}" ] && (cd "$KV" && tar czf "$OUT/kvpress.tgz" eval outputs.jsonl logs) && ls -la "$OUT"
  ;;
*) echo "unknown phase $phase (setup, run, merge)"; exit 2 ;;
esac
