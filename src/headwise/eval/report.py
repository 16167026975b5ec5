"""The eval report: a terminal table, two PNG plots and one self-contained HTML page.

Everything is drawn from ``results.json`` (``runner.run_eval``), so a report can be redrawn without running a
model: ``headwise eval --report-only OUT``. Plots use matplotlib's Agg backend (no display needed); the HTML
embeds them as base64, so the page is one file that can be mailed or committed.
"""

from __future__ import annotations

import base64
import html
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

from headwise.eval.scoring import paired_ratio, wilson

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

DEPTH_TASKS = ("passkey", "needle")


def _len(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.2f}"


def _pct(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.0f}"


def _plans(results: dict[str, Any]) -> list[str]:
    return [p["label"] for p in results["plans"]]


def _gen_tasks(results: dict[str, Any]) -> list[str]:
    return [t for t in results["tasks"] if t != "fidelity"]


def _cell(a: dict[str, Any] | None) -> str:
    """``score [lo-hi]`` in %, the Wilson 95% interval in brackets where the results have it."""
    if a is None:
        return "-"
    ci = a.get("ci95")
    return _pct(a["score"]) + (f" [{_pct(ci[0])}-{_pct(ci[1])}]" if ci else "")


def accuracy_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per plan, one column per task × length (score and Wilson 95% interval), then
    the mean; in %."""
    acc = {(a["plan"], a["task"], a["length"]): a for a in results["accuracy"]}
    cols = [(t, L) for t in _gen_tasks(results) for L in results["lengths"]]
    header = ["plan"] + [f"{t} {_len(L)}" for t, L in cols] + ["mean"]
    rows = []
    pooled = sorted({a["plan"] for a in results["accuracy"] if a.get("pooled")})  # random draws pooled, after the plans
    for p in _plans(results) + pooled:
        cells = [acc.get((p, t, L)) for t, L in cols]
        got = [c["score"] for c in cells if c is not None]
        rows.append([p] + [_cell(c) for c in cells] + [_pct(sum(got) / len(got) if got else None)])
    return header, rows


def retention(results: dict[str, Any], reference: str = "dense") -> list[dict[str, Any]]:
    """Paired with ``reference`` sample by sample: per plan, task and length, of the samples the reference answers
    fully (score 1), how many the plan answers fully too, with the Wilson 95% interval. This is "keeps what dense
    can do" measured directly: the accuracy table's intervals are unpaired and much wider (issue 19)."""
    digests = {p["label"]: p["digest"] for p in results["plans"]}
    tasks = set(_gen_tasks(results))
    # rows of an earlier plan under the same label are not this run's
    rows = [r for r in results.get("rows", []) if r.get("task") in tasks and "score" in r
            and digests.get(r["plan"], {}).get(str(r["length"])) == r["digest"]]

    def sample(r: dict[str, Any]) -> tuple[Any, ...]:
        return r["task"], r["length"], r["depth"], r["seed"], r["idx"]

    ref = {sample(r): r["score"] >= 1.0 for r in rows if r["plan"] == reference}
    pairs: dict[tuple[str, str, int], list[tuple[bool, bool]]] = defaultdict(list)  # (plan right, reference right)
    for r in rows:
        if r["plan"] != reference and sample(r) in ref:
            pairs[(r["plan"], r["task"], r["length"])].append((r["score"] >= 1.0, ref[sample(r)]))
    out = []
    for plan in _plans(results):
        for task in _gen_tasks(results):
            for L in results["lengths"]:
                got = [mine for mine, theirs in pairs.get((plan, task, L), []) if theirs]
                if got:
                    p = sum(got) / len(got)
                    both = pairs[(plan, task, L)]
                    ratio = paired_ratio(sum(m and t for m, t in both), sum(m and not t for m, t in both),
                                         sum(t and not m for m, t in both), sum(not (m or t) for m, t in both))
                    out.append({"plan": plan, "task": task, "length": L, "kept": sum(got), "n": len(got),
                                "share": round(p, 4), "ci95": [round(x, 4) for x in wilson(p, len(got))],
                                "accuracy_ratio": ratio})
    return out


