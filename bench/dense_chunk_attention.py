"""What one prompt chunk of a dense head costs in the engine's prefill, against the flash kernel (issue 13's dense
baseline). Run before ``bench/offered_load.sh``'s dense run, to know how strong that baseline is.

The engine prefills a prompt chunk by chunk; a ``full`` head attends a chunk of ``L`` queries over the ``S`` keys
before and in it with ``policies.base.causal_attention``. As SDPA with a boolean ``[L, S]`` mask and ``enable_gqa``
(32 query / 8 KV heads), flash takes no mask and, in torch 2.11, the efficient kernel no GQA
(bench/results/sdpa_backends_2026-11-23.json), so SDPA falls back to its math path; ``causal_attention`` now passes
a bottom-right ``CausalBias`` instead on GPUs. This times, at Llama-3-8B attention shapes (one layer, bf16), for each
key length:

- ``masked_default_ms``: SDPA with the boolean mask, backend left to SDPA (what ``causal_attention`` ran on GPUs
  before it passed a ``CausalBias``);
- ``engine_ms``: ``causal_attention`` as the engine calls it now (bf16 on CUDA: SDPA with
  ``torch.nn.attention.bias.causal_lower_right(L, S)``, the same pattern, which SDPA can hand to flash), and its
  largest difference from the masked call's output;
- ``<backend>_ms``: the masked call with one backend named (an error where that backend refuses it);
- ``lower_right_ms``: SDPA with the ``CausalBias`` called directly, and its largest difference;
- ``flash_unmasked_ms``: flash over the S keys without a mask (no causal skip: the ceiling of a masked flash call).

With ``--paged``, the chunk is read from the engine's KV page pool instead (``headwise.bench.paged_prefill``, its
docstring says each column; Llama-3-8B attention only): the paged prefill kernel (``kernels/paged_prefill.py``,
default tiles and a few others), the gather + flash path it replaces, and flash over a contiguous cache (the floor),
with their TFLOP/s.

    PYTHONPATH=src python3 bench/dense_chunk_attention.py OUT.json [--chunk 1024] [--keys 32768,131072]
    PYTHONPATH=src python3 bench/dense_chunk_attention.py OUT.json --paged --chunk 2048 --keys 8192,32768,131072
    PYTHONPATH=src python3 bench/dense_chunk_attention.py /tmp/x.json --chunk 64 --keys 256 --heads 4,2 --dim 16
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/dense_chunk_attention.py /tmp/x.json --paged --chunk 16 --keys 48
        (CPU dry runs of the script itself)
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from headwise.bench.record import result_doc, write_result
from headwise.bench.timing import Timer
from headwise.policies.base import causal_attention

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def _ms(fn: Callable[[], Any], reps: int) -> float:
    """Median wall time of a synchronised call after one warm-up call, ms (``Timer.wall``; each call is milliseconds
    long: launch costs do not matter)."""
    fn()
    return Timer.wall(fn, reps)


@torch.inference_mode()
def measure(L: int, S: int, hq: int, hkv: int, dim: int, reps: int, dev: str, dtype: torch.dtype) -> dict[str, Any]:
    """One row: a chunk of ``L`` queries (the last of ``S`` positions) over ``S`` keys, every way above."""
    scale = dim ** -0.5
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, hq, L, dim, device=dev, dtype=dtype, generator=g)
    k = torch.randn(1, hkv, S, dim, device=dev, dtype=dtype, generator=g)
    v = torch.randn(1, hkv, S, dim, device=dev, dtype=dtype, generator=g)
    start = S - L
    row: dict[str, Any] = {"chunk": L, "keys": S}
    mask = torch.arange(S, device=dev)[None, :] <= torch.arange(start, S, device=dev)[:, None]

    def masked_default() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    ref = masked_default()
    row["masked_default_ms"] = round(_ms(masked_default, reps), 3)
    try:
        out = causal_attention(q, k, v, start, scale)
        row["engine_max_abs_diff"] = (out.float() - ref.float()).abs().max().item()
        row["engine_ms"] = round(_ms(lambda: causal_attention(q, k, v, start, scale), reps), 3)
    except (RuntimeError, TypeError, ValueError) as exc:
        row["engine_error"] = str(exc).splitlines()[0][:200]
    for name, backend in BACKENDS.items():
        def masked(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        try:
            row[f"{name}_ms"] = round(_ms(masked, reps), 3)
        except RuntimeError as exc:
            row[f"{name}_error"] = str(exc).splitlines()[0][:200]
    bias = causal_lower_right(L, S)

    def lower_right() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale, enable_gqa=True)
    try:
        row["lower_right_max_abs_diff"] = (lower_right().float() - ref.float()).abs().max().item()
        row["lower_right_ms"] = round(_ms(lower_right, reps), 3)
    except (RuntimeError, ValueError) as exc:
        row["lower_right_error"] = str(exc).splitlines()[0][:200]

    def unmasked() -> torch.Tensor:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
    try:
        row["flash_unmasked_ms"] = round(_ms(unmasked, reps), 3)
    except RuntimeError as exc:
        row["flash_unmasked_error"] = str(exc).splitlines()[0][:200]
    # 4 L S d FLOPs per query head (QK^T and PV), less the masked half of the chunk's own L x L block.
    flops = 4 * hq * L * (S - L / 2) * dim
    for key in ("masked_default", "engine"):
        if f"{key}_ms" in row:
            row[f"{key}_tflops"] = round(flops / (row[f"{key}_ms"] * 1e-3) / 1e12, 2)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--chunk", type=int, default=1024, help="queries per chunk (bench serve's --chunk-size)")
    ap.add_argument("--keys", default="32768,131072", help="key lengths S (the chunk's last position + 1)")
    ap.add_argument("--heads", default="32,8", help="query heads,KV heads (default Llama-3-8B's)")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--paged", action="store_true",
                    help="the chunk over a KV page pool: paged prefill kernel vs gather + flash vs contiguous flash")
    ap.add_argument("--page-size", type=int, default=16, help="--paged: tokens per pool page (default 16)")
    args = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    hq, hkv = (int(x) for x in args.heads.split(","))
    if args.paged and ((hq, hkv, args.dim) != (32, 8, 128)):
        sys.exit("--paged measures Llama-3-8B attention only (32 query / 8 KV heads, head_dim 128): drop --heads/--dim")
    rows = []
    for S in (int(x) for x in args.keys.split(",")):
        if args.chunk > S:
            sys.exit(f"--keys {S}: a chunk of {args.chunk} queries is the last of at least {args.chunk} keys")
        if args.paged:
            from headwise.bench import paged_prefill

            rows.append(paged_prefill.measure(args.chunk, S, args.page_size, lambda fn: _ms(fn, args.reps), dev,
                                              dtype, configs=None if dev == "cuda" else []))
        else:
            rows.append(measure(args.chunk, S, hq, hkv, args.dim, args.reps, dev, dtype))
        print(json.dumps(rows[-1]), flush=True)
        if dev == "cuda":
            torch.cuda.empty_cache()
    doc = result_doc("PYTHONPATH=src python3 bench/dense_chunk_attention.py " + " ".join(sys.argv[1:]), rows)
    print(f"wrote {write_result(doc, args.out)}")


if __name__ == "__main__":
    main()
