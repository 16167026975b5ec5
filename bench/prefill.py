"""Prefill benchmark (CUDA): dense SDPA vs FlexAttention vs headwise's block-sparse kernel at Llama-3-8B shapes.

    PYTHONPATH=src python3 bench/prefill.py [--seq-len 131072] [--batches 1,4] [--out bench/results]

Writes bench/results/prefill_<date>.json (``_bs<N>`` appended for a block size other than 128) ({command, commit, device, results}), prints a table; the last
stdout line is the JSON document. What is measured: ``headwise.bench.prefill`` (module docstring).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from headwise.bench.prefill import format_table, run_prefill_bench


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
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = os.environ.get("HEADWISE_COMMIT", "unknown")
    doc = {
        "command": "PYTHONPATH=src python3 " + " ".join(sys.argv),
        "commit": commit,
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "results": results,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = "" if args.block_size == 128 else f"_bs{args.block_size}"
    path = out / f"prefill_{datetime.date.today().isoformat()}{tag}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(format_table(results))
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
