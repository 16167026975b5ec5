"""Engine decode steps of a batch over the KV page pool: replayed from CUDA graphs at padded batch sizes vs eager.

Builds a random-weight Llama with Llama-3-8B's attention and MLP shapes (32 query / 8 KV heads, head_dim 128, hidden
4096) and a few layers, a page pool, and for each batch size ``B``: ``B`` random prompts of ``--context`` tokens,
prefilled through ``Engine.step``, then ``--steps`` decode-only ``Engine.step`` calls timed one by one (CUDA
synchronised; median), in three engines over equal pools:

- ``graph``: ``padded_decode`` on, steps replayed from the CUDA graph captured at the padded size (``batch_graphs.py``);
- ``padded_eager``: the same padded static-buffer step, run eagerly (``cuda_graphs=False``);
- ``eager``: the eager batched step (``padded_decode=False``: ``paged_cache.decode_over_pool``).

Plans (``--plans``): ``dense``; ``full25_streaming75``, 25% full + 75% streaming heads (KV heads 0-1 full, 2-7 sink
64 + window 1024); ``quest4096``, every head ``page_topk`` in pages of ``--page-size`` with a budget of 4096 tokens
(over the pool: its page choice in the step, ``paged_cache.select_pool_pages``). It reports the
step times, the padded size, and how many greedy tokens of the timed steps the graph run shares with the eager
run (bf16: the kernels' splits differ between a graph sized for a length limit and an eager launch, so a near tie
may round the other way). The last stdout line is the JSON document it writes.

    PYTHONPATH=src python3 bench/batch_graph_decode.py OUT.json [--context 8192] [--batch 1,3,8,32] [--layers 4] \
        [--plans dense,full25_streaming75,quest4096]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/batch_graph_decode.py /tmp/x.json --context 40 --batch 1,3 \
        --layers 2 --hidden 64 --steps 2 --kv-gb 0.05 --page-size 4   (a CPU dry run of the script itself: no graph on
        the CPU)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from headwise.bench.record import result_doc, write_result
from headwise.engine import Engine, SamplingParams
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import Full, PageTopK, Streaming
from headwise.pool import PagePool
from headwise.spec import ModelSpec


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_mode(lm: LoadedModel, plan: HeadPlan, prompts: list[list[int]], steps: int, pool_bytes: int,
             page_size: int, chunk: int, **engine_kw) -> dict:
    """Prefill ``prompts``, then time ``steps`` decode-only steps (the first ``warmup`` untimed: compile, capture)."""
    pool = PagePool(lm.spec, pool_bytes, lm.dtype.itemsize, page_size)
    engine = Engine(lm, plan, chunk_size=chunk, pool=pool, **engine_kw)
    warmup = 3
    params = SamplingParams(max_new_tokens=steps + warmup + 2, stop_token_ids=[])
    seqs = [engine.add(p, params) for p in prompts]
    while any(s.prefilled < len(s.prompt_ids) or not s.generated for s in seqs):
        engine.step(prefill_tokens=chunk * 4)
    times, graph, padded = [], 0, 0
    for i in range(warmup + steps):
        _sync()
        t0 = time.perf_counter()
        info = engine.step()
        _sync()
        if i >= warmup:
            times.append(1e3 * (time.perf_counter() - t0))
            graph += info.graph
            padded = info.padded
        assert info.decode_rows == len(seqs) and not info.prefill_tokens
    tokens = [s.generated[1 + warmup :] for s in seqs]
    for s in seqs:
        engine.abort(s)
    del engine, pool, seqs
    gc.collect()  # the engine and its graphs refer to each other: free the pool before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"step_ms": round(statistics.median(times), 3), "graph_steps": graph, "padded_size": padded,
            "tokens": tokens}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--batch", default="1,3,8,32")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-gb", type=float, default=40.0, help="each engine's page pool (GB)")
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a CPU dry run (with TRITON_INTERPRET=1)")
    ap.add_argument("--plans", default="dense,full25_streaming75,quest4096", help="comma-separated, of those above")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    heads = 32 if args.hidden >= 1024 else 4
    cfg = LlamaConfig(vocab_size=32000 if dev == "cuda" else 256, hidden_size=args.hidden,
                      intermediate_size=args.hidden * 7 // 2, num_hidden_layers=args.layers, num_attention_heads=heads,
                      num_key_value_heads=heads // 4, max_position_embeddings=args.context + 1024,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    lm = LoadedModel("llama3-8b-shapes-random", model, None, ModelSpec.from_config(cfg), "random")
    spec = lm.spec
    kv = spec.num_kv_heads
    mixed = HeadPlan.from_policies(spec, [[Full() if h < max(1, kv // 4) else Streaming(sink=64, window=1024)
                                           for h in range(kv)]] * spec.num_layers, "full25")
    quest = HeadPlan.from_policies(spec, [[PageTopK(page_size=args.page_size, budget=4096)] * kv] * spec.num_layers,
                                   "quest4096")
    known = {"dense": HeadPlan.dense(spec), "full25_streaming75": mixed, "quest4096": quest}
    wanted = args.plans.split(",")
    if unknown := [p for p in wanted if p not in known]:
        ap.error(f"unknown plans {unknown}; choose from {sorted(known)}")
    plans = {name: known[name] for name in wanted}
    modes = {"graph": {}, "padded_eager": {"padded_decode": True, "cuda_graphs": False},
             "eager": {"padded_decode": False}}
    chunk = min(8192, args.context)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for b in [int(x) for x in args.batch.split(",")]:
        prompts = torch.randint(0, cfg.vocab_size, (b, args.context), generator=gen).tolist()
        for pname, plan in plans.items():
            res = {name: run_mode(lm, plan, prompts, args.steps, int(args.kv_gb * 1e9), args.page_size, chunk, **kw)
                   for name, kw in modes.items()}
            same = sum(x == y for g, e in zip(res["graph"]["tokens"], res["eager"]["tokens"]) for x, y in zip(g, e))
            total = sum(len(g) for g in res["graph"]["tokens"])
            row = {"batch": b, "plan": pname, "context": args.context, "padded_size": res["graph"]["padded_size"],
                   "graph_steps": res["graph"]["graph_steps"], "steps": args.steps,
                   **{f"{n}_step_ms": r["step_ms"] for n, r in res.items()},
                   "eager_over_graph": round(res["eager"]["step_ms"] / res["graph"]["step_ms"], 3),
                   "graph_tokens_equal_eager": f"{same}/{total}",
                   "graph_tokens_equal_padded_eager": res["graph"]["tokens"] == res["padded_eager"]["tokens"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    cmd = "PYTHONPATH=src python3 bench/batch_graph_decode.py " + " ".join(sys.argv[1:])
    doc = result_doc(cmd, {"layers": args.layers, "hidden": args.hidden, "page_size": args.page_size, "rows": rows})
    write_result(doc, args.out)
    print(json.dumps(doc, default=str))


if __name__ == "__main__":
    main()
