"""Where the time of a Quest decode step goes (H100): per-kernel GPU durations from the PyTorch profiler (CUPTI),
next to CUDA-graph step times. Exploration for issue 3's page_topk batch-1 target; prints JSON to --out.

    PYTHONPATH=src python3 bench/explore_quest.py --out $OUT/explore_quest.json
"""

from __future__ import annotations

import argparse
import functools
import json

import torch

from headwise.bench.decode import HKV, HQ, SCORE_TUNING, D, _page_bounds, _page_topk_fn, _Timer
from headwise.bench.decode import kernel_durations as kernel_times
from headwise.kernels import sparse_decode as sd


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=1)
    args = ap.parse_args()
    B, S, budget = args.batch, 131072, 4096
    g = torch.Generator(device="cuda").manual_seed(B)
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    timer = _Timer("read")
    res: dict[str, object] = {"batch": B}
    small = torch.zeros(1, device="cuda")
    res["graph_empty_us"] = 1e3 * timer.graph(lambda: small.add_(1))
    for page in (32, 64):
        bounds = _page_bounds(k, page)
        n_pages, kp = S // page, budget // page
        scores = sd.quest_page_scores(q, bounds, n_pages, block_p=64, num_warps=8)
        table = sd.select_pages(scores, kp, use_kernel=True)
        cfgs = {
            "fused_bins128": dict(fused=1, select_bins=128, tokens_per_iter=64, num_warps=8, num_stages=2,
                                  programs_per_sm=1, fused_merge=0),
            "fused_bins0": dict(fused=1, select_bins=0, tokens_per_iter=64, num_warps=8, num_stages=2,
                                programs_per_sm=1, fused_merge=0),
            "three_bins128": dict(fused=0, select_bins=128, tokens_per_iter=64, num_warps=4, num_stages=2,
                                  programs_per_sm=4),
        }
        for name, cfg in cfgs.items():
            fn = _page_topk_fn(q, k, v, bounds, S, budget, page, **SCORE_TUNING, **cfg)
            res[f"p{page}_{name}_graph_us"] = 1e3 * timer.graph(fn)
            res[f"p{page}_{name}_kernels_us"] = kernel_times(fn)
        for bp, w in ((32, 4), (64, 8), (128, 8), (256, 8), (64, 16)):
            fn = functools.partial(sd.quest_page_scores, q, bounds, n_pages, block_p=bp, num_warps=w)
            res[f"p{page}_scores_bp{bp}_w{w}_us"] = kernel_times(fn)
            res[f"p{page}_scores_bp{bp}_w{w}_graph_us"] = 1e3 * timer.graph(fn)
        for bins in (0, 128):
            for w in (4, 8, 16):
                fn = functools.partial(sd.select_pages, scores, kp, use_kernel=True, bins=bins, num_warps=w)
                res[f"p{page}_topk_bins{bins}_w{w}_us"] = kernel_times(fn)
        for pps, w in ((1, 8), (2, 4), (4, 4), (8, 4)):
            fn = functools.partial(sd.sparse_decode, q, k, v, S, table, None, page, num_warps=w,
                                   programs_per_sm=pps)
            res[f"p{page}_attend_pps{pps}_w{w}_us"] = kernel_times(fn)
            res[f"p{page}_attend_pps{pps}_w{w}_graph_us"] = 1e3 * timer.graph(fn)
        fn = functools.partial(sd.topk_sparse_decode, q, k, v, S, scores, kp, page, select_bins=128)
        res[f"p{page}_topk_attend_fused_us"] = kernel_times(fn)
        print(json.dumps({kk: vv for kk, vv in res.items() if kk.startswith(f"p{page}")}, indent=1), flush=True)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)  # noqa: E731
    res["dense_graph_us"] = 1e3 * timer.graph(dense)
    res["dense_kernels_us"] = kernel_times(dense)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps({kk: vv for kk, vv in res.items() if not kk.startswith("p")}, indent=1))


if __name__ == "__main__":
    main()
