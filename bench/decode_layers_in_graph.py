"""Decode attention per layer as the engine runs it: many layers' attention steps in one CUDA graph.

``headwise bench`` times one layer's decode attention per CUDA-graph replay, with L2 flushed before each replay.
Every replay then also pays the graph's launch (~3.6 us on an H100, what an empty graph times at), a cost that
a model's decode step pays once for all its layers: ``engine.GraphDecoder`` captures the whole step. This script
captures ``--layers`` consecutive attention steps, each over its own cache (as a model's layers are: no layer
finds its K/V in L2, without any flush), replays the graph and divides by the number of layers. Same shapes and
kernels as ``headwise bench`` (Llama-3-8B attention, bf16, 128K tokens, random q/k/v): dense SDPA (the faster of
its two forms there, ``enable_gqa``), plan_a (25% full + 75% streaming heads, one launch), page_topk with exact
and with 8-bit bounds (scoring, then the attention kernel selecting the top pages itself, 128-bin histogram;
pages of 32, 4096-token budget). The single-layer, flushed timing of ``headwise bench`` runs in the same process
for comparison.

    PYTHONPATH=src python3 bench/decode_layers_in_graph.py $OUT/decode_layers_in_graph.json [--layers 32] [--batch 1]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch.nn.functional as F

from headwise.bench.decode import SCORE_TUNING, page_topk_fn, plan_a_fn, random_decode_layer, ring_cache
from headwise.bench.record import result_doc, write_result
from headwise.bench.timing import Timer

PAGE, BUDGET, FULL_KV, SINK, WINDOW = 32, 4096, 2, 64, 1024
PLAN_A = {"tokens_per_iter": 128, "num_warps": 4, "num_stages": 3, "programs_per_sm": 2}  # bench_2026-11-23e picks
QUEST = {"fused": 1, "select_bins": 128, "tokens_per_iter": 64, "num_warps": 8, "num_stages": 2, "programs_per_sm": 1,
         "fused_merge": 0, **SCORE_TUNING}


def _layer_fns(batch: int, seq_len: int, seed: int) -> dict[str, object]:
    q, k, v, bounds, codes, scales = random_decode_layer(batch, seq_len, PAGE, seed)
    k_ring, v_ring = ring_cache(k[:, FULL_KV:], SINK, WINDOW), ring_cache(v[:, FULL_KV:], SINK, WINDOW)
    q4 = q[:, :, None]
    return {
        "dense_sdpa": lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
        "plan_a": plan_a_fn(q, k[:, :FULL_KV], v[:, :FULL_KV], k_ring, v_ring, seq_len, FULL_KV, **PLAN_A),
        "page_topk": page_topk_fn(q, k, v, bounds, seq_len, BUDGET, PAGE, **QUEST),
        "page_topk_e4m3": page_topk_fn(q, k, v, codes, seq_len, BUDGET, PAGE, scales=scales, **QUEST),
    }


def _graph_per_layer_us(fns: list, reps: int = 20) -> float:
    """Median time of one replay of a graph running ``fns`` in order (no L2 flush), per function, in us."""
    return 1e3 * Timer(flush=None).graph(lambda: [fn() for fn in fns], reps) / len(fns)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=131072)
    args = ap.parse_args()
    layers = [_layer_fns(args.batch, args.seq_len, seed) for seed in range(args.layers)]
    res: dict[str, object] = {"layers": args.layers, "batch": args.batch, "seq_len": args.seq_len, "page_size": PAGE,
                              "budget": BUDGET, "plan_a_tuning": PLAN_A, "page_topk_tuning": QUEST}
    timer = Timer()
    for name in layers[0]:
        fns = [layer[name] for layer in layers]
        res[f"{name}_per_layer_in_graph_us"] = round(_graph_per_layer_us(fns), 2)
        res[f"{name}_one_layer_flushed_graph_us"] = round(1e3 * timer.graph(fns[0]), 2)
        print(name, res[f"{name}_per_layer_in_graph_us"], res[f"{name}_one_layer_flushed_graph_us"], flush=True)
    for name in ("plan_a", "page_topk", "page_topk_e4m3"):
        for how in ("per_layer_in_graph", "one_layer_flushed_graph"):
            res[f"{name}_speedup_{how}"] = round(res[f"dense_sdpa_{how}_us"] / res[f"{name}_{how}_us"], 2)
    print(json.dumps(res, indent=1))
    write_result(result_doc("PYTHONPATH=src python3 " + " ".join(sys.argv), res), args.out)


if __name__ == "__main__":
    main()
