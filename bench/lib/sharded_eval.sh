# Sourced by the GPU evaluation scripts (bench/retrieval_quality.sh, bench/long_context_eval.sh): one
# `headwise eval` as $SHARDS processes on the one GPU (each decodes at batch 1, so one process leaves it idle most of
# the time), then `--collect` (fidelity and KV memory measured there) into results.json and the report.
#
#   sharded_eval NAME SECONDS ARGS...   # needs MODEL, WORK, SHARDS, T0 (COLLECT_S: seconds for --collect, 120);
#                                       # writes $WORK/eval-NAME, logs in $WORK/logs
sharded_eval() {
  local name=$1 secs=$2; shift 2
  local out=$WORK/eval-$name
  mkdir -p "$out" "$WORK/logs"
  local pids=()
  for i in $(seq 0 $((SHARDS - 1))); do
    timeout "$secs" python3 -m headwise.cli eval "$MODEL" "$@" --out "$out" --shard "$i/$SHARDS" --no-progress \
      > "$WORK/logs/$name-shard$i.log" 2>&1 &
    pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p"; done
  echo "[$name] shards ended after $(( $(date +%s) - T0 )) s; rows: $(cat "$out"/samples*.jsonl 2>/dev/null | wc -l)"
  timeout "${COLLECT_S:-120}" python3 -m headwise.cli eval "$MODEL" "$@" --out "$out" --collect --no-progress \
    > "$WORK/logs/$name-collect.log" 2>&1
  echo "[$name] collect exit $?"; tail -40 "$WORK/logs/$name-collect.log"
}
