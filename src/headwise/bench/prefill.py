"""Prefill attention benchmark: dense SDPA vs FlexAttention vs headwise's block-sparse kernel.

Regime: one attention layer of Llama-3-8B (32 query / 8 KV heads, head_dim 128, bf16) over a long prompt in
one chunk. Prefill attention is compute-bound (``4 * B * Hq * L^2 * D / 2`` FLOPs causal), so a pattern's
speed-up is bounded by its block density; index building (the "plan" step) is a small extra cost that we
include in our time and also report on its own.

Workloads, all on random Gaussian q/k/v (indices from real estimators, so vertical-slash and block-top-k
picks are data-driven but, on random data, spread out; the density column says how sparse each really was):
- ``plan``: KV heads 0-1 (25% of heads) ``vertical_slash``, KV heads 2-7 ``a_shape``; one merged per-query-head
  index, one kernel call. Dense and Flex get the same work: dense computes everything, Flex the same block mask.
- ``block_topk``: every head ``block_topk`` (kernel vs Flex on a denser, irregular mask).

Everything runs in one process: the correctness check (ours vs the fp32 reference at a moderate length),
a small tile sweep for our kernel, then timings with CUDA events after warm-up (median of repeats).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from headwise.bench.timing import Timer
from headwise.kernels.prefill_index import density, flex_block_mask
from headwise.policies.a_shape import AShape
from headwise.policies.block_topk import BlockTopK
from headwise.policies.vertical_slash import VerticalSlash

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention


def cuda_time(fn: Callable[[], Any], warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` (``Timer`` without an L2 flush: a prefill's inputs dwarf L2)."""
    return Timer(flush=None).eager(fn, warmup, reps)


TILE_CONFIGS = [
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 128, "num_warps": 8, "num_stages": 3},
    {"block_m": 128, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
    {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 4},
    {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 4},
    {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 3},
]


def dense_flops(batch: int, seq_len: int) -> float:
    return 4.0 * batch * HQ * seq_len * seq_len * D / 2


def plan_policies(block_size: int) -> tuple[VerticalSlash, AShape]:
    """The benchmark plan's two patterns (budgets written into the results)."""
    return (
        VerticalSlash(vertical_size=64, slash_size=64, last_q=64, block_size=block_size),
        AShape(sink=block_size, local=1024, block_size=block_size),
    )


