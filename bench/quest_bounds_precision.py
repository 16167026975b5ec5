"""Quest with 8-bit page bounds: how much decode fidelity does it cost? (CPU, SmolLM2; an experiment for issue 3)

Scoring reads the page bounds (min and max key per channel per page): half the bytes of a batch-1 Quest step at
128K tokens. Stored in 8 bits (float8 e4m3 with one scale per page row, absmax / 448) and rounded *outward*
(the min down, the max up to the next representable value), every score is still an upper bound of ``q . k``
over its page, only looser. This measures what the looser bound does to the chosen pages, as top-1 agreement
and KL against dense over teacher-forced decode steps (as bench/decode_quality.py), next to the exact bounds.

Since 6082f27 the store keeps them in 8 bits (``PageTopK(bounds="e4m3")``, ``PagedStore(bound_format="e4m3")``)
and this script runs that option (at 84afe3a it rounded the values of exact bounds in place, the same numbers).

    PYTHONPATH=src python3 bench/quest_bounds_precision.py [--prompt-len 4096] [--budget 512] [--samples 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from headwise.bench.decode import agreement, decode_logits
from headwise.bench.record import git_commit
from headwise.data import shakespeare
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--page-sizes", default="16,32")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    torch.manual_seed(0)
    lm = load_model("smollm2-135m", device="cpu")
    need = args.samples * (args.prompt_len + args.steps)
    ids = lm.tokenizer(shakespeare(6 * need), return_tensors="pt").input_ids[:, :need]
    slices = [ids[:, i * (args.prompt_len + args.steps) : (i + 1) * (args.prompt_len + args.steps)]
              for i in range(args.samples)]
    dense = torch.cat([decode_logits(Engine(lm), s, args.prompt_len, args.steps) for s in slices])
    rows = []
    for page in (int(p) for p in args.page_sizes.split(",")):
        for bounds in ("exact", "e4m3"):
            plan = HeadPlan.uniform(lm.spec, {"policy": "page_topk",
                                              "params": {"page_size": page, "budget": args.budget, "bounds": bounds}})
            logits = torch.cat([decode_logits(Engine(lm, plan), s, args.prompt_len, args.steps) for s in slices])
            rows.append({"page_size": page, "bounds": bounds, **agreement(dense, logits)})
            print(f"page {page:>3} bounds {bounds:<13} top-1 {rows[-1]['top1_agreement']:.3f}  KL {rows[-1]['kl']:.4f}",
                  file=sys.stderr, flush=True)
    doc = {
        "command": "PYTHONPATH=src python3 " + " ".join(sys.argv),
        "model": lm.name, "commit": git_commit(), "device": "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "prompt_len": args.prompt_len, "steps": args.steps, "samples": args.samples, "budget_tokens": args.budget,
        "results": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"quest_bounds_precision_{datetime.date.today().isoformat()}.json").write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
