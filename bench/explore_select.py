"""What a one-program top-k selection costs on an H100: micro-kernels of its block-wide steps (load, reductions,
histogram, cumsum) over rows of page scores, timed by the PyTorch profiler (kernel durations). Exploration for
issue 3's page_topk batch-1 target.

    PYTHONPATH=src python3 bench/explore_select.py --out $OUT/explore_select.json
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl

from headwise.bench.decode import kernel_durations
from headwise.kernels import sparse_decode as sd


@triton.jit
def _floor_kernel(S, Out, n, BLOCK: tl.constexpr, MODE: tl.constexpr, REPS: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    x = tl.load(S + row * n + offs, mask=offs < n, other=float("-inf"))
    key = x.to(tl.int32, bitcast=True)
    acc = tl.zeros([], tl.int32)
    if MODE == 1:  # REPS dependent block-wide sums
        t = tl.full([], 0, tl.int32)
        for _ in tl.static_range(REPS):
            c = tl.sum((key >= t).to(tl.int32), 0)
            t = t + c
        acc = t
    if MODE == 2:  # one histogram of 128 bins
        h = tl.histogram(key & 127, 128)
        acc = tl.sum(h * tl.arange(0, 128), 0)
    if MODE == 3:  # one cumsum
        cs = tl.cumsum((key > 0).to(tl.int32), 0)
        acc = tl.max(cs, 0)
    if MODE == 4:  # REPS dependent [BLOCK, 8]-way counts
        t = tl.full([], 0, tl.int32)
        ways = tl.arange(0, 8)
        for _ in tl.static_range(REPS):
            c = tl.sum((key[:, None] >= (t + ways)[None, :]).to(tl.int32), 0)
            t = t + tl.max(c, 0)
        acc = t
    tl.store(Out + row * 128 + tl.arange(0, 128), acc + tl.arange(0, 128))


def kernel_us(fn, reps: int = 30) -> float:
    """GPU time (µs) of the one kernel ``fn`` launches (median over ``reps``)."""
    (us,) = kernel_durations(fn, reps).values()
    return us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    res: dict[str, float] = {}
    out = torch.empty(8, 128, device="cuda", dtype=torch.int32)
    for n in (1024, 2048, 4096):
        scores = torch.randn(1, 8, n, device="cuda") * 10 + 60
        scores[:, :, 0] = float("inf")
        scores[:, :, -1] = float("inf")
        for w in (4, 8):
            for mode, reps in ((0, 1), (1, 1), (1, 10), (1, 20), (2, 1), (3, 1), (4, 1), (4, 5)):
                def f(mode=mode, reps=reps, w=w, n=n, scores=scores):
                    _floor_kernel[(8,)](scores, out, n, BLOCK=n, MODE=mode, REPS=reps, num_warps=w)
                res[f"n{n}_w{w}_mode{mode}_reps{reps}"] = kernel_us(f)
            for bins in (0, 128):
                res[f"n{n}_w{w}_topk_bins{bins}"] = kernel_us(
                    lambda bins=bins, w=w, scores=scores, n=n: sd.select_pages(scores, 128, use_kernel=True, bins=bins,
                                                                                num_warps=w))
        print({kk: vv for kk, vv in res.items() if kk.startswith(f"n{n}_")}, flush=True)
    with open(args.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
