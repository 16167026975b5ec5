"""Quest decode in one launch (``quest_decode``: scoring, selection and attention as pipelined roles) against
the shipped score -> select+attend -> merge path and dense SDPA (H100, Llama-3-8B layer, 128K tokens, 4K budget):
CUDA-graph step times with L2 flushed, kernel durations, and on-GPU checks that the pipeline chooses the
reference pages and matches the shipped path's output. Exploration for issue 3's page_topk batch-1 target.

    HEADWISE_COMMIT=<sha> PYTHONPATH=src python3 bench/explore_quest_pipeline.py --out $OUT/explore_quest_pipeline.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import torch.nn.functional as F

from headwise.bench.decode import HKV, HQ, SCORE_TUNING, D, _page_bounds, _page_topk_fn, _Timer
from headwise.bench.decode import kernel_durations as kernel_times
from headwise.kernels import sparse_decode as sd
from headwise.kernels.quest_pipeline import quest_decode
from headwise.policies.stores import quantize_bounds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=131072)
    args = ap.parse_args()
    S, budget, page = args.seq_len, 4096, args.page
    timer = _Timer("read")
    res: dict[str, object] = {"commit": os.environ.get("HEADWISE_COMMIT", "?"), "device": torch.cuda.get_device_name(),
                              "seq_len": S, "budget": budget, "page": page}
    for B in (int(b) for b in args.batches.split(",")):
        g = torch.Generator(device="cuda").manual_seed(B)
        q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        bounds = _page_bounds(k, page)
        codes, scales = quantize_bounds(bounds)
        n_pages, kp = S // page, budget // page
        r: dict[str, object] = {}
        table = torch.empty(B, HKV, kp, dtype=torch.int32, device="cuda")
        scores = torch.empty(B, HKV, n_pages, device="cuda")
        out_p = quest_decode(q, k, v, S, bounds, kp, page, table_out=table, scores_out=scores)
        torch.cuda.synchronize()
        r["check_table"] = bool(torch.equal(table.long(), sd.top_pages_reference(scores, kp)))
        ref_scores = sd.quest_page_scores(q, bounds, n_pages)
        r["check_scores_maxdiff"] = (scores - ref_scores)[torch.isfinite(ref_scores)].abs().max().item()
        out_s = sd.topk_sparse_decode(q, k, v, S, ref_scores, kp, page, select_bins=128)
        r["check_out_maxdiff_vs_shipped"] = (out_p.float() - out_s.float()).abs().max().item()
        print(json.dumps({"batch": B, **r}), flush=True)
        shipped = dict(fused=1, tokens_per_iter=64, num_warps=8, num_stages=2, fused_merge=0, select_bins=128,
                       programs_per_sm=1, **SCORE_TUNING)
        fns = {
            "shipped_bins128": _page_topk_fn(q, k, v, bounds, S, budget, page, **shipped),
            "shipped_bins128_fp8": _page_topk_fn(q, k, v, codes, S, budget, page, scales=scales, **shipped),
        }
        for w in (4, 8):
            for fp8 in (0, 1):
                for att in (None, 16, 32):
                    for sc in (None, 264):
                        name = f"pipe_w{w}{'_fp8' if fp8 else ''}_att{att or 'auto'}_sc{sc or 'auto'}"
                        fns[name] = functools.partial(
                            quest_decode, q, k, v, S, codes if fp8 else bounds, kp, page,
                            scales=scales if fp8 else None, num_warps=w, attenders_per_head=att, scorers=sc)
        for name, fn in fns.items():
            try:
                r[f"{name}_graph_us"] = round(1e3 * timer.graph(fn), 2)
                if name.startswith("shipped") or name.endswith("auto_scauto"):
                    r[f"{name}_kernels_us"] = kernel_times(fn)
            except Exception as exc:  # report, keep going
                r[f"{name}_error"] = repr(exc)[:300]
            print(name, r.get(f"{name}_graph_us"), r.get(f"{name}_error", ""), flush=True)
        q4, qp = q[:, :, None], q.view(B, HKV, HQ // HKV, D)
        sdpa = F.scaled_dot_product_attention
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