def plan_index(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Merged per-query-head index of the ``plan`` workload: q heads 0-7 vertical-slash, 8-31 A-shape."""
    vs, ash = plan_policies(block_size)
    n_vs_q, n_vs_kv = HQ // 4, HKV // 4
    i1, c1 = vs.build_index(q[:, :n_vs_q], k[:, :n_vs_kv], 0, scale)
    i2, c2 = ash.build_index(q[:, n_vs_q:], k[:, n_vs_kv:], 0, scale)
    B, nqb = q.shape[0], i1.shape[2]
    width = max(i1.shape[3], i2.shape[3])
    idx = torch.full((B, HQ, nqb, width), -1, dtype=torch.int32, device=q.device)
    idx[:, :n_vs_q, :, : i1.shape[3]] = i1
    idx[:, n_vs_q:, :, : i2.shape[3]] = i2
    count = torch.cat([c1, c2.expand(B, HQ - n_vs_q, -1)], dim=1).contiguous()
    return idx, count


def topk_index(q: torch.Tensor, k: torch.Tensor, block_size: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return BlockTopK(topk=64, block_size=block_size).build_index(q, k, 0, scale)


def check_against_reference(seq_len: int, block_size: int, config: dict[str, int] | None) -> dict[str, Any]:
    """Ours and plain bf16 PyTorch vs the fp32 reference on the ``plan`` index, one batch row, chunked by
    query rows to bound memory. Reports max errors (the tests' tolerance: ours <= 2x PyTorch's + 1e-3)."""
    from headwise.kernels.block_sparse import block_sparse_attention
    from headwise.kernels.prefill_index import indices_to_mask

    torch.manual_seed(0)
    q = torch.randn(1, HQ, seq_len, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16)
    scale = D**-0.5
    idx, count = plan_index(q, k, block_size, scale)
    out = block_sparse_attention(q, k, v, idx, count, block_size, 0, scale, config)
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    err_ours = err_torch = 0.0
    rows = 1024
    for r0 in range(0, seq_len, rows):
        r1 = min(seq_len, r0 + rows)
        first, last = r0 // block_size, (r1 - 1) // block_size
        mask = indices_to_mask(idx[:, :, first : last + 1], count[:, :, first : last + 1], block_size, r1 - r0, seq_len, r0)
        mask = mask[..., :r1]
        ref = F.scaled_dot_product_attention(
            q[:, :, r0:r1].float(), ke[:, :, :r1].float(), ve[:, :, :r1].float(), attn_mask=mask, scale=scale
        )
        pt = F.scaled_dot_product_attention(q[:, :, r0:r1], ke[:, :, :r1], ve[:, :, :r1], attn_mask=mask, scale=scale)
        err_ours = max(err_ours, (out[:, :, r0:r1].float() - ref).abs().max().item())
        err_torch = max(err_torch, (pt.float() - ref).abs().max().item())
    return {
        "seq_len": seq_len,
        "max_abs_err_ours": err_ours,
        "max_abs_err_torch_bf16": err_torch,
        "within_tolerance": err_ours <= 2 * err_torch + 1e-3,
        "density": density(count, block_size, seq_len, seq_len),
    }


def _inputs(batch: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, HQ, seq_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(batch, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(batch, HKV, seq_len, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    return q, k, v


def _tune(seq_len: int, block_size: int, results: list[dict[str, Any]], log: Callable[[str], None]) -> dict[str, int] | None:
    """Time our kernel alone on batch 1's ``plan`` index for each tile config; return the fastest."""
    from headwise.kernels.block_sparse import block_sparse_attention

    q, k, v = _inputs(1, seq_len, 0)
    scale = D**-0.5
    idx, count = plan_index(q, k, block_size, scale)
    best, config = math.inf, None
    for cfg in TILE_CONFIGS:
        if block_size % cfg["block_m"] or block_size % cfg["block_n"]:
            continue
        try:
            ms = cuda_time(lambda cfg=cfg: block_sparse_attention(q, k, v, idx, count, block_size, 0, scale, cfg))
        except Exception as exc:  # a config that does not fit (shared memory) is reported, not fatal
            results.append({"section": "tune", "config": cfg, "error": repr(exc)[:200]})
            continue
        results.append({"section": "tune", "config": cfg, "kernel_ms": round(ms, 3)})
        log(f"tune {cfg}: {ms:.3f} ms")
        if ms < best:
            best, config = ms, cfg
    return config


def _time_batch(
    batch: int,
    seq_len: int,
    block_size: int,
    config: dict[str, int] | None,
    flex_fn: Any,
    compare_flex_output: bool,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    from headwise.kernels.block_sparse import block_sparse_attention

    q, k, v = _inputs(batch, seq_len, batch)
    scale = D**-0.5
    # Flex's default tiles on Hopper are 128 wide and must divide the mask's blocks.
    flex_opts = {"BLOCK_M": block_size, "BLOCK_N": block_size} if block_size < 128 else None
    dense_gqa = cuda_time(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True), 1, 3
    )
    ke, ve = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)
    dense_exp = cuda_time(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True, scale=scale), 1, 3)
    ke = ve = None  # free the expanded copies before the sparse runs
    dense = min(dense_gqa, dense_exp)
    log(f"B={batch} dense: enable_gqa {dense_gqa:.1f} ms, expanded kv {dense_exp:.1f} ms")
    rows = []
    for workload, builder in (("plan", plan_index), ("block_topk", topk_index)):
        idx, count = builder(q, k, block_size, scale)
        index_ms = cuda_time(lambda builder=builder: builder(q, k, block_size, scale), 1, 5)
        kernel_ms = cuda_time(
            lambda idx=idx, count=count: block_sparse_attention(q, k, v, idx, count, block_size, 0, scale, config)
        )

        def ours(builder=builder) -> torch.Tensor:
            i, c = builder(q, k, block_size, scale)
            return block_sparse_attention(q, k, v, i, c, block_size, 0, scale, config)

        total_ms = cuda_time(ours, 1, 5)
        row: dict[str, Any] = {
            "section": "time",
            "workload": workload,
            "batch": batch,
            "seq_len": seq_len,
            "block_size": block_size,
            "density": round(density(count, block_size, seq_len, seq_len), 4),
            "dense_ms": round(dense, 2),
            "dense_enable_gqa_ms": round(dense_gqa, 2),
            "dense_expanded_kv_ms": round(dense_exp, 2),
            "dense_tflops": round(dense_flops(batch, seq_len) / dense / 1e9, 1),
            "ours_index_ms": round(index_ms, 3),
            "ours_kernel_ms": round(kernel_ms, 3),
            "ours_total_ms": round(total_ms, 3),
            "speedup_vs_dense": round(dense / total_ms, 2),
            "config": config,
        }
        if flex_fn is not None:
            row["flex_kernel_options"] = flex_opts
            try:
                t0 = time.perf_counter()
                bm = flex_block_mask(idx, count, block_size, seq_len, seq_len, HQ, HKV, batch)
                torch.cuda.synchronize()
                row["flex_mask_s"] = round(time.perf_counter() - t0, 3)
                t0 = time.perf_counter()
                ref = flex_fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=flex_opts)
                torch.cuda.synchronize()
                row["flex_first_call_s"] = round(time.perf_counter() - t0, 1)
                if compare_flex_output:
                    got = block_sparse_attention(q, k, v, idx, count, block_size, 0, scale, config)
                    row["max_abs_diff_vs_flex"] = (ref.float() - got.float()).abs().max().item()
                ref = got = None
                flex_ms = cuda_time(lambda bm=bm: flex_fn(q, k, v, block_mask=bm, scale=scale, enable_gqa=True, kernel_options=flex_opts))
                row["flex_ms"] = round(flex_ms, 3)
                row["kernel_speedup_vs_flex"] = round(flex_ms / kernel_ms, 2)
            except Exception as exc:  # report Flex failures instead of losing the run
                row["flex_error"] = repr(exc)[:300]
        rows.append(row)
        log(str(row))
    return rows


