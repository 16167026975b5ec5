"""One layer's batched decode over the page pool with rows of different lengths, split settings swept (CUDA).

In issue 13's mix the plan's decode-only steps read their bytes at 0.76 of the copy bandwidth (p50) where dense's
read at 0.89 (run 18, bench/results/serve_offered_l32_mix_c16384_kv56_*_h100_run18_2026-12-06.json). A likely
cause besides the host's work: the plan's full group has 2 KV heads to dense's 8, so ``batch_decode`` makes fewer
(row, head) programs, and with rows of 128K beside rows of 32K the default split count (``programs_per_sm=2``:
enough programs to fill the GPU twice, each split a fixed share of the longest row) may leave a few long programs
running while most SMs are idle. This script times one layer's step of a group as a 56 GB pool holds it with both
lengths (``--plan-rows``: the full heads' rows; ``--dense-rows``: dense's), for each ``programs_per_sm`` and
``tokens_per_iter`` given, replayed from a CUDA graph (``bench.timing.Timer``, L2 flushed by a read), and reports
the KV bytes each reads per second against a 1 GiB device copy timed in the same run; each setting's output is
checked against the fp32 reference (``batch_decode_reference``).

    PYTHONPATH=src python3 bench/mixed_batch_decode.py OUT.json [--plan-rows 10x131072,12x32768]
        [--dense-rows 3x131072,1x32768] [--programs-per-sm 1,2,4,8,16] [--tokens-per-iter 64,128]
        (--plan-rows 51x32768 --dense-rows 13x32768: the pool full of 32K rows, the mix's peak)
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/mixed_batch_decode.py /tmp/x.json --plan-rows 2x200,3x70
        --dense-rows 1x200,2x70 --programs-per-sm 1,4 --tokens-per-iter 64 --page-size 16  (a CPU dry run: eager
        wall time of the interpreter, no rates)
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Any

import torch

from headwise.bench.record import result_doc, write_result
from headwise.bench.timing import Timer

GROUP, D = 4, 128  # Llama-3-8B: 32 query heads over 8 KV heads, head_dim 128


def parse_rows(spec: str) -> list[int]:
    """``13x131072,38x32768`` -> 13 lengths of 131072 then 38 of 32768."""
    out: list[int] = []
    for part in spec.split(","):
        count, _, length = part.partition("x")
        if not count.isdigit() or not length.isdigit() or int(count) < 1 or int(length) < 1:
            raise SystemExit(f"rows must look like 13x131072,38x32768 (counts x lengths >= 1), not {spec!r}")
        out += [int(length)] * int(count)
    return out


def group_inputs(lengths: list[int], heads: int, page_size: int, device: str, dtype: torch.dtype,
                 seed: int) -> dict[str, Any]:
    """Random q and pages for ``heads`` KV heads of rows of ``lengths``, each row's pages shuffled over one pool, its
    table padded to the longest row (as the engine's padded buffers are)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_max = -(-max(lengths) // page_size)
    counts = [-(-n // page_size) for n in lengths]
    total = heads * sum(counts)
    kv = torch.randn(total, 2, page_size, D, generator=g, device=device, dtype=dtype)
    order = torch.randperm(total, generator=g, device=device).to(torch.int32)
    table = torch.zeros(len(lengths), heads, n_max, dtype=torch.int32, device=device)
    at = 0
    for r, c in enumerate(counts):
        table[r, :, :c] = order[at:at + heads * c].view(heads, c)
        at += heads * c
    q = torch.randn(len(lengths), heads * GROUP, D, generator=g, device=device, dtype=dtype)
    return {"q": q, "keys": kv[:, 0], "values": kv[:, 1], "table": table,
            "lengths": torch.tensor(lengths, dtype=torch.int32, device=device), "max_len": max(lengths),
            "kv_bytes": heads * sum(lengths) * 2 * D * kv.element_size()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--plan-rows", default="10x131072,12x32768",
                    help="the plan's full group (2 KV heads): counts x lengths (default: 56 GB of pool, 128K and 32K rows)")
    ap.add_argument("--dense-rows", default="3x131072,1x32768", help="dense (8 KV heads), likewise")
    ap.add_argument("--programs-per-sm", default="1,2,4,8,16")
    ap.add_argument("--tokens-per-iter", default="64,128")
    ap.add_argument("--page-size", type=int, default=16)
    args = ap.parse_args(argv)
    from headwise.kernels.batch_decode import batch_decode
    from headwise.kernels.decode_reference import batch_decode_reference

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    timer = Timer() if cuda else None
    rows: list[dict[str, Any]] = []
    copy_ms = None
    if timer is not None:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copy_ms = timer.graph(lambda: dst.copy_(src))
        del src, dst
    copy_gb_s = None if copy_ms is None else round(2 * (1 << 30) / copy_ms / 1e6, 1)  # read + write
    for name, spec, heads in (("plan_full_heads", args.plan_rows, 2), ("dense", args.dense_rows, 8)):
        lengths = parse_rows(spec)
        g = group_inputs(lengths, heads, args.page_size, device, dtype, seed=len(rows))
        want = batch_decode_reference(g["q"].float(), g["keys"].float(), g["values"].float(), g["table"], g["lengths"],
                                      args.page_size)
        for tpi in (int(x) for x in args.tokens_per_iter.split(",")):
            for pps in (int(x) for x in args.programs_per_sm.split(",")):
                out = torch.empty_like(g["q"])

                step = functools.partial(batch_decode, g["q"], g["keys"], g["values"], g["table"], g["lengths"],
                                         g["max_len"], args.page_size, out=out, tokens_per_iter=tpi,
                                         programs_per_sm=pps)

                got = step().float()
                row: dict[str, Any] = {"group": name, "rows": spec, "kv_heads": heads, "tokens_per_iter": tpi,
                                       "programs_per_sm": pps, "kv_gb": round(g["kv_bytes"] / 1e9, 4),
                                       "max_abs_err_vs_fp32_reference": float(f"{(got - want).abs().max().item():.3g}")}
                if timer is not None:
                    row["graph_ms"] = round(timer.graph(step), 4)
                    row["read_gb_per_s"] = round(g["kv_bytes"] / row["graph_ms"] / 1e6, 1)
                    row["read_of_copy"] = round(row["read_gb_per_s"] / copy_gb_s, 3) if copy_gb_s else None
                else:
                    row["wall_ms"] = round(Timer.wall(step, reps=2), 2)
                rows.append(row)
                print(row, flush=True)
        del g
    command = " ".join(["python", "bench/mixed_batch_decode.py", *(sys.argv[1:] if argv is None else argv)])
    write_result(result_doc(command, {"copy_gb_per_s": copy_gb_s, "rows": rows}), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
