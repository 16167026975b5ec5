"""Timing: a quantized head's store work per prompt chunk, the fused KIVI kernels against the PyTorch path.

A ``quantized`` head's prefill chunk dequantizes what its store holds into the buffer it attends
(``QuantizedStore.view``), then appends the chunk, quantizing the groups that leave the residual (``append``). On a
GPU both go through ``kernels/kv_quant_triton.py`` (one launch per tensor); with ``kv_quant.use_fused_kernels(False)``
they take the PyTorch functions of ``kernels/kv_quant.py``. This times one chunk's ``view`` + ``append`` at several
held lengths and head shapes, both ways, in one process (CUDA events, the median of ``--reps`` after warm-up), and
checks that both ways hold the same codes. Attention is left out: it is the same either way.

    python bench/experiments/kv_quant_fused_time.py OUT.json                  # on a GPU
    python bench/experiments/kv_quant_fused_time.py OUT.json --device cpu --held 256 --reps 2   # a smoke run
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from headwise.bench.record import result_doc, write_result
from headwise.kernels import kv_quant
from headwise.policies import Quantized

SHAPES = {"gemma3-270m (1 KV head, d 256)": (1, 256), "llama-3-8b (8 KV heads, d 128)": (8, 128)}
POLICIES = {"int4": Quantized(bits=4), "k8v4": Quantized(bits=4, key_bits=8), "int8": Quantized(bits=8)}


def _clock(device: torch.device) -> Any:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def chunk_ms(policy: Quantized, heads: int, dim: int, held: int, chunk: int, fused: bool, reps: int,
             device: torch.device) -> tuple[float, torch.Tensor]:
    """Median milliseconds of one chunk's ``view`` + ``append`` on a store holding ``held`` tokens, and its codes."""
    kv_quant.use_fused_kernels(fused)
    g = torch.Generator().manual_seed(held + heads)
    prompt = torch.randn(2, 1, heads, held, dim, generator=g).to(device, torch.bfloat16)
    new = torch.randn(2, 1, heads, chunk, dim, generator=g).to(device, torch.bfloat16)
    times = []
    store = None
    for _ in range(reps + 2):  # two warm-up runs (the first compiles the kernels)
        store = policy.make_store(1, heads, dim, device, torch.bfloat16)
        store.append(prompt[0], prompt[1])
        t0 = _clock(device)
        store.view(new[0], new[1])
        store.append(new[0], new[1])
        times.append((_clock(device) - t0) * 1e3)
    assert store is not None
    return statistics.median(times[2:]), store.quantized().k_codes[:, :, : store.n_quant - store.first].cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the result JSON to write")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--held", default="2048,8192,32768", help="tokens the store holds before the chunk")
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    device = torch.device(args.device)
    rows = []
    for shape, (heads, dim) in SHAPES.items():
        for name, policy in POLICIES.items():
            for held in (int(x) for x in args.held.split(",")):
                fused, codes_f = chunk_ms(policy, heads, dim, held, args.chunk, True, args.reps, device)
                plain, codes_p = chunk_ms(policy, heads, dim, held, args.chunk, False, args.reps, device)
                rows.append({"shape": shape, "policy": name, "held": held, "chunk": args.chunk,
                             "fused_ms": round(fused, 4), "pytorch_ms": round(plain, 4),
                             "speedup": round(plain / fused, 3), "same_codes": bool(torch.equal(codes_f, codes_p))})
                print(f"{shape:32s} {name:5s} held {held:6d}: fused {fused:8.3f} ms, PyTorch {plain:8.3f} ms "
                      f"({plain / fused:.2f}x), same codes: {rows[-1]['same_codes']}")
    kv_quant.use_fused_kernels(True)
    note = ("one chunk's QuantizedStore.view + append (dequantize what is held into the chunk's attention buffer, "
            "quantize the groups leaving the residual), bf16, batch 1; attention not included")
    if device.type != "cuda":
        note += "; on the CPU both columns are the PyTorch path (the fused kernels run on a GPU only): a smoke run"
    write_result(result_doc("python " + shlex.join(sys.argv), {"note": note, "rows": rows}, device), args.out)


if __name__ == "__main__":
    main()
