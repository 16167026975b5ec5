"""PyTorch SDPA backends on decode shapes (H100): what a new cache length costs each backend in eager decode
(one token more per call, as an eager decode loop calls it), and each backend's CUDA-graph time at a fixed
128K length (the dense baseline of ``headwise bench --which decode``). Explains the eager-decode cost of the
reference path (bench/gpu_engine_decode.py: 46.5 ms per SDPA call with a growing length against 0.089 ms at a
fixed one, torch 2.11) and checks that the benchmark's dense baseline is the fastest backend. JSON to --out.

    HEADWISE_COMMIT=<sha> PYTHONPATH=src python3 bench/sdpa_backends.py --out $OUT/sdpa_backends.json
"""

from __future__ import annotations

import argparse
import functools
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from headwise.bench.decode import HKV, HQ, D
from headwise.bench.record import result_doc, write_result
from headwise.bench.timing import Timer

BACKENDS = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def _call(q, k, v, n, backend, packed):
    kk, vv = k[:, :, :n], v[:, :, :n]
    if backend is None:
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=not packed)
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=not packed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--calls", type=int, default=12)
    args = ap.parse_args()
    res: dict[str, object] = {"cudnn": torch.backends.cudnn.version()}
    g = torch.Generator(device="cuda").manual_seed(0)
    S = 131072
    k = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(1, HKV, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    qp = q.view(1, HKV, HQ // HKV, D)
    timer = Timer("read")
    for form, qq, packed in (("gqa", q, False), ("packed", qp, True)):
        for name, backend in BACKENDS.items():
            key = f"{form}_{name}"
            try:
                n = [args.context]
                _call(qq, k, v, n[0], backend, packed)

                def grow(qq=qq, backend=backend, packed=packed, n=n) -> None:  # a new length each call, as eager decode
                    n[0] += 1
                    _call(qq, k, v, n[0], backend, packed)

                res[f"{key}_growing_ms"] = round(Timer.wall(grow, args.calls), 4)
                res[f"{key}_same_ms"] = round(
                    Timer.wall(functools.partial(_call, qq, k, v, n[0], backend, packed), args.calls), 4)
                res[f"{key}_graph_128k_us"] = round(
                    1e3 * timer.graph(functools.partial(_call, qq, k, v, S, backend, packed)), 2)
            except Exception as exc:  # a backend that does not take these shapes is a result too
                res[f"{key}_error"] = repr(exc)[:200]
            print(key, {kk: vv for kk, vv in res.items() if kk.startswith(key)}, flush=True)
    write_result(result_doc("PYTHONPATH=src python3 bench/sdpa_backends.py " + " ".join(sys.argv[1:]), res), args.out)


if __name__ == "__main__":
    main()
