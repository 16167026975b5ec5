"""ACT on a GPU (issue 16): retrieval accuracy and perplexity with and without hidden-sink calibration.

    PYTHONPATH=src python3 bench/act_quality.py [--model smollm2-135m] [--act-length 2048] [--lengths 1k,2k]
        [--samples 100] [--tasks T,...] [--shards 16] [--time-limit 480] [--dtype float32] [--out bench/results]

1. ``profile/act.py`` picks the heads of the dense plan whose calibration lowers the loss on ``--act-length``
   held-in tokens of Shakespeare, and keeps them only if together they lower the loss on the next ``--act-length``
   tokens (held out); with ``--objective retrieval``, the loss of the answers of ``--act-probes`` held-in retrieval
   probes of ``--act-length`` tokens, then of as many held-out ones (``headwise profile --act --act-objective
   retrieval``). The plan (dense + ``act`` heads) is written to ``<out>/act_[forced_][retrieval_]<model>.json``.
2. ``headwise eval`` runs dense and that plan on every generated retrieval task (``--samples`` per task x length
   cell, >= 100 for a result) and the fidelity pseudo-task (perplexity of both by position, KL, top-1 agreement).

If no head helps, step 2 is skipped and the result says so (the plan would be dense), unless ``--force-candidates``:
then the heads whose calibration alone lowered the held-in loss are put on ACT anyway (``<out>/act_forced_<model>.json``)
and step 2 measures what ACT does to accuracy and perplexity where the profiler would not switch it on. With ``--shards N`` the eval
runs as N ``headwise eval --shard i/N`` processes on the one GPU (each decodes at batch 1) for at most
``--time-limit`` seconds, then one ``--collect`` run writes the report; a second call resumes (the plan file and the
eval's rows are reused). Writes ``<out>/act_quality_<model>_<date>.json`` (the choice and the eval's results; the
eval's own report is in ``<out>/act-eval-<model>/``) with ``summary`` (per task and length: both accuracies with
Wilson 95% intervals, ACT's accuracy as a share of dense's on the same prompts with its paired interval and McNemar
p, and perplexity of both) and a plot of it beside it (``.png``); the last stdout line is the JSON document.
``--from-result FILE`` adds the summary and the plot to a result written before they existed (no model, no GPU).

GPU estimate (H200, SmolLM2): selection ~1 min (90 heads x 2 forwards of 2048 tokens); eval 2 plans x 10 tasks x 2
lengths x 100 samples ~10-20 min in 16 shards: two calls of ``--time-limit 480``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from headwise.bench.record import result_doc, result_path, write_result
from headwise.eval.report import retention
from headwise.eval.runner import DEFAULT_TASKS, EvalConfig, parse_length, run_eval
from headwise.models import load_model
from headwise.plan import HeadPlan
from headwise.policies import Full
from headwise.profile.act import OBJECTIVES, act_probes, act_texts, choose_act_heads, with_act


def summary(ev: dict[str, Any]) -> list[dict[str, Any]]:
    """Dense against the ACT plan, per task and length: accuracies (Wilson 95%), the paired ratio of ACT's accuracy
    to dense's on the same prompts (``report.retention``: fully answered samples; Bonett-Price 95% and the exact
    McNemar p of the discordant pairs), and for the fidelity task both perplexities and the KL."""
    plans = [p["label"] for p in ev["plans"]]
    act = next(p for p in plans if p != "dense")
    acc = {(a["plan"], a["task"], a["length"]): a for a in ev["accuracy"] if not a.get("pooled")}
    ratios = {(r["task"], r["length"]): r["accuracy_ratio"] for r in retention(ev) if r["plan"] == act}
    out = []
    for task, length in dict.fromkeys((a["task"], a["length"]) for a in ev["accuracy"]):
        d, a = acc.get(("dense", task, length)), acc.get((act, task, length))
        if d and a:
            out.append({"task": task, "length": length, "n": a["n"], "dense": d["score"], "dense_ci95": d["ci95"],
                        "act": a["score"], "act_ci95": a["ci95"], "paired": ratios.get((task, length))})
    for f in ev.get("fidelity", []):
        if f["plan"] == act:
            o = f["overall"]
            out.append({"task": "fidelity", "length": f["length"], "ppl_dense": o["ppl_dense"], "ppl_act": o["ppl"],
                        "kl": o["kl"], "top1": o["top1"]})
    return out


def plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Accuracy with and without ACT per task, one panel per length, Wilson 95% intervals as error bars."""
    rows = [r for r in rows if r["task"] != "fidelity"]
    lengths = sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(1, len(lengths), figsize=(6 * len(lengths), 4.2), squeeze=False, constrained_layout=True)
    for ax, length in zip(axes[0], lengths):
        cell = [r for r in rows if r["length"] == length]
        for k, (key, label, color) in enumerate((("dense", "dense", "tab:gray"), ("act", "ACT on", "tab:blue"))):
            x = [i + (k - 0.5) * 0.38 for i in range(len(cell))]
            y = [100 * r[key] for r in cell]
            err = [[100 * (r[key] - r[f"{key}_ci95"][0]) for r in cell], [100 * (r[f"{key}_ci95"][1] - r[key])
                                                                          for r in cell]]
            ax.bar(x, y, width=0.38, color=color, label=label, yerr=err, capsize=3)
        for i, r in enumerate(cell):
            p = (r.get("paired") or {}).get("mcnemar_p")
            if p is not None:
                ax.text(i, 103, f"p={p:.2g}", ha="center", fontsize=7)
        ax.set_xticks(range(len(cell)), [r["task"].replace("_needle", "") for r in cell], rotation=20, fontsize=8)
        ax.set_ylim(0, 110)
        ax.set_ylabel("accuracy (%), Wilson 95%")
        ax.set_title(f"{length // 1024}K tokens (p: exact McNemar, paired)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="upper right")
    fig.suptitle(title, fontsize=10)
    path = path.with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish(doc: dict[str, Any], path: Path) -> Path:
    """Write the result document to ``path``; where it holds an eval, with the summary and the plot beside it."""
    res = doc["results"]
    if "eval" in res:
        res["summary"] = summary(res["eval"])
    path = write_result(doc, path)
    if "eval" not in res:
        return path
    heads = len(res["choice"].get("candidates" if res.get("forced") else "heads") or [])
    plot(res["summary"], f"ACT on {heads} heads of {res['model']} ({doc.get('device', '')})", path)
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--act-length", type=int, default=2048)
    ap.add_argument("--objective", choices=OBJECTIVES, default="text",
                    help="what the per-head losses are of: held-in / held-out text, or retrieval probes' answers")
    ap.add_argument("--act-probes", type=int, default=16,
                    help="held-in and held-out probes each (--objective retrieval)")
    ap.add_argument("--lengths", default="1k,2k")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                    help="comma-separated eval tasks (default: every task and the fidelity pseudo-task)")
    ap.add_argument("--shards", type=int, default=1, help="parallel eval processes on the GPU (1: in this process)")
    ap.add_argument("--time-limit", type=int, default=480, help="seconds the shards may run (a later call resumes)")
    ap.add_argument("--dtype", default=None, help="model dtype (default: the device's)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--force-candidates", action="store_true",
                    help="where the held-out check turns ACT off, evaluate it on the held-in candidates anyway (the "
                         "with / without comparison)")
    ap.add_argument("--from-result", type=Path, metavar="FILE",
                    help="add the summary and the plot to an earlier result file of this script, and stop")
    args = ap.parse_args()
    if args.from_result is not None:
        doc = json.loads(args.from_result.read_text())
        finish(doc, args.from_result)
        print(json.dumps(doc.get("results", {}).get("summary"), default=str))
        return 0
    t0 = time.perf_counter()
    lm = load_model(args.model, dtype=args.dtype)
    spec = lm.spec
    out = Path(args.out)
    command = "PYTHONPATH=src python3 " + " ".join(sys.argv)
    retrieval = "retrieval_" if args.objective == "retrieval" else ""
    plan_path = out / f"act_{'forced_' if args.force_candidates else ''}{retrieval}{lm.name}.json"
    key = "candidates" if args.force_candidates else "heads"
    if plan_path.exists():  # a resumed call: the heads were chosen by the first
        plan = HeadPlan.load(plan_path)
        choice_meta = plan.meta["act"]
    else:
        dense = [[Full()] * spec.num_kv_heads for _ in range(spec.num_layers)]
        held_in, held_out = (act_probes(lm, args.act_length, args.act_probes) if retrieval
                             else act_texts(lm, args.act_length))
        choice = choose_act_heads(lm, dense, held_in, held_out)
        choice_meta = choice.meta()
        on = choice.candidates if args.force_candidates else choice.heads
        if on:
            plan = HeadPlan.from_policies(spec, with_act(dense, on), lm.name, created_by=command, act=choice_meta)
            plan.save(plan_path)
    results = {"model": lm.name, "act_length": args.act_length, "objective": args.objective, "choice": choice_meta,
               "forced": args.force_candidates,
               "select_s": round(time.perf_counter() - t0, 1)}
    if choice_meta.get(key):
        lengths = [parse_length(x) for x in args.lengths.split(",")]
        cfg = EvalConfig(model=args.model, plans=["dense", str(plan_path)], tasks=args.tasks.split(","),
                         lengths=lengths, samples=args.samples, out=out / f"act-eval-{lm.name}", command=command,
                         dtype=args.dtype)
        if args.shards > 1:
            base = [sys.executable, "-m", "headwise.cli", "eval", args.model, "--plans", f"dense,{plan_path}",
                    "--lengths", args.lengths, "--tasks", args.tasks, "--samples", str(args.samples), "--out", str(cfg.out), "--no-progress"]
            base += ["--dtype", args.dtype] if args.dtype else []
            procs = [subprocess.Popen(["timeout", str(args.time_limit), *base, "--shard", f"{i}/{args.shards}"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for i in range(args.shards)]
            for p in procs:
                p.wait()
            cfg.collect_only = True
        results.update(plan=str(plan_path), eval_dir=str(cfg.out), eval=run_eval(cfg, lm))
    elif args.force_candidates:
        results["note"] = "no head's calibration lowered the held-in loss: ACT changes nothing on this model"
    else:
        results["note"] = "no head lowered the loss on held-in and held-out text: ACT stays off for this model"
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    doc = result_doc(command, results, device="cuda" if torch.cuda.is_available() else "cpu")
    path = finish(doc, result_path(out, f"act_quality_{lm.name}"))
    print(f"wrote {path}", file=sys.stderr)
    print(json.dumps(doc, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
