"""Quest decode with 8-bit page bounds (H100, Llama-3-8B layer, 128K tokens, 4K budget): CUDA-graph step times next to dense SDPA (the faster of its two
forms), per-kernel durations. Exploration for issue 3's page_topk batch-1 target (at b595a61 it also timed programmatic
dependent launch after the first kernel: no gain, removed); writes JSON to --out.

    HEADWISE_COMMIT=<sha> PYTHONPATH=src python3 bench/explore_quest_fp8.py --out $OUT/explore_quest_fp8.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import torch.nn.functional as F

from headwise.bench.decode import HKV, HQ, SCORE_TUNING, D, _page_topk_fn, _Timer, random_decode_layer
from headwise.bench.decode import kernel_durations as kernel_times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    S, budget, page = 131072, 4096, 32
    timer = _Timer("read")
    res: dict[str, object] = {"commit": os.environ.get("HEADWISE_COMMIT", "?"), "device": torch.cuda.get_device_name(),
                              "seq_len": S, "budget": budget, "page": page}
    for B in (int(b) for b in args.batches.split(",")):
        q, k, v, bounds, codes, scales = random_decode_layer(B, S, page, seed=B)
        r: dict[str, object] = {}
        fused = dict(fused=1, tokens_per_iter=64, num_warps=8, num_stages=2, fused_merge=0, select_bins=128,
                     programs_per_sm=1)
        three = dict(fused=0, select_bins=256, tokens_per_iter=64, num_warps=4, num_stages=2, programs_per_sm=4)
        variants = {
            "fused": (fused, {}),
            "fused_bins256": (dict(fused, select_bins=256), {}),
            "three": (three, {}),
        }
        for sb in (64, 128):
            for sw in (4, 8):
                variants[f"fused_e4m3_bp{sb}_w{sw}"] = (fused, {"block_p": sb, "score_warps": sw})
                variants[f"three_e4m3_bp{sb}_w{sw}"] = (three, {"block_p": sb, "score_warps": sw})
        for name, (cfg, score_cfg) in variants.items():
            e4m3 = "e4m3" in name
            st = {**SCORE_TUNING, **score_cfg}
            try:
                fn = _page_topk_fn(q, k, v, codes if e4m3 else bounds, S, budget, page,
                                   scales=scales if e4m3 else None, **st, **cfg)
                r[f"{name}_graph_us"] = round(1e3 * timer.graph(fn), 2)
                if B == 1 and not score_cfg:
                    r[f"{name}_kernels_us"] = kernel_times(fn)
            except Exception as exc:  # report, keep going
                r[f"{name}_error"] = repr(exc)[:300]
            print(name, r.get(f"{name}_graph_us"), r.get(f"{name}_error", ""), flush=True)
        sdpa = F.scaled_dot_product_attention
        q4, qp = q[:, :, None], q.view(B, HKV, HQ // HKV, D)
        r["dense_gqa_graph_us"] = round(1e3 * timer.graph(functools.partial(sdpa, q4, k, v, enable_gqa=True)), 2)
        r["dense_packed_graph_us"] = round(1e3 * timer.graph(functools.partial(sdpa, qp, k, v)), 2)
        dense = min(r["dense_gqa_graph_us"], r["dense_packed_graph_us"])
        r["speedups"] = {kk[: -len("_graph_us")]: round(dense / vv, 2)
                         for kk, vv in r.items() if kk.endswith("_graph_us") and not kk.startswith("dense")}
        print(json.dumps({"batch": B, "dense_graph_us": dense, "speedups": r["speedups"]}), flush=True)
        res[f"b{B}"] = r
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
