"""Decode benchmark (CUDA): dense SDPA vs FlexAttention vs headwise's paged sparse decode at Llama-3-8B shapes.

    PYTHONPATH=src python3 bench/decode.py [--seq-len 131072] [--batches 1,4] [--out bench/results]

Writes bench/results/decode_<date>.json (``headwise.bench.record``: command, commit, device, results), prints a table; the last stdout
line is the JSON document. What is measured: ``headwise.bench.decode`` (module docstring).
"""

from __future__ import annotations

import argparse
import json
import sys

from headwise.bench.decode import format_table, run_decode_bench
from headwise.bench.record import result_doc, result_path, write_result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=131072)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--budget", type=int, default=4096, help="page_topk token budget")
    ap.add_argument("--kv-len", type=int, default=32768, help="prompt length of the KV-bytes measurement")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-tune", action="store_true")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    results = run_decode_bench(
        seq_len=args.seq_len,
        batches=tuple(int(b) for b in args.batches.split(",")),
        budget=args.budget,
        flex=not args.no_flex,
        tune=not args.no_tune,
        kv_len=args.kv_len,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    doc = result_doc("PYTHONPATH=src python3 " + " ".join(sys.argv), results)
    write_result(doc, result_path(args.out, "decode"))
    print(format_table(results))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
