"""Spans from attention-mass recall at the target length (the objective before output errors): SmolLM2, budget 0.25,
full_share 0/0.25/0.5, top-1 agreement and KL vs uniform streaming 64+960 at 4K and 2K (one text each).
Output: bench/results/profile_spans_mass_smollm2-135m.log. Run: PYTHONPATH=src python bench/span_objective_mass.py"""
import time

import torch

from headwise.engine import Engine
from headwise.eval.fidelity import text_ids
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.mass import SPAN_OPTIONS, mass_scores
from headwise.profile.solver import solve

torch.manual_seed(0)
lm = load_model("smollm2-135m")
T = 4096
t = time.time()
mass = mass_scores(lm, T, target_len=T, progress=False)
print("mass", time.time() - t, flush=True)
g = lm.spec.group_size
recall = mass.span_recall.mean(-1).view(lm.spec.num_layers, lm.spec.num_kv_heads, g, len(SPAN_OPTIONS)).mean(2)
torch.save({"recall": recall, "sink": mass.sink, "local": mass.local, "full": mass.span_recall}, "/tmp/span_recall.pt")
src = HeadPlan.load("plans/smollm2-135m.json")
scores = torch.tensor(src.meta["scores"]["retrieval_kv"])
plans = {}
for share in (0.0, 0.25, 0.5):
    sol = solve(lm.spec, scores, 0.25, T, recall, full_share=share)
    plans[f"share{share}"] = HeadPlan.from_policies(lm.spec, sol.policies, lm.name)
    ws = sorted(p.window for row in sol.policies for p in row if hasattr(p, "window"))
    print(share, len(sol.full_heads), sol.fraction, ws[:5], ws[len(ws)//2], ws[-5:], flush=True)
plans["uniform"] = HeadPlan.uniform(lm.spec, {"policy": "streaming", "params": {"sink": 64, "window": 960}})
out = {}
for L in (4096, 2048):
    ids = text_ids(lm, L, seed=0)
    with torch.inference_mode():
        dense = Engine(lm).logits(ids)
        dl = dense.log_softmax(-1)
        for name, plan in plans.items():
            lg = Engine(lm, plan).logits(ids)
            agree = (lg.argmax(-1) == dense.argmax(-1)).float().mean().item()
            kl = (dl.exp() * (dl - lg.log_softmax(-1))).sum(-1).mean().item()
            print(L, name, round(plan.kv_fraction(lm.spec, T), 4), round(agree, 4), round(kl, 4), flush=True)
            out[f"{L}:{name}"] = (agree, kl)
