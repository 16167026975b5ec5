"""Issue 3's quality must-show and attention recall on the bundled models (CPU).

    python bench/quality.py --model smollm2-135m              # 4K tokens, mixes at <= 25% of dense KV + recall
    python bench/quality.py --model gemma3-270m --no-recall   # 8K tokens

Per policy mix (``headwise.bench.quality`` explains how they are built): KV fraction of dense (from the plan),
top-1 next-token agreement with dense, mean KL(dense || plan) and perplexity over one long Shakespeare sample;
streaming for all heads at equal memory is the baseline. With recall (SmolLM2): per query head of every 5th layer,
the share of dense attention mass that a_shape, vertical_slash and block_topk keep at their default budgets, plus a
heatmap in docs/img/. Writes bench/results/quality_<model>_<date>.json ({command, commit, device, results}); the
last stdout line is that JSON's path.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import shlex
import sys
from pathlib import Path

import torch

from headwise.bench import quality as q
from headwise.models import load_model

DEFAULT_LEN = {"smollm2-135m": 4096, "gemma3-270m": 8192}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--length", type=int, default=None, help="tokens of text (default: 4096 SmolLM2, 8192 Gemma 3)")
    ap.add_argument("--budget", type=float, default=0.25, help="largest fraction of dense KV a mix may hold")
    ap.add_argument("--plan", default=None, help="profiled plan (default plans/<model>.json, used when it exists)")
    ap.add_argument("--scores-from", choices=("auto", "profile", "mass"), default="auto",
                    help="what picks the full heads: the profiled plan's scores, or the measured 'mass' criterion")
    ap.add_argument("--only", default="", help="comma-separated regular expressions: run only the mixes whose name matches one (re.search)")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--no-recall", action="store_true")
    ap.add_argument("--recall-layers", default="0,5,10,15,20,25")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    command = "python bench/quality.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    length = args.length or DEFAULT_LEN.get(args.model, 4096)
    out = Path(args.out or f"bench/results/quality_{args.model}_{_dt.date.today().isoformat()}.json")
    torch.manual_seed(0)
    lm = load_model(args.model, device="cpu")
    if not args.no_quality:
        plan = Path(args.plan or f"plans/{args.model}.json")
        res = q.run_quality(lm, length, args.budget, plan, args.scores_from,
                            only=[s for s in args.only.split(",") if s])
        print(q.table(res), flush=True)
        q.save(out, command, f"quality@{length}:{res['full_heads_chosen_by']}", res)
    if not args.no_recall:
        from headwise.eval.fidelity import text_ids

        layers = [int(x) for x in args.recall_layers.split(",") if x]
        rec = q.pattern_recall(lm, text_ids(lm, length, seed=0), layers)
        png = q.draw_recall(rec, f"docs/img/recall_{args.model}.png",
                            f"{args.model}: attention recall of the prefill patterns at default budgets, "
                            f"{length} tokens of Shakespeare")
        rec["png"] = str(png)
        print(q.recall_table(rec), flush=True)
        q.save(out, command, f"recall@{length}", rec)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
