#!/usr/bin/env bash
# Issue 13's serving run on one GPU: a Llama-3-8B-shaped model with random bf16 weights built from its config
# (random:llama-3-8b, 32 q / 8 KV heads, d=128; no weights to carry), one KV page pool, a mix of requests offered at
# once (default: 64 x 32K + 16 x 128K prompts, 256 output tokens each), driven in-process by `headwise bench serve`;
# the dense plan and the 25% full + 75% streaming plan (duo25: dense prefill on the full heads, read straight from
# the pool's pages; A-shape on the streaming ones; PLAN=duo25-vs prefills the full heads vertical-slash, estimated
# in Triton over their prefix, copied page by page from the pool per chunk) in the same engine, one per call. Each
# run stops itself SECONDS - 45 s after it started (--max-seconds) and writes its JSON to $OUT either way ("partial": true when it was cut short).
#
#   bench/offered_load.sh probe [SECONDS]      # GPU, versions, the dense chunk attention's cost, its GPU test
#   bench/offered_load.sh dense SECONDS        # dense plan
#   bench/offered_load.sh plan SECONDS         # duo25 (PLAN=duo25-vs: vertical-slash prefill on the full heads)
#   bench/offered_load.sh prep SECONDS         # a fresh machine's first call: the decode kernel's GPU test of
#                                              # its unspecialized ints, bench/mixed_batch_decode.py's sweep
#                                              # (MIXED_ARGS; SWEEP=0 skips it), then a 2-layer pass of PLAN and of dense at the mix's
#                                              # shapes, so the measured runs find Triton's kernels compiled
#
# LAYERS (default 32) builds fewer layers; the pool then shrinks with them (KV_GB defaults to 60 x LAYERS / 32) so
# that each plan admits the same number of sequences as the 32-layer run: every per-layer cost scales together, so
# the dense/plan ratios hold. MIX (default 64x32768,16x131072), OUTPUT_LEN (256), CHUNK (prefill chunk, 2048),
# KV_GB, PLAN, MODEL and EXTRA (more `headwise bench serve` arguments, e.g. EXTRA="--multi-step 8" as in run 6 of
# docs/serving.md) change the run. On a device whose checkout's git metadata is stale, HEADWISE_COMMIT=<commit> names
# the tree in the results (src/headwise/bench/record.py).
set -uo pipefail
T0=$(date +%s)
phase=${1:?phase: probe, dense, plan or prep}
SECONDS_LEFT=${2:-600}
LAYERS=${LAYERS:-32}
MIX=${MIX:-64x32768,16x131072}
OUTPUT_LEN=${OUTPUT_LEN:-256}
CHUNK=${CHUNK:-2048}
KV_GB=${KV_GB:-$(python3 -c "print(round(60 * $LAYERS / 32, 3))")}
PLAN=${PLAN:-duo25}
EXTRA=${EXTRA:-}
OUT=${OUT:-/tmp/offered-out}
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
mkdir -p "$OUT"
MODEL=${MODEL:-random:llama-3-8b}  # MODEL=random:tiny-llama LAYERS=2 MIX=3x40,2x70 OUTPUT_LEN=4 CHUNK=32: a CPU dry run
[ "$LAYERS" = 32 ] || MODEL="$MODEL,layers=$LAYERS"
CAP=$(( SECONDS_LEFT - 45 ))  # kept to write the JSON and to copy $OUT back
[ "$CAP" -ge 30 ] || CAP=30

serve() {  # $1: plan
  echo "bench serve $MODEL --plan $1 --mix $MIX --kv-memory $KV_GB --chunk-size $CHUNK --max-seconds $CAP"
  python3 -m headwise.cli bench serve --model "$MODEL" --plan "$1" --mix "$MIX" --output-len "$OUTPUT_LEN" \
    --kv-memory "$KV_GB" --chunk-size "$CHUNK" --mode in-process --warmup --progress-s 30 --max-seconds "$CAP" \
    --out-dir "$OUT" $EXTRA 2>&1 | grep -v '^{"command"'  # the whole document is in $OUT
  ls -la "$OUT"
}

case $phase in
probe)
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
  python3 -c "import torch, transformers, triton; print(torch.__version__, transformers.__version__, triton.__version__)"
  timeout "$CAP" python3 bench/dense_chunk_attention.py "$OUT/dense_chunk_attention.json" --chunk "$CHUNK" \
    --keys 8192,32768,131072
  # the dense chunk's CausalBias path against the masked reference, and the serving tests that run on a GPU
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_policies_prefill.py tests/test_bench_serve.py \
    -k "later_prompt_chunk or bench_serve or max_seconds" 2>&1 | tail -5
  # prompt chunks of full heads read straight from the pool's pages: the kernel against gather + flash, and its tests
  timeout 240 python3 bench/dense_chunk_attention.py "$OUT/paged_prefill.json" --paged --chunk "$CHUNK" \
    --keys 8192,32768,131072 --reps 10 2>&1 | tail -15
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_paged_prefill.py 2>&1 | tail -3
  ;;
dense) serve dense ;;
plan) serve "$PLAN" ;;
prep)
  # the split sweep of the full heads' decode over rows of two lengths (~1 minute on an H100), then each plan through
  # 2 layers with the pool per layer of the measured runs: what they compile is compiled here (their JSONs in
  # $OUT/prep say how much: during_run)
  # the decode kernel's and the vertical-slash estimate's per-step ints reuse compiled kernels (run 19's and run 20's
  # slow steps), then the split sweep
  if [ "${GPU_TESTS:-1}" != 0 ]; then  # GPU_TESTS=0 skips them (a short device budget keeps the compile pass)
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_batch_decode.py tests/test_vs_estimate.py \
      -k compiles_no_new 2>&1 | tail -2
    timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_batch_graphs.py tests/test_graph_decode.py 2>&1 | tail -2
  fi
  [ "${SWEEP:-1}" = 0 ] || timeout $(( SECONDS_LEFT / 3 )) python3 bench/mixed_batch_decode.py "$OUT/mixed_decode.json" \
    ${MIXED_ARGS:-} 2>&1 | tail -22
  per=$(( (SECONDS_LEFT - $(date +%s) + T0 - 45) / 2 )); [ "$per" -ge 30 ] || per=30
  for p in "$PLAN" dense; do
    python3 -m headwise.cli bench serve --model "${MODEL%%,layers=*},layers=2" --plan "$p" --mix "$MIX" \
      --output-len "$OUTPUT_LEN" --kv-memory "$(python3 -c "print(round($KV_GB * 2 / $LAYERS, 4))")" \
      --chunk-size "$CHUNK" --mode in-process --warmup --max-seconds "$per" --out-dir "$OUT/prep" $EXTRA 2>&1 \
      | grep -v '^{"command"' | tail -2 | cut -c1-600
  done
  ;;
*) echo "unknown phase $phase (probe, dense, plan or prep)" >&2; exit 2 ;;
esac
