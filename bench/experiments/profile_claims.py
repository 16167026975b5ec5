"""Experiments that check the profiler's claims on the bundled models (CPU). Each writes one JSON file.

    PYTHONPATH=src python bench/experiments/profile_claims.py masking --model gemma3-270m \\
        --plan plans/gemma3-270m.json -o bench/results/retrieval_masking_gemma3-270m.json
    PYTHONPATH=src python bench/experiments/profile_claims.py budget --model smollm2-135m \\
        --plan plans/smollm2-135m.json -o bench/results/profile_budget_smollm2-135m.json

``masking`` (Wu et al., section 4): zero the attention output of the top-k retrieval heads (k = 5% of the
query heads, rounded up; scores from the plan's profile) versus k random other heads (several draws), and
measure needle/passkey accuracy on prompts the profile never saw (other seeds). Generation runs through the
probe attention (exact attention + the head mask).

``budget``: at one KV budget, plans that differ only in which score decides the full heads (every method the
profile measured, plus random scores), the streaming-for-all baseline at equal memory, and dense, compared
on needle/passkey accuracy and top-1 next-token agreement with dense over Shakespeare
(``headwise.eval.fidelity``). Every plan is re-solved for the length it is evaluated at, as
``headwise profile --target-len LENGTH`` would: head scores from the profile's record (they do not depend on
the target), spans measured again for that length (``mass.py``: the windows' output error is a property of
the target length), the profiler's default ``full_share``; so "equal KV memory" holds at that length.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from headwise.bench.record import result_doc, write_result
from headwise.models import LoadedModel, load_model
from headwise.plan import HeadPlan
from headwise.profile.probe import HeadMask, Probe, greedy_generate
from headwise.profile.solver import solve

EVAL_SEED = 10_000
"""Seeds of evaluation prompts start here (profiling uses seeds 0..N): no prompt is shared."""


def _prompts(lm: LoadedModel, tasks: list[str], lengths: list[int], depths: list[float], seeds: int) -> list[Any]:
    from headwise.eval.tasks import make_sample

    out = []
    for task in tasks:
        for n in lengths:
            for d in depths:
                for s in range(seeds):
                    out.append(make_sample(task, lm.tokenizer, n, d, EVAL_SEED + 1000 * s + int(100 * d) + n))
    return out


def _answer_len(sample: Any) -> int:
    ids = sample.meta["needles"][0].get("answer_token_ids") or []
    return len(ids) + 2 if ids else sample.max_new_tokens


def _accuracy_probe(lm: LoadedModel, samples: list[Any], probe_factory: Any, desc: str) -> tuple[float, list[int]]:
    from headwise.eval.scoring import score

    stop = {lm.tokenizer.eos_token_id} if lm.tokenizer.eos_token_id is not None else set()
    hits = []
    for smp in tqdm(samples, desc=desc, leave=False):
        ids = lm.tokenizer(smp.prompt, return_tensors="pt", add_special_tokens=True).input_ids
        out = greedy_generate(lm, ids, _answer_len(smp), probe_factory(), stop_ids=stop)
        text = lm.tokenizer.decode(out, skip_special_tokens=True)
        hits.append(int(score(smp.meta["scoring"], text, smp.answers) >= 1.0))
    return sum(hits) / max(1, len(hits)), hits


COMMAND = "PYTHONPATH=src python bench/experiments/profile_claims.py " + " ".join(sys.argv[1:])


def _save(path: str, result: dict[str, Any]) -> None:
    """Write (atomically) after every condition: a run cut short still leaves what it measured."""
    write_result(result_doc(COMMAND, result), path)


def masking(args: argparse.Namespace) -> dict[str, Any]:
    lm = load_model(args.model, device="cpu")
    plan = HeadPlan.load(args.plan)
    scores = torch.tensor(plan.meta["scores"]["retrieval_q"])
    n_heads = scores.numel()
    k = math.ceil(0.05 * n_heads)
    order = scores.flatten().argsort(descending=True).tolist()
    H = scores.shape[1]
    top = [(i // H, i % H) for i in order[:k]]
    rng = random.Random(args.seed)
    others = [(i // H, i % H) for i in order[k:]]
    draws = [rng.sample(others, k) for _ in range(args.draws)]
    samples = _prompts(lm, args.tasks.split(","), [int(x) for x in args.lengths.split(",")],
                       [float(x) for x in args.depths.split(",")], args.seeds)
    t0 = time.time()
    result: dict[str, Any] = {
        "experiment": "retrieval-head masking (Wu et al. section 4)",
        "model": args.model,
        "scores_from": {"plan": args.plan, "created_by": plan.meta.get("created_by")},
        "query_heads": n_heads,
        "k": k,
        "top_heads": [{"layer": i, "q_head": h, "score": round(float(scores[i, h]), 4)} for i, h in top],
        "prompts": [{"task": s.task, "length": s.length, "depth": s.depth, "seed": s.seed} for s in samples],
        "complete": False,
    }
    acc, hits = _accuracy_probe(lm, samples, Probe, "dense")
    result["dense"] = {"accuracy": acc, "hits": hits}
    _save(args.output, result)
    acc, hits = _accuracy_probe(lm, samples, lambda: HeadMask(top), f"mask top-{k}")
    result["mask_top_k"] = {"accuracy": acc, "hits": hits}
    _save(args.output, result)
    rand: list[dict[str, Any]] = []
    for j, heads in enumerate(draws):
        acc, hits = _accuracy_probe(lm, samples, lambda h=heads: HeadMask(h), f"mask random #{j}")
        rand.append({"heads": [list(h) for h in heads], "accuracy": acc, "hits": hits})
        result["mask_random_k"] = {"mean_accuracy": sum(r["accuracy"] for r in rand) / len(rand), "draws": rand}
        result["seconds"] = round(time.time() - t0, 1)
        _save(args.output, result)
    result["complete"] = True
    return result


def _plans_at(lm: LoadedModel, profile: HeadPlan, budget: float, length: int, random_draws: int,
              seed: int, methods: list[str] | None = None, full_share: float | None = None,
              calibrate: bool = True) -> dict[str, HeadPlan]:
    """The compared plans, most telling first: profiled default, streaming at equal memory, random full heads,
    then the other measured scores."""
    from headwise.eval.runner import streaming_baseline
    from headwise.profile.runner import FULL_SHARE, Spans, measure_spans

    spec = lm.spec
    meta = profile.meta
    spans = Spans.from_meta(meta)
    if spans is None or meta.get("span_recall_target_len") != length or (calibrate and spans.layer_kl is None):
        spans = measure_spans(lm, length, calibrate)  # measured for this length, as the profiler would
    recall = spans.value
    full_share = FULL_SHARE if full_share is None else full_share
    default = meta.get("method")
    by_method: dict[str, HeadPlan] = {}
    for key, scores in meta["scores"].items():
        name = key[: -len("_kv")]
        if key.endswith("_kv") and (methods is None or name in methods or name == default):
            sol = solve(spec, torch.tensor(scores), budget, length, recall, full_share=full_share)
            by_method[name] = HeadPlan.from_policies(spec, sol.policies, lm.name, method=name)
    ref = by_method[default]
    plans: dict[str, HeadPlan] = {f"{default} (profiled default)": ref}
    # equal memory: what the profiled plan holds at this length
    plans["streaming (all heads)"] = streaming_baseline(spec, "streaming", ref.kv_tokens(spec, length), length,
                                                        "equal memory")
    gen = torch.Generator().manual_seed(seed)
    for j in range(random_draws):
        sol = solve(spec, torch.rand(spec.num_layers, spec.num_kv_heads, generator=gen) + 1e-3, budget, length, recall,
                    full_share=full_share)
        plans[f"random full #{j}"] = HeadPlan.from_policies(spec, sol.policies, lm.name, method="random")
    plans.update({name: p for name, p in by_method.items() if name != default})
    return plans


def _mean(xs: list[float]) -> float:
    return round(sum(xs) / len(xs), 6)


def budget_compare(args: argparse.Namespace) -> dict[str, Any]:
    from headwise.engine import Engine
    from headwise.eval.fidelity import fidelity, text_ids
    from headwise.eval.scoring import score
    from headwise.profile.runner import FULL_SHARE

    lm = load_model(args.model, device="cpu")
    profile = HeadPlan.load(args.plan)
    methods = args.methods.split(",") if args.methods else None
    t0 = time.time()
    out: dict[str, Any] = {
        "experiment": f"plans at budget {args.budget}: which score decides the full heads",
        "model": args.model,
        "profile": {"plan": args.plan, "created_by": profile.meta.get("created_by"), "method": profile.meta.get("method")},
        "budget": args.budget,
        "full_share": FULL_SHARE if args.full_share is None else args.full_share,
        "calibrated_spans": not args.no_calibrate,
        "complete": False,
    }
    # fidelity over Shakespeare, plans solved at the text length
    fid_len = args.fidelity_length
    if "fidelity" not in args.parts:
        fid_len = 0
    if fid_len:
        plans = _plans_at(lm, profile, args.budget, fid_len, args.random_draws, args.seed, methods, args.full_share,
                          not args.no_calibrate)
        runs = [fidelity(lm, plans, text_ids(lm, fid_len, args.seed + t)) for t in range(args.texts)]
        overall = {"tokens": sum(r["overall"]["tokens"] for r in runs), "texts": args.texts,
                   "ppl_dense": _mean([r["overall"]["ppl_dense"] for r in runs]),
                   "plans": {n: {k: _mean([r["overall"]["plans"][n][k] for r in runs]) for k in ("ppl", "kl", "top1")}
                             for n in plans}}
        out["fidelity"] = {
            "length": fid_len,
            "kv_fraction": {n: round(p.kv_fraction(lm.spec, fid_len), 4) for n, p in plans.items()},
            "summary": {n: p.summary() for n, p in plans.items()},
            "overall": overall,
            "per_text": [r["overall"] for r in runs],
            "buckets": runs[0]["buckets"],
        }
        out["seconds"] = round(time.time() - t0, 1)
        _save(args.output, out)
    if "needle" not in args.parts:
        out["complete"] = True
        return out
    # needle accuracy, plans solved at the prompt length
    needle_len = args.needle_length
    plans = _plans_at(lm, profile, args.budget, needle_len, args.random_draws, args.seed, methods,
                      args.full_share, not args.no_calibrate)
    samples = _prompts(lm, args.tasks.split(","), [needle_len], [float(x) for x in args.depths.split(",")], args.seeds)
    needle: dict[str, Any] = {}
    for name, plan in [("dense", HeadPlan.dense(lm.spec, lm.name)), *plans.items()]:
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        eng = Engine(lm, plan)
        hits = []
        for smp in tqdm(samples, desc=f"needle {name}", leave=False):
            text = "".join(ev.text for ev in eng.generate(smp.prompt, max_new_tokens=_answer_len(smp)) if ev.stats is None)
            hits.append(int(score(smp.meta["scoring"], text, smp.answers) >= 1.0))
        needle[name] = {"accuracy": sum(hits) / len(hits), "hits": hits,
                        "kv_fraction": round(plan.kv_fraction(lm.spec, needle_len), 4), "summary": plan.summary()}
        out["needle"] = {"length": needle_len, "prompts": len(samples), "tasks": args.tasks, "plans": needle}
        out["seconds"] = round(time.time() - t0, 1)
        _save(args.output, out)
    out["seconds"] = round(time.time() - t0, 1)
    out["complete"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("masking")
    m.add_argument("--model", default="gemma3-270m")
    m.add_argument("--plan", required=True, help="a profiled plan (its meta holds the retrieval scores)")
    m.add_argument("--tasks", default="needle,passkey")
    m.add_argument("--lengths", default="1024,2048")
    m.add_argument("--depths", default="0.2,0.5,0.8")
    m.add_argument("--seeds", type=int, default=1)
    m.add_argument("--draws", type=int, default=5)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", required=True)
    b = sub.add_parser("budget")
    b.add_argument("--model", default="smollm2-135m")
    b.add_argument("--plan", required=True)
    b.add_argument("--budget", type=float, default=0.25)
    b.add_argument("--tasks", default="needle,passkey")
    b.add_argument("--needle-length", type=int, default=1024)
    b.add_argument("--depths", default="0.2,0.5,0.8")
    b.add_argument("--seeds", type=int, default=2)
    b.add_argument("--fidelity-length", type=int, default=4096)
    b.add_argument("--texts", type=int, default=1, help="Shakespeare texts (seeds) the fidelity is averaged over")
    b.add_argument("--random-draws", type=int, default=3)
    b.add_argument("--only", default=None, help="comma-separated plan-name prefixes to run (split work)")
    b.add_argument("--parts", default="fidelity,needle", help="which measurements: fidelity, needle or both")
    b.add_argument("--methods", default=None, help="measured scores to build plans from (default: all in the profile)")
    b.add_argument("--full-share", type=float, default=None,
                   help="share of the spare budget full heads may take (default: the profiler's)")
    b.add_argument("--no-calibrate", action="store_true", help="spans from uncalibrated output errors")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("-o", "--output", required=True)
    args = ap.parse_args(argv)
    result = masking(args) if args.cmd == "masking" else budget_compare(args)
    _save(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k in ("experiment", "seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