def retention_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per plan, one column per task × length: ``kept/n [lo-hi]`` of dense's fully answered samples."""
    got = {(r["plan"], r["task"], r["length"]): r for r in retention(results)}
    cols = [(t, L) for t in _gen_tasks(results) for L in results["lengths"]]
    header = ["plan"] + [f"{t} {_len(L)}" for t, L in cols]
    rows = []
    for p in _plans(results):
        if any((p, t, L) in got for t, L in cols):
            rows.append([p] + [(lambda r: f"{r['kept']}/{r['n']} [{_pct(r['ci95'][0])}-{_pct(r['ci95'][1])}]")(
                got[(p, t, L)]) if (p, t, L) in got else "-" for t, L in cols])
    return header, rows


def ratio_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per plan, one column per task × length: the plan's accuracy as a share of dense's on the same prompts,
    ``ratio [lo-hi] -lost/+gained`` (``scoring.paired_ratio``: Bonett-Price 95% interval; flips either way)."""
    got = {(r["plan"], r["task"], r["length"]): r["accuracy_ratio"] for r in retention(results)}
    cols = [(t, L) for t in _gen_tasks(results) for L in results["lengths"]]
    header = ["plan"] + [f"{t} {_len(L)}" for t, L in cols]

    def cell(r: dict[str, Any]) -> str:
        if r["ratio"] is None:
            return "-"
        lo, hi = r["ratio_ci95"]
        return f"{r['ratio']:.2f} [{lo:.2f}-{hi:.2f}] -{r['only_ref']}/+{r['only_plan']}"

    rows = [[p] + [cell(got[(p, t, L)]) if (p, t, L) in got else "-" for t, L in cols]
            for p in _plans(results) if any((p, t, L) in got for t, L in cols)]
    return header, rows


def performance_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per plan and length: KV held by the samples at their end (the engine's count), KV measured (the memory row,
    ``runner.measure_kv``: at its peak while decoding, and after the prompt), prefill and decode speed."""
    header = ["plan", "length", "KV MiB", "KV % dense", "KV % dense (measured)", "measured after prefill",
              "prefill s", "prefill tok/s", "decode tok/s"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    rows = []
    for r in results["performance"]:
        rows.append([
            r["plan"], _len(r["length"]), _mib(r["kv_bytes"]), pct(r["kv_fraction"]),
            pct(r.get("kv_fraction_measured")), pct(r.get("kv_fraction_measured_prefill")),
            "-" if r["prefill_s"] is None else f"{r['prefill_s']:.2f}",
            "-" if r["prefill_tokens_per_s"] is None else f"{r['prefill_tokens_per_s']:.0f}",
            "-" if r["decode_tokens_per_s"] is None else f"{r['decode_tokens_per_s']:.1f}",
        ])
    return header, rows


def fidelity_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per plan and length: KL(dense‖plan), top-1 agreement, perplexity overall and per position bucket."""
    fid = results.get("fidelity") or []
    labels: list[str] = []
    for r in fid:
        for b in r["buckets"]:
            if b["label"] not in labels:
                labels.append(b["label"])
    header = ["plan", "length", "KL nats", "top-1 %", "ppl", "ppl dense"] + [f"ppl {lab}" for lab in labels]
    rows = []
    for r in fid:
        by = {b["label"]: b for b in r["buckets"]}
        o = r["overall"]
        rows.append([r["plan"], _len(r["length"]), f"{o['kl']:.4f}", f"{100 * o['top1']:.1f}", f"{o['ppl']:.2f}",
                     f"{o['ppl_dense']:.2f}"] + [f"{by[lab]['ppl']:.2f}" if lab in by else "-" for lab in labels])
    return header, rows


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths)))
    out = [line, "-" * len(line)]
    for r in rows:
        out.append("  ".join(str(x).ljust(w) if i == 0 else str(x).rjust(w) for i, (x, w) in enumerate(zip(r, widths))))
    return "\n".join(out)


def short_cells(results: dict[str, Any]) -> list[str]:
    """The accuracy cells (plan, task, length) holding fewer samples than the run asked for (``n/asked``): a run
    cut short, whose intervals are wider than the header's sample count suggests. Pooled rows are not cells."""
    asked = results.get("samples") or 0
    return [f"{a['plan']} {a['task']} {_len(a['length'])} ({a['n']}/{asked})" for a in results.get("accuracy", [])
            if not a.get("pooled") and a.get("n", asked) < asked]


def report_header(results: dict[str, Any]) -> list[str]:
    """The report's first line (model, device, seed, samples per cell, commit), and a warning naming the cells that
    hold fewer samples than that (``short_cells``)."""
    lines = [f"{results['model']} on {results['device']} — seed {results['seed']}, "
             f"{results['samples']} sample(s) per cell, commit {results.get('commit') or 'unknown'}"]
    short = short_cells(results)
    if short:
        more = f" and {len(short) - 6} more" if len(short) > 6 else ""
        lines.append(f"warning: {len(short)} cell(s) hold fewer samples than asked (a run cut short? the same command "
                     f"again adds the missing ones): {', '.join(short[:6])}{more}")
    return lines


def terminal_report(results: dict[str, Any]) -> str:
    parts = report_header(results)
    if _gen_tasks(results):
        parts += ["", "accuracy (%)", format_table(*accuracy_table(results))]
        kept = retention_table(results)
        if kept[1]:
            parts += ["", "kept of dense (samples dense answers fully that the plan answers too, Wilson 95%)",
                      format_table(*kept), "",
                      "accuracy / dense's on the same samples (Bonett-Price 95%; -lost/+gained samples)",
                      format_table(*ratio_table(results))]
        parts += ["", "memory and speed (mean over samples)", format_table(*performance_table(results))]
    if results.get("fidelity"):
        parts += ["", "fidelity to dense (Shakespeare)", format_table(*fidelity_table(results))]
    for n in results.get("notes", []):
        parts.append(f"note: {n}")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------ plots
def needle_heatmap(results: dict[str, Any], path: Path) -> Path | None:
    """Accuracy over length × depth, one panel per plan (one row of panels per depth task)."""
    rows = results.get("accuracy_by_depth") or []
    tasks = [t for t in DEPTH_TASKS if any(r["task"] == t for r in rows)]
    if not tasks:
        return None
    plans = _plans(results)
    lengths, depths = results["lengths"], sorted({r["depth"] for r in rows})
    cell = {(r["plan"], r["task"], r["length"], r["depth"]): r["score"] for r in rows}
    fig, axes = plt.subplots(len(tasks), len(plans), figsize=(2.2 + 2.0 * len(plans), 0.6 + 2.2 * len(tasks)),
                             squeeze=False, constrained_layout=True)
    im = None
    for i, t in enumerate(tasks):
        for j, p in enumerate(plans):
            ax = axes[i][j]
            grid = [[cell.get((p, t, L, d), math.nan) for L in lengths] for d in depths]
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
            for y, row in enumerate(grid):
                for x, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(x, y, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [_len(L) for L in lengths], fontsize=7)
            ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths], fontsize=7)
            ax.set_title(f"{p}\n{t}", fontsize=8)
            if j == 0:
                ax.set_ylabel("depth")
            if i == len(tasks) - 1:
                ax.set_xlabel("length (tokens)")
    if im is not None:
        fig.colorbar(im, ax=axes, shrink=0.8, label="accuracy")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def accuracy_vs_memory(results: dict[str, Any], path: Path) -> Path | None:
    """Mean accuracy over the generation tasks against KV memory held, one point per plan × length, with the Wilson
    95% interval of that mean over all its samples (every task's samples counted as trials of one proportion)."""
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    count: dict[tuple[str, int], int] = defaultdict(int)
    for a in results["accuracy"]:
        acc[(a["plan"], a["length"])].append(a["score"])
        count[(a["plan"], a["length"])] += int(a.get("n", 0))
    perf = {(r["plan"], r["length"]): r for r in results["performance"] if r["kv_bytes"] is not None}
    if not perf:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), constrained_layout=True)
    markers = "osD^vP*X"
    for k, p in enumerate(_plans(results)):
        pts = sorted((perf[(p, L)]["kv_bytes"] / 2**20, sum(acc[(p, L)]) / len(acc[(p, L)]), L)
                     for L in results["lengths"] if (p, L) in perf and acc.get((p, L)))
        if not pts:
            continue
        bars = [wilson(y, count[(p, L)]) for _, y, L in pts]
        ax.errorbar([x for x, _, _ in pts], [100 * y for _, y, _ in pts],
                    yerr=[[max(0.0, 100 * (y - lo)) for (_, y, _), (lo, _) in zip(pts, bars)],  # >= 0 past rounding
                          [max(0.0, 100 * (hi - y)) for (_, y, _), (_, hi) in zip(pts, bars)]],
                    marker=markers[k % len(markers)], capsize=3, label=p)
        for x, y, L in pts:
            ax.annotate(_len(L), (x, 100 * y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    plain = FuncFormatter(lambda x, _pos: f"{x:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.set_xlabel("KV cache held (MiB, log scale; labels: prompt length)")
    ax.set_ylabel("mean accuracy (%, Wilson 95%)")
    ax.set_ylim(-5, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{results['model']}: accuracy vs KV memory", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------ HTML
def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(x))}</td>" for x in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path | None, alt: str) -> str:
    if path is None:
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}
code,pre{background:#f6f6f6;padding:2px 4px}pre{padding:8px;white-space:pre-wrap}img{max-width:100%}
.meta td{text-align:left}"""


def html_report(results: dict[str, Any], heatmap: Path | None, memory_plot: Path | None) -> str:
    e = html.escape
    meta_rows = [
        ["model", f"{results['model']} ({results['model_source']})"],
        ["device", results["device"]], ["dtype", results["dtype"]],
        ["commit", results.get("commit") or "unknown"], ["seed", str(results["seed"])],
        ["samples per cell", str(results["samples"])], ["created", results["created"]],
    ]
    short = short_cells(results)
    if short:
        meta_rows.append(["cells with fewer samples (run cut short)", ", ".join(short)])
    plan_rows = []
    for p in results["plans"]:
        for L, summary in p["summary"].items():
            plan_rows.append([p["label"], _len(int(L)), p["digest"][L], summary, p["source"]])
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>headwise eval: {e(results['model'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>headwise eval: {e(results['model'])}</h1>",
        f"<p>Made by:</p><pre>{e(results.get('command') or '')}</pre>",
        "<table class='meta'>" + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in meta_rows)
        + "</table>",
        "<h2>Plans</h2>",
        _html_table(["plan", "length", "digest", "heads", "source"], plan_rows),
    ]
    if _gen_tasks(results):
        parts += [
            "<h2>Accuracy (%)</h2>",
            "<p>Greedy decoding; a score is the share of samples answered (contains) or the share of answers "
            "recalled (multi-answer tasks); see docs/eval.md.</p>",
            _html_table(*accuracy_table(results)),
            "<h2>Kept of dense</h2>",
            "<p>Paired sample by sample: of the samples dense answers fully, how many the plan answers fully too "
            "(Wilson 95% interval in %).</p>",
            _html_table(*retention_table(results)),
            "<h2>Accuracy as a share of dense's</h2>",
            "<p>On the same samples: the plan's accuracy over dense's, with the Bonett-Price 95% interval for a ratio "
            "of paired proportions, and the samples only dense answers (-) and only the plan answers (+).</p>",
            _html_table(*ratio_table(results)),
            "<h2>Memory and speed</h2>",
            "<p>KV bytes are what the cache really holds after prefill and decode (GenerationStats), "
            "averaged over samples.</p>",
            _html_table(*performance_table(results)),
        ]
    if heatmap is not None:
        parts += ["<h2>Needle in a haystack: length × depth</h2>", _img(heatmap, "needle heatmap")]
    if memory_plot is not None:
        parts += ["<h2>Accuracy vs KV memory</h2>", _img(memory_plot, "accuracy vs KV memory")]
    if results.get("fidelity"):
        parts += [
            "<h2>Fidelity to dense</h2>",
            "<p>Shakespeare from a seeded offset; KL(dense ‖ plan) in nats per token and top-1 agreement of the "
            "next-token distributions; perplexity per bucket of predicted-token position.</p>",
            _html_table(*fidelity_table(results)),
        ]
    if results.get("notes"):
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{e(n)}</li>" for n in results["notes"]] + ["</ul>"]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(results: dict[str, Any], out: Path) -> dict[str, Path]:
    """Write ``needle_heatmap.png``, ``accuracy_vs_kv.png`` and ``report.html`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heat = needle_heatmap(results, out / "needle_heatmap.png")
    mem = accuracy_vs_memory(results, out / "accuracy_vs_kv.png")
    page = out / "report.html"
    page.write_text(html_report(results, heat, mem), encoding="utf-8")
    files = {"html": page}
    if heat is not None:
        files["heatmap"] = heat
    if mem is not None:
        files["memory_plot"] = mem
    return files
