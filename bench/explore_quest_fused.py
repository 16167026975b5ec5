"""``quest_decode`` (one launch: score, select, attend) on an H100 at Llama-3-8B shapes, 128K tokens, 4K budget:
a correctness check against the three-step path, then CUDA-graph times (L2 flushed by reading) of settings,
next to dense SDPA and the current best page_topk path. Exploration for issue 3; JSON to --out.

    PYTHONPATH=src python3 bench/explore_quest_fused.py --out $OUT/explore_quest_fused.json
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from headwise.bench.decode import HKV, HQ, SCORE_TUNING, D, _page_bounds, _page_topk_fn, _Timer
from headwise.kernels import sparse_decode as sd
from headwise.kernels.quest_decode import quest_decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--pages", default="32,64")
    ap.add_argument("--seq-lens", default="131072")
    ap.add_argument("--grid", default="16,32:32,64:128:4", help="splits:dim_slices:tokens_per_iter:warps")
    args = ap.parse_args()
    budget = 4096
    timer = _Timer("read")
    res: list[dict] = []
    grid = [tuple(int(x) for x in part.split(",")) for part in args.grid.split(":")]
    for S in [int(x) for x in args.seq_lens.split(",")]:
        for B in [int(x) for x in args.batches.split(",")]:
            run_batch(B, S, budget, [int(x) for x in args.pages.split(",")], timer, res, grid)
        with open(args.out, "w") as fh:
            json.dump(res, fh, indent=1)
        torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


def run_batch(B: int, S: int, budget: int, pages: list[int], timer: _Timer, res: list[dict],
              grid_values: list[tuple[int, ...]]) -> None:
    g = torch.Generator(device="cuda").manual_seed(B)
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    dense = timer.graph(lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True))
    res.append({"batch": B, "seq_len": S, "what": "dense_sdpa", "graph_us": 1e3 * dense})
    for page in pages:
        bounds = _page_bounds(k, page)
        n_pages, kp = S // page, budget // page
        # correctness at the real shapes, twice (state left clean)
        for two in (False, True):
            for _ in range(2):
                scores = torch.empty(B, HKV, n_pages, device="cuda")
                sel = torch.empty(B, HKV, n_pages, device="cuda", dtype=torch.int8)
                out = quest_decode(q, k, v, S, bounds, kp, page, scores_out=scores, selected_out=sel,
                                   two_launch=two)
                chosen = sd.top_pages_reference(scores, kp)
                expect = torch.zeros_like(sel).scatter_(2, chosen, 1)
                ref = sd.sparse_decode(q, k, v, S, chosen.int(), None, page)
                ok = {"batch": B, "seq_len": S, "page": page, "what": "check", "two_launch": two,
                      "selection_equal": bool(torch.equal(sel, expect)),
                      "max_abs_diff_vs_sparse_decode": (out.float() - ref.float()).abs().max().item(),
                      "score_max_abs_diff": (scores - sd.quest_page_scores(q, bounds, n_pages)).abs().max().item()}
            torch.cuda.synchronize()
            res.append(ok)
            if not ok["selection_equal"] or ok["max_abs_diff_vs_sparse_decode"] > 1e-2:
                print("CHECK FAILED", ok, flush=True)
        best = _page_topk_fn(q, k, v, bounds, S, budget, page, **SCORE_TUNING, fused=1, select_bins=128,
                             tokens_per_iter=64, num_warps=8, num_stages=2, programs_per_sm=1, fused_merge=0)
        t = timer.graph(best)
        res.append({"batch": B, "seq_len": S, "page": page, "what": "page_topk_current", "graph_us": 1e3 * t,
                    "speedup": dense / t})
        print(res[-1], flush=True)
        grid = itertools.product(*grid_values, (None,), (1,))
        for splits, ds, tpi, warps, ticket, stages in grid:
            cfg = dict(num_splits=splits, dim_slice=ds, tokens_per_iter=tpi, num_warps=warps, ticket=ticket,
                       num_stages=stages)
            try:
                t = timer.graph(lambda cfg=cfg, bounds=bounds, kp=kp, page=page: quest_decode(
                    q, k, v, S, bounds, kp, page, **cfg), reps=20)
            except Exception as exc:
                res.append({"batch": B, "seq_len": S, "page": page, "what": "quest_decode", **cfg, "error": repr(exc)[:200]})
                continue
            res.append({"batch": B, "seq_len": S, "page": page, "what": "quest_decode", **cfg, "graph_us": 1e3 * t,
                        "speedup": dense / t})
        rows = sorted((r for r in res if r.get("what") == "quest_decode" and r["batch"] == B and r["seq_len"] == S
                       and r.get("page") == page and "graph_us" in r), key=lambda r: r["graph_us"])
        for r in rows[:3]:
            print(r, flush=True)
        cfg = {kk: rows[0][kk] for kk in ("num_splits", "dim_slice", "tokens_per_iter", "num_warps", "num_stages")}
        t2 = timer.graph(lambda cfg=cfg, bounds=bounds, kp=kp, page=page: quest_decode(
            q, k, v, S, bounds, kp, page, two_launch=True, **cfg))
        res.append({"batch": B, "seq_len": S, "page": page, "what": "quest_decode_two_launch", **cfg, "graph_us": 1e3 * t2,
                    "speedup": dense / t2})
        print(res[-1], flush=True)
        t3 = timer.graph(lambda cfg=cfg, bounds=bounds, kp=kp, page=page: quest_decode(
            q, k, v, S, bounds, kp, page, skip_attend=True, **cfg))
        res.append({"batch": B, "seq_len": S, "page": page, "what": "quest_decode_no_attention", **cfg, "graph_us": 1e3 * t3})
        print(res[-1], flush=True)


if __name__ == "__main__":
    main()
