"""Diagnostic: which of a quantized plan's heads lose the multi-key needles dense answers?

Run 19 (H200, n = 400) found the shipped Gemma 3 plan answering a *distractor's* value on 20 of dense's 2K multi-key
needles and 25 at 8K: the model picks the wrong one of several similar keys. This takes those prompts (the samples a
results JSON says dense answered and the plan did not), rebuilds them with the evaluation's generator, and runs the
plan and variants of it through the engine: the global (full-attention) layers in bf16 or 8-bit, the sliding layers
in bf16, 8-bit keys over 4-bit values on the global layers. The variant that gets the answers back names the heads
and the precision the lost needles need. The evaluation's own prompts are used: a diagnostic, not a profiler input.

    PYTHONPATH=src python bench/experiments/multikey_precision.py RESULTS.json OUT.json --plan PLAN.json --length 2048 \
        --limit 20 --gained 8 --variants dense,plan,globals-int8,globals-k8v4

The plan these runs pointed to (8-bit keys on the global layers) is what ``headwise profile --quantize
--quant-global-key-bits 8`` solves; run 20 evaluated it and it ships as plans/gemma3-270m.json (docs/quality.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from headwise.bench.record import result_doc, write_result
from headwise.engine import Engine
from headwise.eval.runner import sample_seed
from headwise.eval.scoring import score
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan


def split_samples(results: dict[str, Any], plan: str, task: str, length: int) -> tuple[list[int], list[int]]:
    """Indices of the samples dense answers fully and ``plan`` does not (lost), and the reverse (gained), in
    ``results``' rows."""
    got = {(r["plan"], r["idx"]): r["score"] for r in results["rows"]
           if r.get("task") == task and r.get("length") == length}
    pairs = [(s, got[plan, i], i) for (p, i), s in got.items() if p == "dense" and (plan, i) in got]
    return (sorted(i for d, q, i in pairs if d == 1.0 and q < 1.0), sorted(i for d, q, i in pairs if q == 1.0 and d < 1.0))


def variants(base: dict[str, Any], windows: list[int | None]) -> dict[str, dict[str, Any]]:
    """The plan and its variants, as plan documents (the global layers are those with no window)."""
    out = {"dense": {**base, "layers": [[{"policy": "full"} for _ in row] for row in base["layers"]]}, "plan": base}

    def with_layers(pick, head: dict[str, Any]) -> dict[str, Any]:
        doc = copy.deepcopy(base)
        doc["layers"] = [[dict(head) for _ in row] if pick(i) else row for i, row in enumerate(doc["layers"])]
        return doc

    quant = next(h for row in base["layers"] for h in row if h["policy"] == "quantized")
    q8 = {"policy": "quantized", "params": {**quant["params"], "bits": 8}}
    out["globals-bf16"] = with_layers(lambda i: windows[i] is None, {"policy": "full"})
    out["globals-int8"] = with_layers(lambda i: windows[i] is None, q8)
    out["sliding-bf16"] = with_layers(lambda i: windows[i] is not None, {"policy": "full"})
    k8 = {"policy": "quantized", "params": {**quant["params"], "bits": 4, "key_bits": 8}}
    out["globals-k8v4"] = with_layers(lambda i: windows[i] is None, k8)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path, help="a headwise eval results JSON with dense's and the plan's rows")
    ap.add_argument("out", type=Path, help="the results JSON to write")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--plan", type=Path, required=True,
                    help="the plan the results JSON evaluated (run 19's: plans/gemma3-270m-run10.json)")
    ap.add_argument("--label", default="gemma3-270m", help="the plan's label in the results")
    ap.add_argument("--task", default="multikey_needle")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--limit", type=int, default=12, help="lost samples to rerun (the first ones)")
    ap.add_argument("--gained", type=int, default=0, help="also the first N samples the plan answers and dense misses")
    ap.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--dtype", default=None)
    args = ap.parse_args()
    command = " ".join(["PYTHONPATH=src python", *map(shlex.quote, sys.argv)])
    results = json.loads(args.results.read_text())
    lost, gained = split_samples(results, args.label, args.task, args.length)
    idx = lost[: args.limit] + gained[: args.gained]
    if not idx:
        sys.exit(f"no {args.task} sample at {args.length} that dense answers and {args.label} misses")
    lm = load_model(args.model, dtype=args.dtype)
    windows = list(lm.spec.layer_windows)
    docs = variants(json.loads(args.plan.read_text()), windows)
    if args.variants:
        docs = {k: v for k, v in docs.items() if k in args.variants.split(",")}
    seed = int(results.get("seed", 0))
    rows = []
    for name, doc in docs.items():
        plan = HeadPlan.from_dict(doc)
        engine = Engine(lm, plan)
        t0, right = time.perf_counter(), 0
        for i in idx:
            sample = make_sample(args.task, lm.tokenizer, args.length, None, sample_seed(seed, i))
            text = "".join(ev.text for ev in engine.generate(sample.prompt, max_new_tokens=sample.max_new_tokens,
                                                              temperature=0.0) if ev.stats is None)
            s = score(sample.meta["scoring"], text, sample.answers)
            right += s == 1.0
            rows.append({"variant": name, "idx": i, "score": s, "output": text, "answers": sample.answers})
        print(f"{name:14s} {right}/{len(idx)} answered ({time.perf_counter() - t0:.0f} s)", flush=True)
    lost_set = set(lost[: args.limit])
    summary = {name: {"lost_answered": sum(r["score"] == 1.0 and r["idx"] in lost_set for r in rows
                                           if r["variant"] == name),
                      "gained_answered": sum(r["score"] == 1.0 and r["idx"] not in lost_set for r in rows
                                             if r["variant"] == name)}
               for name in docs}
    print(json.dumps(summary))
    doc = result_doc(command,
                     {"model": args.model, "plan": str(args.plan), "task": args.task, "length": args.length,
                      "samples": idx, "lost": lost[: args.limit], "gained": gained[: args.gained],
                      "answered": summary, "rows": rows, "source": str(args.results)})
    write_result(doc, args.out)


if __name__ == "__main__":
    main()
