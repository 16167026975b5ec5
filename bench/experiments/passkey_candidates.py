"""Diagnostic (CPU): how the budget split between full heads and streaming windows changes the passkey.

Re-solves a profiled plan at the same budget with several full-head shares (``--from-scores`` arithmetic, no
measuring), and scores each on eval-format passkey prompts at 1K tokens, depths 0.1 / 0.5 / 0.9, by greedy exact
match with the answer fed in (``profile.select.retrieval_on_probes``: every answer token the argmax at its
position), the plan run as its policies' masks. Small n on a CPU: a lead for the GPU evaluation, not a result.

    PYTHONPATH=src python bench/experiments/passkey_candidates.py PLAN.json OUT.json [--shares 1.0,0.5,0.25]
"""

from __future__ import annotations

import argparse
import time

import torch

from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.runner import resolve_from_scores
from headwise.profile.select import ProbeSet, retrieval_on_probes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("plan")
    ap.add_argument("out")
    ap.add_argument("--shares", default="1.0,0.5,0.25")
    ap.add_argument("--per-depth", type=int, default=4)
    args = ap.parse_args()
    lm = load_model("smollm2-135m", device="cpu")
    tok = lm.tokenizer
    prompts = []
    for depth in (0.1, 0.5, 0.9):
        for seed in range(args.per_depth):
            s = make_sample("passkey", tok, 1024, depth, 100 + seed)
            ids = tok(s.prompt).input_ids
            answer = tok(s.prompt + " " + s.answers[0]).input_ids[len(ids):]
            prompts.append((depth, ids, answer))
    source = HeadPlan.load(args.plan)
    rows = []
    for share in [float(x) for x in args.shares.split(",")]:
        plan = resolve_from_scores(lm, source, source.meta["budget"], source.meta["target_len"], "duo",
                                   full_share=share)
        t = time.perf_counter()
        hits = {0.1: 0, 0.5: 0, 0.9: 0}
        for depth, ids, answer in prompts:  # prompts differ in length by a few tokens: one at a time
            probes = ProbeSet({len(ids): torch.tensor([ids + answer])}, {len(ids): torch.tensor([answer])})
            acc, _ = retrieval_on_probes(lm, plan.policies(), probes, batch=1)
            hits[depth] += int(acc)
        row = {"full_share": share, "plan": plan.summary(lm.spec, 1024), "passkey_exact": sum(hits.values()),
               "n": len(prompts), "by_depth": {str(d): h for d, h in hits.items()},
               "seconds": round(time.perf_counter() - t, 1)}
        rows.append(row)
        print(row, flush=True)
    write_result(result_doc("PYTHONPATH=src python bench/experiments/passkey_candidates.py "
                            f"{args.plan} {args.out} --shares {args.shares}", {"rows": rows}), args.out)


if __name__ == "__main__":
    main()
