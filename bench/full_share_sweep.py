"""Solver sweep: how much of a 0.25 KV budget should full heads take (SmolLM2, retrieval scores from
plans/smollm2-135m.json's metadata)? Top-1 agreement with dense over 2K tokens of Shakespeare and 4 needle/passkey
prompts at 1K, against streaming for all heads at equal memory, all in one run."""
import json

import torch

from headwise.engine import Engine
from headwise.eval.fidelity import text_ids
from headwise.eval.scoring import score_task
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.solver import solve

lm = load_model("smollm2-135m")
src = HeadPlan.load("plans/smollm2-135m.json")
scores = torch.tensor(src.meta["scores"]["retrieval_kv"])
recall = torch.tensor(src.meta["span_recall_kv"])
ids = text_ids(lm, 2048, seed=0)
with torch.inference_mode():
    dense = Engine(lm).logits(ids).argmax(-1)
samples = [make_sample(t, lm.tokenizer, 1024, d, seed=s) for t in ("passkey", "needle") for d, s in ((0.25, 1), (0.75, 2))]
out = []
plans = {}
for share in (1.0, 0.5, 0.25, 0.0):
    sol = solve(lm.spec, scores, 0.25, 4096, recall, full_share=share)
    plans[share] = HeadPlan.from_policies(lm.spec, sol.policies, lm.name)
plans["streaming-for-all (64+960)"] = HeadPlan.uniform(lm.spec, {"policy": "streaming", "params": {"sink": 64, "window": 960}})
for share, plan in plans.items():
    eng = Engine(lm, plan)
    agree = (eng.logits(ids).argmax(-1) == dense).float().mean().item()
    hits = []
    for smp in samples:
        text = "".join(e.text for e in eng.generate(smp.prompt, max_new_tokens=12))
        hits.append(score_task(smp.task, text, smp.answers))
    row = {"full_share": share, "full_heads": plan.counts().get("full", 0), "kv_fraction_4k": round(plan.kv_fraction(lm.spec, 4096), 4),
           "top1_agreement_2k": round(agree, 4), "needle_passkey_1k": sum(hits), "prompts": len(hits)}
    print(row, flush=True)
    out.append(row)
with open("bench/results/profile_full_share_smollm2-135m.json", "w") as fh:
    json.dump({"command": "python bench/full_share_sweep.py", "results": out}, fh, indent=1)
