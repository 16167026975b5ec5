"""``headwise bench``: rerun the GPU speed measurements of the README and print the table.

Runs the prefill benchmark (block-sparse patterns vs dense SDPA vs FlexAttention), the decode benchmark
(heterogeneous cache and page selection vs dense SDPA) and, asked for, the batched decode over a KV page pool
(``bench/batch_decode.py``) at Llama-3-8B attention shapes, in one process, and writes
one JSON document (command, commit, device, results) to ``bench/results/`` unless ``--no-save``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any

from headwise.bench.record import result_doc, result_path, write_result
from headwise.errors import HeadwiseError


def run(args: argparse.Namespace) -> int:
    import torch

    if args.what == "serve":
        return run_serve(args)
    if args.tp > 1:
        raise HeadwiseError("--tp is for 'headwise bench serve'; the kernel benchmarks run on one GPU "
                            "(bench/tp_decode.py times decode steps over several)")
    if not torch.cuda.is_available():
        raise HeadwiseError("headwise bench measures GPU kernels and needs a CUDA GPU; none is visible here")
    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = sorted(set(which) - {"prefill", "decode", "batch_decode"})
    if unknown:
        raise HeadwiseError(f"unknown benchmark(s) {', '.join(unknown)}; choose from prefill, decode, batch_decode")
    batches = tuple(int(b) for b in args.batch.split(","))
    doc = result_doc("headwise bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]), {})
    path = result_path(args.out_dir, "bench")

    def save() -> None:  # after each part, so a run cut short keeps what it measured
        if not args.no_save:
            write_result(doc, path)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if "prefill" in which:
        from headwise.bench import prefill

        res = prefill.run_prefill_bench(seq_len=args.prefill_len, batches=batches, block_size=args.block_size,
                                        log=log)
        doc["results"]["prefill"] = res
        save()
        print(prefill.format_table(res), flush=True)
    if "decode" in which:
        from headwise.bench import decode

        res = decode.run_decode_bench(seq_len=args.decode_len, batches=batches, page_size=args.page_size,
                                      budget=args.budget, log=log)
        doc["results"]["decode"] = res
        save()
        print(decode.format_table(res), flush=True)
    if "batch_decode" in which:
        from headwise.bench import batch_decode

        rows = batch_decode.run_batch_decode_bench(seq_len=args.decode_len, batches=batches,
                                                   page_size=args.pool_page_size, log=log)
        doc["results"]["batch_decode"] = rows
        save()
        print(batch_decode.format_table(rows), flush=True)
    if not args.no_save:
        print(f"wrote {path}")
    print(json.dumps(doc, default=str))
    return 0


def run_serve(args: argparse.Namespace) -> int:
    """``headwise bench serve``: offered load against the engine in-process and over HTTP (``bench/serve.py``)."""
    from pathlib import Path

    from headwise.bench import serve

    results = serve.run(args)
    if results is None:  # another tensor-parallel rank: rank 0 records
        return 0
    doc = result_doc("headwise bench " + " ".join(shlex.quote(a) for a in sys.argv[2:]), results)
    if not args.no_save:
        plan = "dense" if args.plan == "dense" else Path(args.plan).stem
        print(f"wrote {write_result(doc, result_path(args.out_dir, f'serve_{plan}'))}")
    print(json.dumps(doc, default=str))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("bench", help="GPU speed: sparse prefill and decode vs dense SDPA and FlexAttention; "
                                            "'bench serve': offered load against the serving engine")
    p.add_argument("what", nargs="?", choices=("kernels", "serve"), default="kernels",
                   help="kernels (default): the GPU kernel benchmarks; serve: the serving benchmark")
    p.add_argument("--which", default="prefill,decode",
                   help="prefill,decode,batch_decode (default prefill,decode; batch_decode: a layer's decode step of "
                        "a batch over a KV page pool, bench/batch_decode.py)")
    p.add_argument("--batch", default="1,4", help="batch sizes (default 1,4)")
    p.add_argument("--prefill-len", type=int, default=131072)
    p.add_argument("--decode-len", type=int, default=131072)
    p.add_argument("--block-size", type=int, default=64, help="prefill block size in tokens (default 64)")
    p.add_argument("--page-size", type=int, default=32, help="page_topk page size in tokens (default 32)")
    p.add_argument("--budget", type=int, default=4096, help="page_topk token budget (default 4096)")
    p.add_argument("--pool-page-size", type=int, default=16, help="batch_decode: KV pool page size (default 16)")
    p.add_argument("--out-dir", default="bench/results")
    p.add_argument("--no-save", action="store_true")
    from headwise.bench.serve import add_arguments
    from headwise.tp import add_tp_args

    add_tp_args(p)

    add_arguments(p)
    p.set_defaults(func=run)
