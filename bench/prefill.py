"""Prefill benchmark (CUDA): dense SDPA vs FlexAttention vs headwise's block-sparse kernel at Llama-3-8B shapes.

    PYTHONPATH=src python3 bench/prefill.py [--seq-len 131072] [--batches 1,4] [--out bench/results]

Writes bench/results/prefill_<date>.json (``_bs<N>`` appended for a block size other than 128) ({command, commit, device, results}), prints a table; the last
stdout line is the JSON document. What is measured: ``headwise.bench.prefill`` (module docstring).
"""

from __future__ import annotations

import argparse
import json
import sys

from headwise.bench.prefill import format_table, run_prefill_bench
from headwise.bench.record import result_doc, result_path, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--check-len", type=int, default=8192)
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = run_prefill_bench(
        seq_len=args.seq_len,
        batches=tuple(int(b) for b in args.batches.split(",")),
        block_size=args.block_size,
        check_len=args.check_len,
        tune=not args.no_tune,
        flex=not args.no_flex,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    doc = result_doc("PYTHONPATH=src python3 " + " ".join(sys.argv), results)
    write_result(doc, result_path(args.out, "prefill" if args.block_size == 128 else f"prefill_bs{args.block_size}"))
    print(format_table(results))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
