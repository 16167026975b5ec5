"""Batched paged decode benchmark (CUDA): one layer's decode step of a whole batch over a KV page pool.

Regime: ``batch`` sequences of ``seq_len`` tokens, Llama-3-8B attention (32 query / 8 KV heads, head_dim 128,
bf16), one new token each. Every KV head's tokens sit in pages of ``page_size`` tokens handed out in a random
order over one pool (as after churn), so the kernels read through page tables. Decode attention is memory-bound:
a step takes about the KV bytes it reads over the bandwidth, so each row reports those bytes and their rate, and
``copy`` measures the device's copy bandwidth in the same run.

Workloads:
- ``dense_sdpa``: PyTorch SDPA (flash backend named, ``policies.base.decode_sdpa``) over contiguous
  ``[B, 8, S, D]`` caches: the dense step of an engine without pages.
- ``dense_pool``: ``kernels.batch_decode.batch_decode`` over every head's pages: the dense plan under the pool.
- ``flashinfer``: FlashInfer's ``BatchDecodeWithPagedKVCacheWrapper`` (tensor cores) over a pool in its own
  layout (a page holds all 8 KV heads, ``HND``), when it imports; its ``plan`` runs outside the timed call, as an
  engine plans once per step for all layers. An error (an API that changed) is reported in its row.
- ``plan_25``: 2 full heads (their pages) + 6 streaming heads (sink 64 + window 256: a ring of 20 pages each), two
  ``batch_decode`` launches into one output: a layer of the 25% full + 75% streaming plan.
- ``quest_pool``: every KV head ``page_topk`` (Quest, budget 4096 tokens) over the pool as the engine runs it
  (``paged_cache.decode_over_pool``): the batched page choice from bound pages (``select_pool_pages``: the Triton
  scores of ``kernels/pool_quest.py``, then ``torch.topk``) then ``batch_decode`` in ``selected`` mode. Its KV GB
  counts the pages attended and the bounds scored.

Timing: ``bench.timing.Timer`` (median CUDA-event time, L2 flushed by a read; eager, and replayed from a CUDA graph
as serving engines run decode).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from headwise.bench.decode import _both
from headwise.bench.timing import Timer

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention
GROUP = HQ // HKV
FULL_KV, SINK, WINDOW = 2, 64, 256  # plan_25: 2 of 8 KV heads full, the others DuoAttention-style streaming


@dataclass
class PoolBatch:
    """One group's decode inputs over a pool: q [B, heads * GROUP, D]; keys, values [pages, page_size, D] (views of
    one ``[pages, 2, page_size, D]`` tensor, as ``PagePool`` holds them); table int32 [B, heads, n]; lengths [B]."""

    q: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    table: torch.Tensor
    lengths: torch.Tensor
    seq_len: int
    page_size: int
    ring: int = 0

    def run(self, out: torch.Tensor | None = None) -> torch.Tensor:
        from headwise.kernels.batch_decode import batch_decode

        return batch_decode(self.q, self.keys, self.values, self.table, self.lengths, self.seq_len, self.page_size,
                            ring=self.ring, out=out)

    @property
    def kv_bytes(self) -> int:
        """Bytes of K and V the step reads."""
        held = min(self.seq_len, self.ring) if self.ring else self.seq_len
        return self.table.shape[0] * self.table.shape[1] * held * 2 * D * self.keys.element_size()


def pool_batch(batch: int, seq_len: int, page_size: int, heads: int, device: torch.device | str, dtype: torch.dtype,
               seed: int, ring: int = 0) -> PoolBatch:
    """Random inputs of ``heads`` KV heads of ``batch`` sequences, their pages shuffled over one pool."""
    g = torch.Generator(device=device).manual_seed(seed)
    held = min(seq_len, ring) if ring else seq_len
    n = -(-held // page_size)
    total = batch * heads * n
    kv = torch.randn(total, 2, page_size, D, generator=g, device=device, dtype=dtype)
    table = torch.randperm(total, generator=g, device=device).to(torch.int32).view(batch, heads, n)
    q = torch.randn(batch, heads * GROUP, D, generator=g, device=device, dtype=dtype)
    lengths = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
    return PoolBatch(q, kv[:, 0], kv[:, 1], table, lengths, seq_len, page_size, ring)


def plan_25(batch: int, seq_len: int, page_size: int, device: torch.device | str, dtype: torch.dtype,
            seed: int) -> tuple[PoolBatch, PoolBatch, Callable[[], torch.Tensor]]:
    """The full group, the streaming group and one layer's step over both (query heads of the full ones first)."""
    full = pool_batch(batch, seq_len, page_size, FULL_KV, device, dtype, seed)
    ring = pool_batch(batch, seq_len, page_size, HKV - FULL_KV, device, dtype, seed + 1, ring=SINK + WINDOW)
    out = torch.empty(batch, HQ, D, device=device, dtype=dtype)
    n_full = FULL_KV * GROUP

    def step() -> torch.Tensor:
        full.run(out[:, :n_full])
        ring.run(out[:, n_full:])
        return out

    return full, ring, step


