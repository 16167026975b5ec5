"""Diagnostic: which sliding-window layers does a passkey near the question need?

Gemma 3 plans that stream sliding heads (sink 0 + a 128-token window instead of the native 512) lose every passkey
at depth 0.9 of a 2K prompt in CPU smoke tests (docs/quality.md, "What is left"), where the shipped plan, which
quantizes them, keeps it. This takes a plan (default the shipped one), streams one sliding layer at a time, and runs
the evaluation's passkey at the given depths through the engine for each variant (``headwise eval``'s runner), so
the layers whose stream loses the near-question passkey stand out. The evaluation's prompts are used: this is a
diagnostic of the ranking, not a profiler input.

    PYTHONPATH=src python bench/experiments/sliding_streams.py OUT_DIR --model gemma3-270m --length 2048 \\
        --depths 0.9 --samples 3
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from headwise.bench.record import result_doc, write_result
from headwise.eval.runner import EvalConfig, run_eval
from headwise.models import load_model
from headwise.plan import HeadPlan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a folder for the variant plans and the eval's rows (resumes)")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--plan", type=Path, default=None, help="default: plans/MODEL.json")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", default="0.9")
    ap.add_argument("--samples", type=int, default=3, help="prompts per depth")
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--sink", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--result", type=Path, default=None, help="also write a results JSON here")
    args = ap.parse_args()
    lm = load_model(args.model, device=args.device)
    source = args.plan or Path(__file__).resolve().parents[2] / "plans" / f"{args.model}.json"
    base = HeadPlan.load(source)
    sliding = [i for i, w in enumerate(lm.spec.layer_windows) if w is not None]
    if not sliding:
        raise SystemExit(f"{args.model} has no sliding-window layers")
    args.out.mkdir(parents=True, exist_ok=True)
    stream = {"policy": "streaming", "params": {"sink": args.sink, "window": args.window, "compensation": False}}
    files = []
    for layer in sliding:
        doc = json.loads(Path(source).read_text())
        doc["layers"][layer] = [dict(stream) for _ in doc["layers"][layer]]
        doc.setdefault("meta", {})["variant"] = f"layer {layer} streaming (sink {args.sink}, window {args.window})"
        f = args.out / f"stream-L{layer:02d}.json"
        f.write_text(json.dumps(doc, indent=1) + "\n")
        HeadPlan.load(f).check_model(lm.spec)
        files.append(str(f))
    depths = [float(d) for d in args.depths.split(",")]
    res = run_eval(EvalConfig(model=args.model, plans=["dense", str(source), *files], tasks=["passkey"],
                              lengths=[args.length], depths=depths, samples=args.samples * len(depths),
                              out=args.out / "eval", command="bench/experiments/sliding_streams.py"), lm)
    acc = {a["plan"]: a for a in res["accuracy"] if a["task"] == "passkey"}
    rows = []
    for label, a in acc.items():
        layer = int(label.split("-L")[1]) if "-L" in label else None
        rows.append({"plan": label, "streamed_layer": layer, "score": a["score"], "n": a["n"], "ci95": a["ci95"]})
        print(f"{label:24s} {100 * a['score']:5.1f}%  (n={a['n']})")
    if args.result:
        results = {"plan": str(source), "plan_digest": base.digest(), "sliding_layers": sliding,
                   "length": args.length, "depths": depths, "stream": stream, "cells": rows}
        write_result(result_doc("python " + shlex.join(sys.argv), results, lm.device), args.result)


if __name__ == "__main__":
    main()
