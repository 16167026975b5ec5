"""Accuracy against KV memory from several ``headwise eval`` runs (one per budget), in one JSON and one plot.

``bench/retrieval_quality.sh curve`` evaluates, per budget, a plan re-solved from one ranking against streaming,
random placement and Quest at the same memory, each budget in its own ``eval-curve-qB`` folder. This collects
those folders (and a main-table run for dense), puts every cell (plan kind x budget x length) with its Wilson 95%
interval and its KV measured from the CUDA allocator at that length in one results file, and draws accuracy
against measured KV per prompt length, with the intervals as error bars.

    python bench/retrieval_curve.py --run ablation2=/tmp/r7 --run ablation1=/tmp/r3c --dense /tmp/r4/eval-main \\
        --task passkey --out bench/results/retrieval_curve_smollm2-135m_h200_2026-12-02.json

Each ``--run LABEL=DIR`` names the ranking the plans in ``DIR/eval-curve-q*/results.json`` were solved from;
the baselines of each run are kept under that run's label (``random@equal`` depends on the plan it permutes).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from headwise.eval.report import retention

KINDS = {"streaming@equal": "streaming", "random@equal": "random", "quest@equal": "quest", "dense": "dense",
         "random-full@equal": "random-full"}


def kind_of(plan: str) -> str:
    """Baselines by their spec; a kvpress press (imported by bench/kvpress/import_outputs.py) by its name, e.g.
    ``kvpress:snapkv`` for ``kvpress:snapkv@equal``."""
    if plan.startswith("kvpress:"):
        return plan.split("@")[0]
    name = plan.split(":")[0]  # random@equal:SEED: another draw of random placement
    if name in KINDS:
        return KINDS[name]
    base, at, budget = name.partition("@")  # streaming@0.5: a baseline at a budget (the curve's SELECT_UNDER)
    if at and base in ("streaming", "random", "random-full", "quest") and re.fullmatch(r"[0-9.]+", budget):
        return base
    return "plan"


def at_budget(plan: str) -> float | None:
    """The budget a baseline named at one runs at (``quest@0.3``: 0.3), else None: one eval may hold baselines at
    several budgets (the folder's ``qB`` then names only the first)."""
    _, at, budget = plan.split(":")[0].partition("@")
    if at and kind_of(plan) != "plan" and re.fullmatch(r"[0-9.]+", budget):
        return float(budget)
    return None


def cells(results: dict[str, Any], task: str, run: str, budget: float | None) -> list[dict[str, Any]]:
    """One row per plan x length of ``task``: accuracy, n, Wilson 95%, KV measured (allocator) at that length."""
    perf = {(p["plan"], p["length"]): p for p in results["performance"]}
    out = []
    for a in results["accuracy"]:
        if a["task"] != task or a.get("pooled"):  # the draws' pool: each draw is a point of its own
            continue
        p = perf.get((a["plan"], a["length"]), {})
        out.append({"run": run, "budget": at_budget(a["plan"]) or budget, "kind": kind_of(a["plan"]), "plan": a["plan"],
                    "task": task, "length": a["length"], "n": a["n"], "score": a["score"], "ci95": a["ci95"],
                    "kv_fraction_measured": p.get("kv_fraction_measured"), "kv_fraction": p.get("kv_fraction"),
                    "command": results["command"], "commit": results["commit"], "device": results["device"]})
    return out


def with_dense(results: dict[str, Any], dense: dict[str, Any] | None) -> dict[str, Any]:
    """``results`` with the dense plan's rows of another run of the same prompts added (same model, tasks,
    lengths, depths, seed: a sample is the same prompt wherever it runs), so retention can pair them."""
    if dense is None or any(p["label"] == "dense" for p in results["plans"]):
        return results
    entry = next(p for p in dense["plans"] if p["label"] == "dense")
    return {**results, "plans": [entry, *results["plans"]],
            "rows": results["rows"] + [r for r in dense["rows"] if r["plan"] == "dense"]}


def collect(runs: list[tuple[str, Path]], dense_dir: Path | None, task: str) -> list[dict[str, Any]]:
    """Every cell of ``task``, with "kept of dense" (``report.retention``: of the samples dense answers, the share
    the plan answers too, paired sample by sample, so a cell that ran only some depths is compared on those)."""
    dense = json.loads((dense_dir / "results.json").read_text()) if dense_dir is not None else None
    rows: list[dict[str, Any]] = []
    seen: set[tuple[str, float | None, str, int]] = set()
    for label, folder in runs:
        for res in sorted(folder.glob("eval-curve-q*/results.json")):
            m = re.search(r"eval-curve-q([0-9.]+)", str(res))
            budget = float(m.group(1)) if m else None
            results = with_dense(json.loads(res.read_text()), dense)
            kept = {(k["plan"], k["task"], k["length"]): k for k in retention(results)}
            for r in cells(results, task, label, budget):
                key = (label, budget, r["plan"], r["length"])
                if r["kind"] == "dense" or key in seen:  # a cell two folders hold: the first given wins
                    continue
                seen.add(key)
                k = kept.get((r["plan"], task, r["length"]))
                if k:
                    ratio = k["accuracy_ratio"]  # Bonett-Price 95%: "keeps 0.95 of dense's accuracy"
                    r.update(kept=k["kept"], kept_n=k["n"], kept_share=k["share"], kept_ci95=k["ci95"],
                             accuracy_ratio=ratio["ratio"], accuracy_ratio_ci95=ratio["ratio_ci95"])
                rows.append(r)
    if dense is not None:
        rows += [r for r in cells(dense, task, "dense", None) if r["kind"] == "dense"]
    return rows


def earlier_cells(doc: dict[str, Any], rows: list[dict[str, Any]], task: str, source: str) -> list[dict[str, Any]]:
    """The cells of an earlier results file of this script that ``rows`` does not measure again: same task, and no
    row of the same run, budget, kind and length (a re-measured cell replaces the earlier one, never averages
    with it). Dense comes from ``rows`` when it has one. Each kept cell names the file it came from."""
    have = {(r["run"], r["budget"], r["kind"], r["length"]) for r in rows}
    dense_lengths = {r["length"] for r in rows if r["kind"] == "dense"}
    out = []
    for c in doc.get("cells", []):
        if c.get("task") != task or (c["run"], c["budget"], c["kind"], c["length"]) in have:
            continue
        if c["kind"] == "dense" and c["length"] in dense_lengths:
            continue
        out.append({**c, "from_earlier": source})
    return out


COLOR = {"plan": "tab:blue", "random": "tab:orange", "streaming": "tab:green", "quest": "tab:red",
         "random-full": "tab:olive"}
PRESS_COLORS = ("tab:purple", "tab:brown", "tab:pink", "tab:cyan", "tab:gray")
RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")
"""One marker per run: the kind is the colour (the plan's a shade of blue per run, darker in the order the runs are
given), the run the marker, so a curve of several runs reads apart."""


def run_style(kind: str, i: int, n_runs: int, color: dict[str, str]) -> dict[str, Any]:
    """Line style of ``kind``'s points from the ``i``-th of ``n_runs`` runs: plans solid, baselines dashed."""
    c = color[kind]
    if kind == "plan" and n_runs > 1:
        c = plt.get_cmap("Blues")(0.45 + 0.5 * i / (n_runs - 1))
    return {"color": c, "marker": RUN_MARKERS[i % len(RUN_MARKERS)], "linestyle": "-" if kind == "plan" else "--",
            "mfc": c if kind == "plan" else "white"}


def kv_x(r: dict[str, Any]) -> float | None:
    """The cell's KV in % of dense: the allocator's figure, or the tensors' where the allocator's is known wrong."""
    v = r["kv_fraction"] if r.get("kv_from_tensors") else r["kv_fraction_measured"]
    return None if v is None else 100 * v


def plot(rows: list[dict[str, Any]], task: str, title: str, path: Path) -> None:
    """Top row: accuracy per length (dense's interval shaded); bottom row: kept of dense, paired."""
    lengths = sorted({r["length"] for r in rows if r["kind"] != "dense"}) or sorted({r["length"] for r in rows})
    fig, axes = plt.subplots(2, len(lengths), figsize=(5.2 * len(lengths) + 2.8, 8.2), constrained_layout=True,
                             squeeze=False)
    runs = [r for r in dict.fromkeys(x["run"] for x in rows) if r != "dense"]
    presses = sorted({r["kind"] for r in rows if r["kind"].startswith("kvpress:")})
    color = {**COLOR, **{k: PRESS_COLORS[i % len(PRESS_COLORS)] for i, k in enumerate(presses)}}
    metrics = (("score", "ci95", "accuracy (%), Wilson 95%"),
               ("kept_share", "kept_ci95", "kept of dense (%): paired, Wilson 95%"))
    for row, (value, ci, ylabel) in enumerate(metrics):
        for ax, L in zip(axes[row], lengths):
            for i, run in enumerate(runs):
                for kind in color:
                    pts = sorted((r for r in rows if r["run"] == run and r["kind"] == kind and r["length"] == L
                                  and kv_x(r) is not None and r.get(value) is not None), key=kv_x)
                    if not pts:
                        continue
                    y = [100 * r[value] for r in pts]
                    err = [[100 * (r[value] - r[ci][0]) for r in pts], [100 * (r[ci][1] - r[value]) for r in pts]]
                    # a baseline at the plan's measured KV (@equal) or at the budget itself (@B): same name
                    ax.errorbar([kv_x(r) for r in pts], y, yerr=err, capsize=3, markersize=5,
                                label=f"{kind} ({run})", **run_style(kind, i, len(runs), color))
            heading = f"{task} at {L // 1024}K tokens"
            for r in rows:
                if r["kind"] == "dense" and r["length"] == L:
                    heading += f" (dense {100 * r['score']:.0f}%, n = {r['n']})"
                    if row == 0:
                        ax.axhspan(100 * r["ci95"][0], 100 * r["ci95"][1], color="grey", alpha=0.15)
                        ax.axhline(100 * r["score"], color="grey", linewidth=1, label="dense (its 95% shaded)")
            if row == 1:
                ax.axhline(95, color="grey", linewidth=1, linestyle=":", label="95% of dense")
            ax.set_title(heading, fontsize=10)
            ax.set_xlabel("KV held, % of dense (CUDA allocator, at this length)")
            ax.set_ylabel(ylabel)
            ax.set_ylim(-5, 105)
            ax.grid(alpha=0.3)
    legend: dict[str, Any] = {}  # every axis's lines once (a run may hold cells at some lengths only)
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(lab, h)
    fig.legend(legend.values(), legend.keys(), fontsize=7, loc="outside right upper")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    small_png(path)


def small_png(path: Path, colors: int = 64) -> None:
    """Rewrite the plot at ``path`` with a palette of ``colors`` (a third of the bytes: the repository's results ride
    along with every device upload, docs/quality.md)."""
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=colors, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="LABEL=DIR with DIR/eval-curve-q*/results.json")
    ap.add_argument("--dense", type=Path, help="an eval folder whose results.json has the dense rows")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--title", default="")
    ap.add_argument("--tensor-kv", action="append", default=[], metavar="RUN",
                    help="use the tensors' KV count for RUN's plan cells (its allocator reading is known wrong)")
    ap.add_argument("--earlier", type=Path, action="append", default=[], metavar="FILE",
                    help="an earlier results file of this script: its cells are kept where the folders given now "
                         "have no cell of the same run, budget, kind and length (each cell keeps its own command)")
    ap.add_argument("--out", type=Path, required=True, help="STEM or STEM.json: writes STEM.json and STEM.png")
    args = ap.parse_args()
    runs = []
    for item in args.run:
        label, _, folder = item.partition("=")
        if not folder or not Path(folder).is_dir():
            ap.error(f"--run wants LABEL=DIR with an existing DIR, got {item!r}")
        runs.append((label, Path(folder)))
    rows = collect(runs, args.dense, args.task)
    for path in args.earlier:
        if not path.is_file():
            ap.error(f"--earlier: no such file {path}")
        rows += earlier_cells(json.loads(path.read_text()), rows, args.task, str(path))
    for r in rows:
        if r["run"] in args.tensor_kv and r["kind"] == "plan":
            r["kv_from_tensors"] = True
    if not rows:
        ap.error(f"no {args.task} cells in the given folders")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"task": args.task, "command": "python " + shlex.join(sys.argv), "runs": [{"label": lab, "dir": str(d)} for lab, d in runs], "cells": rows}
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    plot(rows, args.task, args.title or f"{args.task}: accuracy vs KV held", args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')} ({len(rows)} cells)")


if __name__ == "__main__":
    main()
