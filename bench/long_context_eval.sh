#!/usr/bin/env bash
# Issue 15 on a GPU machine: passkey and needle accuracy at long contexts, 50 samples per cell (10 at each of 5
# depths), sharded over parallel processes on the one GPU (each decodes at batch 1). LongHeads (policy `longheads`,
# eval plan specs `longheads` = 4096-token window, `longheads@W`) past the trained length: dense is skipped there with
# a note in results.json (HeadPlan.max_context); a longheads plan runs. RetrievalAttention (`retrieval_offload`, plan
# spec `offload`) within it, against dense.
#
#   bench/long_context_eval.sh gemma SECONDS     # gemma3-270m (trained to 32K): dense and longheads-max (max scores,
#                                                # chosen per KV head) at 16k, 32k, 64k; the paper's
#                                                # `longheads` ran there on 2026-12-04 (PLANS=... to add it)
#   bench/long_context_eval.sh smollm2 SECONDS   # smollm2-135m (trained to 8K): dense, longheads-max@2048,
#                                                # longheads@2048 at 16k, 32k
#   bench/long_context_eval.sh offload SECONDS   # gemma3-270m: dense, offload (its default: exact below 32768 host
#                                                # keys, the inverted file past) and HNSW at width 1024
#                                                # (offload-hnsw@100/1024) at 8k, 16k and 32000 tokens (eval lets a
#                                                # prompt run 2% over; with the answer it fits 32768; an inverted file scores every key there,
#                                                # so offload-ivf would repeat offload); needs faiss-cpu: carry its wheel
#                                                # (docs/ARCHITECTURE.md, RetrievalAttention)
#
# Needs the bundled weights on the machine (../shared/tools/weights-to-device.sh, as `bench/retrieval_quality.sh
# setup` fetches them). Resumes what an earlier call left in $WORK (default /tmp/lh); packs $OUT/long-context-NAME.tgz.
# PLANS, LENGTHS, SAMPLES (default 50) and SHARDS (default 12) override the defaults, e.g. one call per length:
#   LENGTHS=64k bench/long_context_eval.sh gemma 590
# EVAL_ARGS adds arguments to `headwise eval` (e.g. "--chunk-size 2048": prompts prefilled in chunks of 2048 tokens,
# not 512; the same attention, fewer steps).
set -uo pipefail
name=${1:?gemma, smollm2 or offload}
secs=${2:?seconds}
WORK=${WORK:-/tmp/lh}
SHARDS=${SHARDS:-12}
case $name in
gemma) MODEL=gemma3-270m; PLANS=${PLANS:-dense,longheads-max}; LENGTHS=${LENGTHS:-16k,32k,64k} ;;
smollm2) MODEL=smollm2-135m; PLANS=${PLANS:-dense,longheads-max@2048,longheads@2048}; LENGTHS=${LENGTHS:-16k,32k} ;;
offload) MODEL=gemma3-270m; PLANS=${PLANS:-dense,offload,offload-hnsw@100/1024}
  LENGTHS=${LENGTHS:-8k,16k,32000} ;;
*) echo "unknown run '$name': gemma, smollm2 or offload" >&2; exit 2 ;;
esac
# The wheels and weights where `bench/retrieval_quality.sh setup` / `profile` put them (/tmp/site, /tmp/hwcache)
export PYTHONPATH=/tmp/site:${PYTHONPATH:+$PYTHONPATH:}$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export HEADWISE_CACHE=${HEADWISE_CACHE:-/tmp/hwcache}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
ARGS=(--plans "$PLANS" --tasks passkey,needle --lengths "$LENGTHS" --depths 0.1,0.3,0.5,0.7,0.9 --samples "${SAMPLES:-50}")
read -ra extra <<< "${EVAL_ARGS:-}"
ARGS+=("${extra[@]}")
T0=$(date +%s)
source "$(dirname "$0")/lib/sharded_eval.sh"
COLLECT_S=140 sharded_eval "$name" $((secs - 150)) "${ARGS[@]}"
if [ -n "${OUT:-}" ]; then
  (cd "$WORK" && tar czf "$OUT/long-context-$name.tgz" "eval-$name" logs)
  ls -la "$OUT"
fi
