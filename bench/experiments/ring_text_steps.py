"""What ``--select-2bit``'s text term would do with a given order of rings: each head's ring alone and the set built
from them in that order (``runner.rings_within_text``), as KL from dense on the profiler's held-in text, without
running the probes. Session 39 fed it the order in which run 33's guarded ``--select-2bit`` at 0.3 ranked the rings
that beat the plan (layers 10, 7, 0, 1, 17 on the GPU; bench/results/gemma3_select_2bit_guard_run33_h100_2026-12-06.json)
to see which set the text term keeps on Gemma 3:

    python bench/experiments/ring_text_steps.py gemma3-270m PLAN.json --heads 10:0,7:0,0:0,1:0,17:0 --ring 32 \\
        --target-len 4096 --dtype bfloat16 --result OUT.json

PLAN.json is the solved plan (no ``--select-2bit``): ``headwise profile gemma3-270m --budget 0.3 --method mass
--target-len 4096 --from-scores plans/gemma3-270m-run10.json --fit-lengths 2k,8k --min-ring 32 --quantize --quant-2bit
--quant-global-key-bits 4 --quant-residual 64 --full-share 1.0``. A diagnostic of the rule: the probes still decide
whether a set replaces the plan.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from headwise.bench.record import result_doc, write_result
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.profile.runner import SELECT_TEXT_TOKENS, HeldInText, ringed_policies, rings_within_text
from headwise.profile.select import SELECT_TEXT_ALLOWANCE


def parse_heads(text: str) -> list[tuple[int, int]]:
    """``"10:0,7:0"`` -> [(10, 0), (7, 0)]."""
    try:
        return [(int(a), int(b)) for a, b in (h.split(":") for h in text.split(",") if h.strip())]
    except ValueError:
        raise SystemExit(f"--heads takes LAYER:HEAD,... got {text!r}") from None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("plan", type=Path)
    ap.add_argument("--heads", required=True, help="LAYER:HEAD,... in the order the probes ranked their rings")
    ap.add_argument("--ring", type=int, default=32)
    ap.add_argument("--target-len", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=SELECT_TEXT_TOKENS)
    ap.add_argument("--allowance", type=float, default=SELECT_TEXT_ALLOWANCE)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--result", type=Path, default=None)
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    heads = parse_heads(args.heads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    base = HeadPlan.load(args.plan)
    base.check_model(lm.spec)
    policies = base.policies()

    text = HeldInText.load(lm, args.tokens, args.target_len)

    def kl(hs: list[tuple[int, int]]) -> float:
        return text.kl(ringed_policies(lm.spec, policies, hs, args.ring))

    plan_kl = kl([])
    singles = {h: kl([h]) for h in heads}
    chosen, set_kl, steps = rings_within_text([(h, singles[h]) for h in heads], kl, plan_kl, args.allowance)
    shape = text.info()
    print(f"held-in text: {shape['rows']} rows of {shape['tokens']} tokens, last {shape['positions']} positions; "
          f"plan KL {plan_kl:.4f}")
    for h in heads:
        print(f"  layer {h[0]} head {h[1]} alone: {singles[h]:.4f} (+{singles[h] - plan_kl:.4f})")
    for s in steps:
        print(f"  set {s['ringed']}: {s['text_kl']:.4f} (+{s['text_kl'] - plan_kl:.4f}) {'kept' if s['within'] else 'over'}")
    results = {"plan": str(args.plan), "plan_digest": base.digest(), "ring": args.ring, "allowance": args.allowance,
               "text": shape,
               "plan_text_kl": round(plan_kl, 4),
               "singles": [{"ringed": list(h), "text_kl": round(v, 4)} for h, v in singles.items()],
               "steps": steps, "kept": [list(h) for h in chosen],
               "kept_text_kl": None if set_kl is None else round(set_kl, 4)}
    if args.result:
        write_result(result_doc("python bench/experiments/ring_text_steps.py " + shlex.join(argv), results, lm.device),
                     args.result)
    return results


if __name__ == "__main__":
    main()
