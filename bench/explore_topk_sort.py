"""Top-k page selection by Triton's bitonic ``tl.topk`` over packed (score key, page) int64 values, against the
shipped one-program selections (bisection, 128-bin histogram): exactness vs ``top_pages_reference`` and kernel
durations on the H100 (8 or 32 heads of 4096 / 8192 scores, k = 128 / 256). Exploration for issue 3's
page_topk batch-1 target; JSON to --out.

    HEADWISE_COMMIT=<sha> PYTHONPATH=src python3 bench/explore_topk_sort.py --out $OUT/explore_topk_sort.json
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch
import triton
import triton.language as tl

from headwise.bench.decode import kernel_durations
from headwise.kernels import sparse_decode as sd


@triton.jit
def _topk_sort_kernel(SCORES, OUT, n, k, stride_s, stride_o, BLOCK: tl.constexpr, KP: tl.constexpr,
                      ASCENDING: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    valid = offs < n
    key = sd._order_keys(tl.load(SCORES + row * stride_s + offs, mask=valid, other=float("-inf")), valid)
    packed = (key.to(tl.int64) << 32) | (BLOCK - 1 - offs).to(tl.int64)  # ties: the lower page ranks higher
    top = tl.topk(packed, KP)  # descending
    page = ((BLOCK - 1) - (top & 0xFFFFFFFF)).to(tl.int32)
    slot = tl.arange(0, KP)
    if ASCENDING:
        page = tl.sort(tl.where(slot < k, page, 2147483647))
    tl.store(OUT + row * stride_o + slot, page, mask=slot < k)


def topk_sort(scores: torch.Tensor, k: int, num_warps: int = 8, ascending: bool = True) -> torch.Tensor:
    B, H, P = scores.shape
    out = torch.empty(B, H, k, dtype=torch.int32, device=scores.device)
    s2 = scores.view(B * H, P)
    _topk_sort_kernel[(B * H,)](s2, out.view(B * H, k), P, k, s2.stride(0), k, BLOCK=triton.next_power_of_2(P),
                                KP=triton.next_power_of_2(k), ASCENDING=ascending, num_warps=num_warps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    res: dict[str, object] = {"commit": os.environ.get("HEADWISE_COMMIT", "?"),
                              "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu"}
    shapes = [(1, 8, 4096, 128), (4, 8, 4096, 128), (1, 8, 8192, 256)] if dev == "cuda" else [(1, 2, 300, 37)]
    for B, H, P, k in shapes:
        g = torch.Generator(device=dev).manual_seed(P)
        scores = (torch.randn(B, H, P, device=dev, generator=g) * 10 + 60).round(decimals=1)  # ties
        scores[..., 0] = scores[..., -1] = float("inf")
        scores[..., 5] = -0.0
        ref = sd.top_pages_reference(scores, k)
        r: dict[str, object] = {}
        for w in (4, 8, 16):
            got = topk_sort(scores, k, num_warps=w)
            r[f"exact_w{w}"] = bool(torch.equal(got.long(), ref))
            if dev == "cuda":
                r[f"sort_w{w}_us"] = kernel_durations(functools.partial(topk_sort, scores, k, num_warps=w))
                r[f"sort_unordered_w{w}_us"] = kernel_durations(functools.partial(topk_sort, scores, k, num_warps=w,
                                                                              ascending=False))
        if dev == "cuda":
            for bins in (0, 128):
                r[f"shipped_bins{bins}_us"] = kernel_durations(functools.partial(sd.select_pages, scores, k,
                                                                             use_kernel=True, bins=bins))
        res[f"B{B}_H{H}_P{P}_k{k}"] = r
        print(json.dumps({f"B{B}_H{H}_P{P}_k{k}": r}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
