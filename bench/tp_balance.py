"""How evenly tensor-parallel ranks hold a plan's KV: the naive split against the balanced placement (CPU, seconds).

For each plan and rank count: the KV bytes every rank holds after ``at`` tokens (bf16), the spread (fullest rank /
emptiest rank - 1) and the layer excess (extra attention time of a step whose layers each wait for their slowest
rank, taking a layer's time as the bytes it reads; ``placement.Balance``), under the naive split (KV heads in model
order) and under ``placement.balance``'s placement.

Plans: the shipped ones in plans/ at every rank count that divides their KV heads (SmolLM2's 3 KV heads split over
3 ranks only; Gemma 3's single KV head over none), and 25% plans for a 32-layer Llama-3-8B-shaped model (32 query /
8 KV heads, head_dim 128) at TP 2 and 4: the solver (``profile.solver.solve``, budget 0.25 of dense at 128K tokens)
on seeded uniform random head scores, seeds 0-4 (no real profile of that model is at hand: random scores say where
full heads land when nothing lines them up with the naive split, neither for nor against it), once as a one-rank
profile makes it (63 full heads) and once solved for 4 ranks (``solve(ranks=4)``, ``headwise profile --tp 4``: 60
full heads, a multiple of 4, hence of 2).

Run: PYTHONPATH=src python bench/tp_balance.py   (a table, then the JSON document as the last stdout line; also
bench/results/tp_balance_<date>.json)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from headwise.bench.record import save_result
from headwise.placement import balance, measure
from headwise.plan import HeadPlan
from headwise.profile.solver import solve
from headwise.spec import ModelSpec

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = ModelSpec("llama", 32, 32, 8, 128, 131072, (None,) * 32)
AT = 131072


def llama3_plan(seed: int, ranks: int = 1, budget: float = 0.25) -> HeadPlan:
    scores = torch.rand(LLAMA3_8B.num_layers, LLAMA3_8B.num_kv_heads, generator=torch.Generator().manual_seed(seed))
    sol = solve(LLAMA3_8B, scores, budget, AT, ranks=ranks)
    return HeadPlan.from_policies(LLAMA3_8B, sol.policies, "llama3-8b-shape", budget=budget,
                                  scores=f"uniform seed {seed}", ranks=ranks)


def spec_of(plan: HeadPlan) -> ModelSpec:
    """The plan's header as a spec (every layer global: SmolLM2 has no sliding layers)."""
    m = plan.model
    return ModelSpec(m["architecture"], m["num_layers"], m["num_q_heads"], m["num_kv_heads"], m["head_dim"], 0,
                     (None,) * m["num_layers"])


def row(name: str, plan: HeadPlan, spec: ModelSpec, tp: int, at: int) -> dict:
    order = balance(plan, spec, tp, at)
    naive, placed = measure(plan, spec, tp, at), measure(plan, spec, tp, at, order)
    return {"plan": name, "tp": tp, "at": at, "kv_fraction": round(plan.kv_fraction(spec, at), 4),
            "full_heads": plan.counts().get("full", 0), "heads": spec.num_layers * spec.num_kv_heads,
            "naive": naive.to_dict(), "balanced": placed.to_dict()}


def main() -> None:
    rows, skipped = [], []
    for path in sorted((ROOT / "plans").glob("*.json")):
        plan = HeadPlan.load(path)
        spec = spec_of(plan)
        tps = [tp for tp in (2, 3, 4) if spec.num_kv_heads % tp == 0 and spec.num_q_heads % tp == 0]
        if not tps:
            skipped.append({"plan": f"plans/{path.name}", "why": f"{spec.num_kv_heads} KV head(s): no rank count of "
                            "2-4 splits them"})
        for tp in tps:
            rows.append(row(f"plans/{path.name}", plan, spec, tp, 8192))
    for seed in range(5):
        for ranks in (1, 4):  # ranks 4: full heads in a multiple of 4, which also splits over 2
            plan = llama3_plan(seed, ranks)
            for tp in (2, 4):
                rows.append(row(f"llama3-8b 25% s{seed}" + (f" solved r{ranks}" if ranks > 1 else ""), plan,
                                LLAMA3_8B, tp, AT))
    print(f"{'plan':<36}{'TP':>3}{'at':>8}{'full':>6}  {'naive spread':>12}{'excess':>8}  "
          f"{'balanced spread':>15}{'excess':>8}")
    for r in rows:
        print(f"{r['plan']:<36}{r['tp']:>3}{r['at']:>8}{r['full_heads']:>6}  {100 * r['naive']['spread']:>11.1f}%"
              f"{100 * r['naive']['layer_excess']:>7.1f}%  {100 * r['balanced']['spread']:>14.1f}%"
              f"{100 * r['balanced']['layer_excess']:>7.1f}%")
    for s in skipped:
        print(f"{s['plan']}: {s['why']}")
    worst: dict[str, float] = {}  # the largest spread over seeds, per kind of plan, TP and placement
    for r in rows:
        if r["plan"].startswith("llama3"):
            kind = ("solved for 4 ranks" if "solved" in r["plan"] else "solved for 1 rank") + f", TP {r['tp']}"
            for how in ("naive", "balanced"):
                worst[f"{kind}, {how}"] = max(worst.get(f"{kind}, {how}", 0.0), r[how]["spread"])
    for key, value in worst.items():
        print(f"llama3-8b 25%, {key}: largest spread over seeds {100 * value:.1f}%")
    results = {"rows": rows, "skipped": skipped, "llama3_worst_spread": worst}
    path = save_result("PYTHONPATH=src python " + " ".join(sys.argv), results, ROOT / "bench" / "results", "tp_balance",
                       device="cpu")
    print(f"wrote {path}")
    print(json.dumps(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
