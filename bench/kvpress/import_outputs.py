"""Merge kvpress outputs (``run_presses.py``) into a ``headwise eval`` results directory (headwise's environment).

    python bench/kvpress/import_outputs.py eval-out/smollm2-135m kvpress-outputs.jsonl --prompts prompts.jsonl
    headwise eval --report-only eval-out/smollm2-135m      # the report, kvpress rows beside headwise's plans

Scores every output with headwise's rules (``headwise.eval.scoring``) and adds one plan per kvpress label
(``kvpress:snapkv@0.5``) to ``results.json``: accuracy with Wilson intervals, the paired "kept of dense" table and the
memory table (KV counted from the token slots kvpress's cache held after each prompt). Re-run this after any
``headwise eval`` run that rewrites the same ``results.json``. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from headwise.errors import HeadwiseError
from headwise.eval.external import merge_outputs, read_jsonl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("eval_dir", type=Path, help="a `headwise eval --out` directory holding results.json")
    ap.add_argument("outputs", type=Path, nargs="+", help="run_presses.py output files (JSON lines)")
    ap.add_argument("--prompts", type=Path, default=None, help="the --export-prompts file (answers and scoring rule)")
    ap.add_argument("--out", type=Path, default=None, help="write results.json here instead (default: in place)")
    args = ap.parse_args(argv)
    try:
        path = args.eval_dir / "results.json"
        if not path.is_file():
            raise HeadwiseError(f"{path} does not exist: run `headwise eval ... --out {args.eval_dir}` first")
        results = json.loads(path.read_text())
        outputs = [o for f in args.outputs for o in read_jsonl(f, "run_presses.py output")]
        prompts = read_jsonl(args.prompts, "exported prompts") if args.prompts else None
        merged = merge_outputs(results, outputs, prompts)
    except HeadwiseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = (args.out or args.eval_dir) / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(out)
    added = sorted({o["label"] for o in outputs})
    acc = [a for a in merged["accuracy"] if a["plan"] in added]
    print(json.dumps({"results": str(out), "added": added, "accuracy": acc}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
