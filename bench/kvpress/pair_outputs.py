"""A press's outputs (``run_presses.py``) paired, prompt by prompt, with plans' rows in saved evaluations.

    python bench/kvpress/pair_outputs.py OUT.json knorm-outputs.jsonl --prompts prompts.jsonl \\
        --against bench/results/RUN.json:dense bench/results/RUN.json:smollm2-135m [--note TEXT]

Each output is scored against its exported prompt (``headwise eval --export-prompts``) with headwise's rules; each
``FILE:LABEL`` names a ``headwise eval`` results file (its ``rows``) and a plan label in it. For every pair of (press
label, FILE:LABEL) on the prompts both ran: the two accuracies with Wilson 95% intervals, the press's accuracy as a
share of the plan's (Bonett-Price 95% interval, exact McNemar p: ``scoring.paired_ratio``) and the prompts only one of
them answers. It runs no model: the outputs may come from another machine than the rows (a press run on the CPU beside
a GPU run's fp32 rows); the document says where each came from, and its device is the machine that paired them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from headwise.bench.record import result_doc, write_result
from headwise.errors import InputError
from headwise.eval.external import read_jsonl, sample_key
from headwise.eval.scoring import paired_ratio, score, wilson


def press_name(o: dict[str, Any]) -> str:
    """An output's press: its label and, where it has one, its compression ratio (two runs of one press at two
    memories share a label)."""
    ratio = (o.get("method") or {}).get("compression_ratio")
    return str(o["label"]) if ratio is None else f"{o['label']} (compression_ratio {ratio})"


def scored_outputs(outputs: list[dict[str, Any]], prompts: list[dict[str, Any]]) -> dict[str, dict[tuple, float]]:
    """Per press (``press_name``): sample key -> score of its output against the exported prompt's answers."""
    by_key = {sample_key(p): p for p in prompts}
    out: dict[str, dict[tuple, float]] = {}
    for o in outputs:
        p = by_key.get(sample_key(o))
        if p is None:
            raise InputError(f"an output of {o.get('label')!r} ({sample_key(o)}) has no exported prompt to score it")
        mine = out.setdefault(press_name(o), {})
        if sample_key(o) in mine:
            raise InputError(f"{press_name(o)} has two outputs for {sample_key(o)}: one file given twice?")
        mine[sample_key(o)] = score(p["scoring"], o["output"], p["answers"])
    return out


def plan_rows(doc: dict[str, Any], label: str, where: str) -> dict[tuple, float]:
    """Sample key -> score of ``label``'s generation rows in a results document."""
    rows = doc.get("rows")
    if not isinstance(rows, list):
        raise InputError(f"{where}: no 'rows' (not a headwise eval results file)")
    found = {sample_key(r): float(r["score"]) for r in rows if r.get("plan") == label and "output" in r}
    if not found:
        labels = sorted({str(r.get("plan")) for r in rows})
        raise InputError(f"{where}: no rows of plan {label!r} (its plans: {', '.join(labels)})")
    return found


def _acc(scores: list[float]) -> dict[str, Any]:
    n, c = len(scores), sum(scores)
    return {"n": n, "correct": c, "accuracy": round(c / n, 4) if n else None,
            "ci95": [round(x, 4) for x in wilson(c / n, n)] if n else None}


def pair(press: dict[tuple, float], plan: dict[tuple, float]) -> dict[str, Any]:
    """The press against one plan on the prompts both ran (a prompt answered fully, score 1, counts as right, as
    ``report.retention`` counts it)."""
    keys = sorted(set(press) & set(plan), key=repr)
    p = [press[k] >= 1.0 for k in keys]
    q = [plan[k] >= 1.0 for k in keys]
    both = sum(a and b for a, b in zip(p, q, strict=True))
    only_press = sum(a and not b for a, b in zip(p, q, strict=True))
    only_plan = sum(b and not a for a, b in zip(p, q, strict=True))
    neither = len(keys) - both - only_press - only_plan
    return {"pairs": len(keys), "press": _acc([float(x) for x in p]), "plan": _acc([float(x) for x in q]),
            "press_over_plan": paired_ratio(both, only_press, only_plan, neither)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("outputs", type=Path, nargs="+", help="run_presses.py output files (JSON lines)")
    ap.add_argument("--prompts", type=Path, required=True, help="the --export-prompts file the press ran")
    ap.add_argument("--against", nargs="+", required=True, metavar="FILE:LABEL")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)
    cmd = "python bench/kvpress/pair_outputs.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        outputs = [o for f in args.outputs for o in read_jsonl(f, "run_presses.py output")]
        presses = scored_outputs(outputs, read_jsonl(args.prompts, "exported prompts"))
        versions = sorted({str(o.get("method_version")) for o in outputs})
        table: dict[str, Any] = {}
        docs: dict[str, dict[str, Any]] = {}  # a file named for several labels is read once
        for spec in args.against:
            # a label may hold a colon (kvpress:knorm@equal): split after the file's .json where there is one
            path, sep, label = spec.partition(".json:") if ".json:" in spec else spec.rpartition(":")
            path += ".json" if sep == ".json:" else ""
            if not sep or not path or not label:
                raise InputError(f"--against {spec!r}: expected FILE:LABEL")
            if path not in docs:
                docs[path] = json.loads(Path(path).read_text())
            doc = docs[path]
            rows = plan_rows(doc, label, path)
            for name, scores in presses.items():
                cell = pair(scores, rows)
                if not cell["pairs"]:
                    raise InputError(f"{spec}: no prompt in common with the outputs of {name!r}")
                table.setdefault(name, {})[spec] = cell | {"plan_device": doc.get("device"),
                                                           "plan_dtype": doc.get("dtype")}
    except (OSError, json.JSONDecodeError, KeyError, InputError) as exc:
        print(f"pair_outputs: {exc}", file=sys.stderr)
        return 2
    for name, cells in table.items():
        for spec, c in cells.items():
            r = c["press_over_plan"]
            print(f"{name} {c['press']['accuracy']:.3f} vs {spec.rsplit('/', 1)[-1]} {c['plan']['accuracy']:.3f} "
                  f"(n={c['pairs']}): {r['ratio']} {r['ratio_ci95']} -{r['only_ref']}/+{r['only_plan']}")
    results = {"presses": {n: _acc(list(s.values())) for n, s in presses.items()}, "press_versions": versions,
               "paired": table, "note": args.note}
    write_result(result_doc(cmd, results, device="cpu"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
