"""Do the profiler's held-in probes see what the evaluation saw? Runs plan files and dense on ``select.probe_set``'s
held-in retrieval probes (the probes ``--select-under`` and ``--select-deals`` judge plans with; not the evaluation's
generators) and reports what each answers exactly, by haystack, and its mean answer NLL. Run 28 of docs/quality.md
found, on the evaluation's own 2K passkeys, that 32-token rings on SmolLM2's layer 3 find every passkey (dense 75%);
if the held-in probes rank those plans the same way, a profiler step could find such changes without the evaluation.

    PYTHONPATH=src python bench/experiments/held_in_probe_check.py smollm2-135m OUT.json PLAN.json... \\
        --lengths 2048 --probes 24 [--distractors 0]

``--distractors 0`` asks each probe for its one fact (the passkey's shape, in the probes' own haystacks, values and
wordings) instead of one of three keyed facts. Each row records which probes it answered (``hits``, depth order) and
how many in each quarter of depth (``by_quarter``: the last quarter holds the facts nearest the question).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from headwise.profile.select import hit_string


def by_quarter(hits: torch.Tensor, lengths: list[int], n: int) -> dict[str, list[int]]:
    """Per length, the probes answered in each quarter of depth (the last quarter: the facts nearest the question,
    within a quarter of the length of it)."""
    out = {}
    for k, L in enumerate(lengths):
        row = hits[k * n:(k + 1) * n].tolist()
        out[str(L)] = [sum(row[i] for i in range(n) if q / 4 <= (i + 0.5) / n < (q + 1) / 4) for q in range(4)]
    return out


def main(argv: list[str] | None = None) -> None:
    from headwise.bench.record import result_doc, write_result
    from headwise.models import load_model
    from headwise.plan import HeadPlan
    from headwise.profile.select import BudgetCandidate, measure_budgets, probe_set

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("out", type=Path)
    ap.add_argument("plans", nargs="+", type=Path)
    ap.add_argument("--lengths", default="2048")
    ap.add_argument("--probes", type=int, default=24, help="probes per length")
    ap.add_argument("--distractors", type=int, default=2,
                    help="other facts beside the one asked for (the profiler's probes: 2; 0: one fact, as a passkey)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lm = load_model(args.model, device=args.device, dtype=torch.float32 if args.device == "cpu" else torch.bfloat16)
    lengths = [int(x) for x in args.lengths.split(",")]
    probes = probe_set(lm.tokenizer, lengths, args.probes, distractors=args.distractors)
    cands = [BudgetCandidate.from_plan(HeadPlan.load(p), lm.spec, max(lengths)) for p in args.plans]
    t0 = time.perf_counter()
    dense = measure_budgets(lm, cands, probes)
    rows = [{"plan": "dense", "answered": int(dense.sum()), "of": int(dense.numel()),
             "by_quarter": by_quarter(dense, lengths, args.probes), "hits": hit_string(dense)}]
    for p, c in zip(args.plans, cands):
        rows.append({"plan": p.stem, "answered": c.answered, "kept_of_dense": c.kept, "nll": round(c.nll, 4),
                     "by_haystack": c.by_haystack, "by_length": c.by_length,
                     "by_quarter": by_quarter(c.hits, lengths, args.probes), "hits": hit_string(c.hits)})
    for r in rows:
        print(json.dumps(r))
    command = " ".join(["python", "bench/experiments/held_in_probe_check.py", *(sys.argv[1:] if argv is None else argv)])
    write_result(result_doc(command, {"lengths": lengths, "probes_per_length": args.probes,
                                      "distractors": args.distractors,
                                      "seconds": round(time.perf_counter() - t0, 1), "rows": rows}), args.out)


if __name__ == "__main__":
    main()