QUEST_BUDGET = 4096  # tokens attended per decode step by quest_pool (Quest's budget at 32K-128K contexts)


def quest_pool(batch: int, seq_len: int, page_size: int, device: torch.device | str, dtype: torch.dtype,
               seed: int, budget: int = QUEST_BUDGET) -> tuple[PoolBatch, torch.Tensor, Callable[[], torch.Tensor]]:
    """Every KV head Quest over the pool: the group's pages, one bound page per ``page_size`` of them (the min keys
    of the pages it covers in its key half, their max keys in its value half, from the keys themselves), and the
    step (page choice, then the selected decode). Returns the group, its bound table [B, 8, bound pages], the step."""
    from headwise.kernels.batch_decode import batch_decode
    from headwise.paged_cache import select_pool_pages

    pb = pool_batch(batch, seq_len, page_size, HKV, device, dtype, seed)
    n = pb.table.shape[2]
    nb = -(-n // page_size)
    keys = pb.keys[pb.table.long()]  # [B, 8, n, page_size, D]
    low = torch.zeros(batch, HKV, nb * page_size, D, device=device, dtype=dtype)
    high = torch.zeros_like(low)
    low[:, :, :n], high[:, :, :n] = keys.amin(dim=3), keys.amax(dim=3)
    bound_pages = torch.stack([low, high], dim=3).view(batch * HKV * nb, page_size, 2, D).transpose(1, 2)
    kv = torch.cat([torch.stack([pb.keys, pb.values], dim=1), bound_pages])  # one pool: KV pages, then bound pages
    total = pb.keys.shape[0]
    bound_table = (total + torch.arange(batch * HKV * nb, device=device, dtype=torch.int32)).view(batch * HKV, 1, nb)
    pb = PoolBatch(pb.q, kv[:, 0], kv[:, 1], pb.table, pb.lengths, seq_len, page_size)
    rows_q = pb.q.view(batch * HKV, GROUP, D)
    select = budget // page_size

    def step() -> torch.Tensor:
        chosen = select_pool_pages(rows_q, pb.keys, pb.values, page_size, bound_table,
                                   pb.lengths.repeat_interleave(HKV), seq_len, select, use_kernels=True)
        return batch_decode(pb.q, pb.keys, pb.values, pb.table, pb.lengths, seq_len, page_size,
                            selected=chosen.view(batch, HKV, -1))

    return pb, bound_table.view(batch, HKV, nb), step


def check(batch: int, seq_len: int, page_size: int, device: torch.device | str, dtype: torch.dtype,
          quest_budget: int = QUEST_BUDGET) -> dict[str, float]:
    """Max abs error of ``dense_pool``, ``plan_25`` and ``quest_pool`` (Quest's pages chosen once more, by the same
    function) against ``batch_decode_reference`` in fp32."""
    from headwise.kernels.decode_reference import batch_decode_reference
    from headwise.paged_cache import select_pool_pages

    def err(pb: PoolBatch, out: torch.Tensor) -> float:
        ref = batch_decode_reference(pb.q.float(), pb.keys.float(), pb.values.float(), pb.table, pb.lengths,
                                     pb.page_size, ring=pb.ring)
        return (out.float() - ref).abs().max().item()

    dense = pool_batch(batch, seq_len, page_size, HKV, device, dtype, seed=0)
    full, ring, step = plan_25(batch, seq_len, page_size, device, dtype, seed=1)
    out = step()
    n_full = FULL_KV * GROUP
    quest, bound_table, quest_step = quest_pool(batch, seq_len, page_size, device, dtype, seed=2, budget=quest_budget)
    chosen = select_pool_pages(quest.q.view(-1, GROUP, D), quest.keys, quest.values, page_size,
                               bound_table.view(-1, 1, bound_table.shape[2]), quest.lengths.repeat_interleave(HKV),
                               seq_len, quest_budget // page_size).view(batch, HKV, -1)
    quest_ref = batch_decode_reference(quest.q.float(), quest.keys.float(), quest.values.float(), quest.table,
                                       quest.lengths, page_size, selected=chosen)
    return {"dense_pool_max_abs_err": err(dense, dense.run()),
            "plan_25_max_abs_err": max(err(full, out[:, :n_full]), err(ring, out[:, n_full:])),
            "quest_pool_max_abs_err": (quest_step().float() - quest_ref).abs().max().item()}


def _flashinfer_step(batch: int, seq_len: int, page_size: int, dtype: torch.dtype) -> tuple[Callable[[], Any], int]:
    import flashinfer

    n = -(-seq_len // page_size)
    cache = torch.randn(batch * n, 2, HKV, page_size, D, device="cuda", dtype=dtype)
    indices = torch.randperm(batch * n, device="cuda").to(torch.int32)
    indptr = torch.arange(batch + 1, device="cuda", dtype=torch.int32) * n
    last = torch.full((batch,), seq_len - (n - 1) * page_size, device="cuda", dtype=torch.int32)
    q = torch.randn(batch, HQ, D, device="cuda", dtype=dtype)
    workspace = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "HND", use_tensor_cores=True)
    wrapper.plan(indptr, indices, last, HQ, HKV, D, page_size, pos_encoding_mode="NONE", q_data_type=dtype,
                 kv_data_type=dtype)
    return (lambda: wrapper.run(q, cache)), batch * HKV * seq_len * 2 * D * cache.element_size()


def run_batch_decode_bench(seq_len: int = 131072, batches: tuple[int, ...] = (1, 4, 16), page_size: int = 16,
                           log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every workload at each batch size; rows of (workload, batch, eager/graph ms, KV GB, TB/s)."""
    from headwise.policies.base import decode_sdpa

    dtype = torch.bfloat16
    timer = Timer()
    rows: list[dict[str, Any]] = []

    def add(name: str, batch: int, fn: Callable[[], Any], kv_bytes: int) -> None:
        row = {"section": "time", "workload": name, "batch": batch, "seq_len": seq_len, "page_size": page_size,
               "kv_gb": round(kv_bytes / 1e9, 4), **_both(timer, fn)}
        if row.get("graph_ms", 0) > 0:
            row["kv_tb_per_s"] = round(kv_bytes / row["graph_ms"] / 1e9, 3)
        rows.append(row)
        log(str(row))

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    add("copy", 0, lambda s=src, d=dst: d.copy_(s), 2 * src.numel())  # read + write
    del src, dst
    for batch in batches:
        dense = pool_batch(batch, seq_len, page_size, HKV, "cuda", dtype, seed=batch)
        add("dense_pool", batch, dense.run, dense.kv_bytes)
        del dense
        full, ring, step = plan_25(batch, seq_len, page_size, "cuda", dtype, seed=batch)
        add("plan_25", batch, step, full.kv_bytes + ring.kv_bytes)
        del full, ring, step
        quest, bound_table, step = quest_pool(batch, seq_len, page_size, "cuda", dtype, seed=batch)
        attended = batch * HKV * min(seq_len, QUEST_BUDGET) * 2 * D * quest.keys.element_size()
        scored = batch * HKV * -(-seq_len // page_size) * 2 * D * quest.keys.element_size()
        add("quest_pool", batch, step, attended + scored)
        del quest, bound_table, step
        q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
        k = torch.randn(batch, HKV, seq_len, D, device="cuda", dtype=dtype)
        v = torch.randn_like(k)
        add("dense_sdpa", batch, lambda q=q, k=k, v=v: decode_sdpa(q, k, v, D**-0.5), 2 * k.numel() * k.element_size())
        del q, k, v
        try:
            fn, nbytes = _flashinfer_step(batch, seq_len, page_size, dtype)
            add("flashinfer", batch, fn, nbytes)
            del fn
        except Exception as exc:  # not installed, or its API moved: reported, the others still run
            rows.append({"section": "time", "workload": "flashinfer", "batch": batch, "error": repr(exc)[:300]})
        torch.cuda.empty_cache()
    rows.append({"section": "check", **check(2, 4097, page_size, "cuda", dtype)})
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [f"{'workload':<12}{'B':>4}{'eager ms':>10}{'graph ms':>10}{'KV GB':>9}{'TB/s':>7}"]
    for r in rows:
        if "eager_ms" in r:
            lines.append(f"{r['workload']:<12}{r['batch']:>4}{r['eager_ms']:>10.3f}{r.get('graph_ms', float('nan')):>10.3f}"
                         f"{r['kv_gb']:>9.3f}{r.get('kv_tb_per_s', float('nan')):>7.2f}")
        elif "error" in r:
            lines.append(f"{r['workload']:<12}{r['batch']:>4}  error: {r['error']}")
        elif r.get("section") == "check":
            lines.append("max abs error vs fp32 reference: " + ", ".join(f"{k}: {v:.2e}" for k, v in r.items()
                                                                         if k != "section"))
    return "\n".join(lines)
