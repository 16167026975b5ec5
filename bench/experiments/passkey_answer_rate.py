"""Answering and retrieving, apart: a passkey cell's accuracy as (how often the answer starts with digits) x (how
often those digits are the key).

SmolLM2's 2K passkey is decided at the first answer token (``passkey_first_token.py``): after "The pass key is" the
model writes the digits or " the pass key. The ...". Every answer is one of the two, so a cell's accuracy mixes two
things a reader wants apart: whether the model answers (a format choice within a logit, which any change of numerics
moves) and whether what it answers is the key (retrieval). This splits each plan's rows of an evaluation's results
(``headwise eval``'s results.json or a bench/results file with ``rows``; ``--samples`` files of ``samples*.jsonl``
too, and kvpress's outputs from ``bench/kvpress/run_presses.py``, scored against ``--prompts``, the exported prompts)
by whether the output starts with a digit, with Wilson 95% intervals.

    python bench/experiments/passkey_answer_rate.py OUT.json RESULTS.json [RESULTS.json ...] [--length 2048] \
        [--prompts prompts.jsonl]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from headwise.bench.record import result_doc, write_result
from headwise.errors import InputError
from headwise.eval.external import read_jsonl, sample_key
from headwise.eval.scoring import score, wilson

ANSWERS = re.compile(r"\s*\d")
"""An output that answers: its first non-space character is a digit (the evaluation's passkeys are digits)."""


def rows_of(path: Path, prompts: dict[tuple[Any, ...], dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The generation rows of a results document, or of a ``samples*.jsonl`` file (one row a line); an external
    output line (``label``, no ``score``) is scored against its exported prompt in ``prompts``."""
    if path.suffix == ".jsonl":
        rows = read_jsonl(path, "samples")
        for r in rows:
            if "score" not in r and "label" in r:
                src = (prompts or {}).get(sample_key(r))
                if src is None:
                    raise InputError(f"{path}: an external output with no prompt to score it against (--prompts)")
                r |= {"plan": r["label"], "score": score(src["scoring"], r["output"], src["answers"])}
        return rows
    doc = json.loads(path.read_text())
    rows = doc.get("rows") if isinstance(doc, dict) else None
    if not isinstance(rows, list):
        raise InputError(f"{path}: no 'rows' (not a headwise eval results file)")
    return rows


def split(rows: list[dict[str, Any]], length: int) -> dict[str, dict[str, Any]]:
    """Per plan label, over its passkey rows at ``length``: n, answered (digits first), right, right among the
    answered and right among the others, with Wilson intervals of the answer rate and of the right share of answers."""
    by: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r.get("task") == "passkey" and r.get("length") == length and "output" in r:
            by[str(r["plan"])].append(r)
    out = {}
    for plan, rs in by.items():
        answered = [r for r in rs if ANSWERS.match(r["output"])]
        right = sum(float(r["score"]) for r in rs)
        right_answered = sum(float(r["score"]) for r in answered)
        n, a = len(rs), len(answered)
        out[plan] = {
            "n": n, "right": right, "answered": a, "right_when_answered": right_answered,
            "right_otherwise": right - right_answered,
            "answer_rate": round(a / n, 4), "answer_rate_wilson": [round(x, 4) for x in wilson(a / n, n)],
            "right_share_of_answers": round(right_answered / a, 4) if a else None,
            "right_share_of_answers_wilson": [round(x, 4) for x in wilson(right_answered / a, a)] if a else None,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("results", type=Path, nargs="+")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--prompts", type=Path, help="`headwise eval --export-prompts` file: scores external outputs")
    args = ap.parse_args(argv)
    cmd = "python bench/experiments/passkey_answer_rate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table: dict[str, Any] = {}
    try:
        prompts = None
        if args.prompts:
            prompts = {sample_key(p): p for p in read_jsonl(args.prompts, "exported prompts")}
        for path in args.results:  # keyed by file name; a name given twice is told apart by its folder
            name = path.name if path.name not in table else f"{path.parent.name}/{path.name}"
            table[name] = split(rows_of(path, prompts), args.length)
    except (OSError, json.JSONDecodeError, InputError) as exc:
        print(f"passkey_answer_rate: {exc}", file=sys.stderr)
        return 2
    for name, plans in table.items():
        for plan, c in plans.items():
            share = "-" if c["right_share_of_answers"] is None else f"{c['right_share_of_answers']:.2f}"
            print(f"{name[:58]:58} {plan[:30]:30} n={c['n']:4} answered={c['answered']:4} right={c['right']:5g} "
                  f"right/answered={share}")
    write_result(result_doc(cmd, {"length": args.length, "by_file": table}, device="cpu"), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
