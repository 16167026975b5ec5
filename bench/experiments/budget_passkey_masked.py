"""Diagnostic: do the held-in probes, and the masked forward itself, rank nested plans as the evaluation does?

On the H200 the plan at 0.75 (52 full + 37 4-bit + 1 8-bit heads) kept 52/75 2K passkeys where the nested plan at
0.5 (15 full + 75 4-bit) kept 71/72 (docs/quality.md). ``headwise profile --select-under`` chooses among such plans
on held-in probes run as masks with the quantized heads rounded (``profile/select.py``). This script scores each
budget's plan, re-solved from one ranking, two ways with that same masked forward: on the selection's held-in probes
(``select.measure_budgets``), and on the evaluation's own passkey prompts (``eval.tasks.make_sample``, greedy exact
with the answer fed in). If the second ranks the plans as the evaluation does and the first does not, the probes
are what to change; if neither does, the masked forward misses what the engine does. The evaluation's generators
are used here to check the selection, never by it.

    PYTHONPATH=src python bench/experiments/budget_passkey_masked.py OUT.json \
        --scores bench/results/retrieval_plan_smollm2-135m_h200_ablation2_2026-12-02.json \
        --budgets 0.25,0.3,0.375,0.5,0.75 --lengths 1024,2048 --per-depth 20 --probes 64

``--plans A.json B.json`` scores plan files as they are beside (or, with ``--budgets ''``, instead of) the re-solved
budgets, e.g. a plan and the same plan with 8-bit keys: do the held-in probes see what key precision does to the
passkey? ``--per-depth 0`` skips the passkey prompts (the probes only). Each candidate also counts the prompts whose
first greedy token differs from dense's (``first_tokens_changed``: fidelity at the decision point), on the probes and
on the passkey prompts.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.runner import Spans
from headwise.profile.select import BudgetCandidate, ProbeSet, measure_budgets, probe_outcomes, probe_set
from headwise.profile.solver import solve

DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


def passkey_prompts(tokenizer: Any, length: int, per_depth: int) -> list[tuple[float, ProbeSet]]:
    """The evaluation's passkey prompts at ``length``, each as a one-row probe set with its answer fed in."""
    out = []
    for depth in DEPTHS:
        for seed in range(per_depth):
            s = make_sample("passkey", tokenizer, length, depth, 100 + seed)
            ids = tokenizer(s.prompt).input_ids
            answer = tokenizer(s.prompt + " " + s.answers[0]).input_ids[len(ids):]
            out.append((depth, ProbeSet({len(ids): torch.tensor([ids + answer])}, {len(ids): torch.tensor([answer])})))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--scores", required=True, help="a plan file whose meta holds the ranking (--from-scores)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="ablation")
    ap.add_argument("--budgets", default="0.25,0.3,0.375,0.5,0.75")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--per-depth", type=int, default=20)
    ap.add_argument("--probes", type=int, default=64, help="held-in probes per length")
    ap.add_argument("--device", default=None)
    ap.add_argument("--plans", nargs="*", default=[], help="plan files scored as they are, beside the budgets")
    ap.add_argument("--passkey-lengths", default=None, help="the passkey prompts' lengths (default: --lengths)")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(args.model, device=device)
    meta = HeadPlan.load(args.scores).meta
    spans = Spans.from_meta(meta)
    target = int(meta["target_len"])
    lengths = [int(x) for x in args.lengths.split(",")]
    score = torch.tensor(meta["scores"][f"{args.method}_kv"])
    cands = [BudgetCandidate(b, solve(lm.spec, score, b, target, None if spans is None else spans.value,
                                      full_share=1.0, quantize=True))
             for b in (float(x) for x in args.budgets.split(",") if x.strip())]
    named = {}
    for path in args.plans:  # as they are: the budget field holds the KV they hold at the longest length, at peak
        cands.append(BudgetCandidate.from_plan(HeadPlan.load(path), lm.spec, max(lengths)))
        named[id(cands[-1])] = path
    t = time.perf_counter()
    dense_probes = measure_budgets(lm, cands, probe_set(lm.tokenizer, lengths, args.probes))
    probe_s = time.perf_counter() - t
    rows: list[dict[str, Any]] = []
    for L in [int(x) for x in (args.passkey_lengths or args.lengths).split(",")] if args.per_depth else []:
        prompts = passkey_prompts(lm.tokenizer, L, args.per_depth)
        dense_first: list[int] = []
        for name, policies in [("dense", None)] + [(named.get(id(c), f"{c.budget:g}"), c.solution.policies)
                                                     for c in cands]:
            t = time.perf_counter()
            hits = {d: 0 for d in DEPTHS}
            first = []
            for depth, ps in prompts:
                hit, _, tok = probe_outcomes(lm, policies, ps, batch=1)
                hits[depth] += int(hit.all())
                first.append(int(tok[0]))
            dense_first = dense_first or first
            rows.append({"plan": name, "length": L, "passkey_exact": sum(hits.values()), "n": len(prompts),
                         "by_depth": {str(d): h for d, h in hits.items()},
                         "first_tokens_changed": sum(a != b for a, b in zip(first, dense_first)),
                         "seconds": round(time.perf_counter() - t, 1)})
            print(rows[-1], flush=True)
    cand_rows = [c.info() | ({"plan_file": named[id(c)]} if id(c) in named else {}) for c in cands]
    for c in cand_rows:
        print({k: c.get(k) for k in ("budget", "kv_fraction", "plan", "probes_answered", "answered_by_length",
                                     "first_tokens_changed")}, flush=True)
    write_result(result_doc(
        "PYTHONPATH=src python bench/experiments/budget_passkey_masked.py " + " ".join(
            [args.out, "--scores", args.scores, "--model", args.model, "--method", args.method, "--budgets",
             args.budgets, "--lengths", args.lengths, "--per-depth", str(args.per_depth), "--probes",
             str(args.probes)] + (["--plans", *args.plans] if args.plans else [])
            + (["--passkey-lengths", args.passkey_lengths] if args.passkey_lengths else [])),
        {"device": device, "dtype": str(lm.dtype), "probes_seconds": round(probe_s, 1),
         "dense_probes_answered": int(dense_probes.sum()), "probes": int(dense_probes.numel()),
         "candidates": cand_rows, "passkey_masked": rows}), args.out)


if __name__ == "__main__":
    main()