def run_prefill_bench(
    seq_len: int = 131072,
    batches: tuple[int, ...] = (1, 4),
    block_size: int = 128,
    check_len: int = 8192,
    tune: bool = True,
    flex: bool = True,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run every measurement on the current CUDA device; one dict per (section, workload, batch).

    Rows: ``section`` in {"tune", "check", "time"}; timing rows carry ms for dense (both GQA variants),
    Flex, our kernel, our index building, their sum, the ratios and the block density.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("the prefill benchmark needs a CUDA GPU")
    results: list[dict[str, Any]] = []
    config = _tune(seq_len, block_size, results, log) if tune else None
    check = check_against_reference(check_len, block_size, config)
    results.append({"section": "check", **check})
    log(f"check at {check_len}: ours {check['max_abs_err_ours']:.2e}, torch bf16 {check['max_abs_err_torch_bf16']:.2e}")
    flex_fn = None
    if flex:
        from torch.nn.attention.flex_attention import flex_attention

        flex_fn = torch.compile(flex_attention, dynamic=False)
    for n, batch in enumerate(batches):
        results += _time_batch(batch, seq_len, block_size, config, flex_fn, n == 0, log)
        torch.cuda.empty_cache()
    return results


def format_table(results: list[dict[str, Any]]) -> str:
    """Timing rows as a fixed-width table."""
    head = f"{'workload':<11}{'B':>3}{'density':>9}{'dense ms':>10}{'flex ms':>10}{'kernel ms':>11}{'index ms':>10}{'total ms':>10}{'x dense':>9}{'x flex':>8}"
    lines = [head]
    for r in results:
        if r.get("section") != "time":
            continue
        lines.append(
            f"{r['workload']:<11}{r['batch']:>3}{r['density']:>9.3f}{r['dense_ms']:>10.1f}{r.get('flex_ms', float('nan')):>10.2f}"
            f"{r['ours_kernel_ms']:>11.2f}{r['ours_index_ms']:>10.2f}{r['ours_total_ms']:>10.2f}"
            f"{r['speedup_vs_dense']:>9.2f}{r.get('kernel_speedup_vs_flex', float('nan')):>8.2f}"
        )
    return "\n".join(lines)
