"""Timeline of one ``quest_decode`` launch (H100): every program's global-timer stamps by role (scorer, selector,
attender), relative to the first program's start, summarised as min / median / max per stamp; plus the
kernel's registers and spills. Diagnoses where the one-launch pipeline spends its time.

    HEADWISE_COMMIT=<sha> PYTHONPATH=src python3 bench/trace_quest_pipeline.py --out $OUT/trace_quest_pipeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from headwise.bench.decode import HKV, HQ, D, _page_bounds
from headwise.kernels import quest_pipeline as qp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--page", type=int, default=32)
    ap.add_argument("--num-warps", type=int, default=4)
    args = ap.parse_args()
    B, S, budget, page = args.batch, 131072, 4096, args.page
    g = torch.Generator(device="cuda").manual_seed(B)
    q = torch.randn(B, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    bounds = _page_bounds(k, page)
    kp = budget // page
    trace = torch.zeros(4096, 8, dtype=torch.int64, device="cuda")
    res: dict[str, object] = {"commit": os.environ.get("HEADWISE_COMMIT", "?"), "batch": B, "page": page,
                              "num_warps": args.num_warps}
    runs = []
    for _ in range(5):
        trace.zero_()
        qp.quest_decode(q, k, v, S, bounds, kp, page, trace=trace, num_warps=args.num_warps)
        torch.cuda.synchronize()
        runs.append(trace.cpu())
    kern = qp.LAST_LAUNCH["kernel"]
    res["n_regs"] = getattr(kern, "n_regs", None)
    res["n_spills"] = getattr(kern, "n_spills", None)
    tr = runs[-1]
    n_bh = B * HKV
    used = tr[:, 2] > 0
    tr = tr[used]
    t0 = tr[:, 2].min().item()
    rows = tr.tolist()
    tickets = sorted(rows, key=lambda r: r[0])  # roles by ticket: scorers, one selector per head, attenders
    res["programs"] = len(rows)

    def rel(x):
        return (x - t0) / 1000.0 if x > 0 else None

    def summary(rs, idx):
        vals = [rel(r[idx]) for r in rs if r[idx] > 0]
        if not vals:
            return None
        return [round(min(vals), 2), round(statistics.median(vals), 2), round(max(vals), 2)]

    n_sc = qp.LAST_LAUNCH.get("n_sc", 0)
    scorers = [r for r in tickets if r[0] < n_sc]
    selectors = [r for r in tickets if n_sc <= r[0] < n_sc + n_bh]
    attenders = [r for r in tickets if r[0] >= n_sc + n_bh]
    res["roles"] = {"scorers": len(scorers), "selectors": len(selectors), "attenders": len(attenders)}
    res["scorer_us"] = {"start": summary(scorers, 2), "head0_done": summary(scorers, 3), "end": summary(scorers, 4)}
    res["selector_us"] = {"start": summary(selectors, 2), "scores_ready": summary(selectors, 3),
                          "table_ready": summary(selectors, 4), "end": summary(selectors, 5)}
    res["selector_per_head"] = [[rel(r[2]), rel(r[3]), rel(r[4]), rel(r[5])] for r in selectors]
    res["attender_us"] = {"start": summary(attenders, 2), "table_seen": summary(attenders, 3),
                          "attended": summary(attenders, 4), "merged": summary(attenders, 5)}
    res["sms_used"] = len({r[1] for r in rows})
    res["kernel_span_us"] = round((max(max(r[2:6]) for r in rows) - t0) / 1000.0, 2)
    print(json.dumps(res, indent=1))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
