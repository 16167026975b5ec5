"""One prompt chunk of a dense layer over the KV page pool (issue 13's dense baseline): the paged prefill kernel
against the gather the engine did before it, and against flash over a contiguous cache.

Regime: a chunk of ``chunk`` queries, the last of ``keys`` positions (``start = keys - chunk``), Llama-3-8B attention
(32 query / 8 KV heads, head_dim 128), bf16, one layer. Each KV head's keys sit in pages of ``page_size`` tokens
handed out in a random order over one ``PagePool`` (as after churn). Prefill attention is compute-bound: each row
reports its FLOPs' rate (``4 * 32 * chunk * (keys - chunk / 2) * 128``: QK^T and PV, less the masked half of the
chunk's own block).

- ``paged_ms``: ``kernels.paged_prefill.paged_prefill`` over the pages, one launch for the 8 KV heads (the engine's
  prompt-chunk path under the pool with kernels on, ``paged_cache.prefill_over_pool``), default tiles; each
  ``paged[BMxBN,wW,sS]_ms`` another tile configuration (an error where it does not compile);
- ``gather_ms``: ``paged_cache._gather`` of the ``keys`` slots of the 8 heads into ``[1, 8, keys, D]`` (what
  ``PagedDenseStore.view`` does per chunk and layer on the fallback path);
- ``gather_flash_ms``: the gather, then ``policies.base.causal_attention`` (SDPA handed a bottom-right causal bias:
  flash), the fallback path;
- ``flash_contiguous_ms``: ``causal_attention`` over a contiguous cache (the floor: an engine without pages).

``max_abs_diff``: the kernel's output against the contiguous flash call's; ``gather_flash_over_paged``: the fallback's
time over the kernel's (default tiles); ``best_paged_over_floor``: the fastest tiles' time over the contiguous
flash call's. ``check`` (tiny shapes, any device)
compares both paths with the fp32 reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

HQ, HKV, D = 32, 8, 128  # Llama-3-8B attention
GROUP = HQ // HKV
# Tile configurations timed beside the default (block_m query rows x block_n keys, warps, pipeline stages).
CONFIGS = [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4), (128, 128, 8, 2), (64, 128, 4, 2)]


@dataclass
class PagedChunk:
    """One layer's chunk over a pool: ``q [1, HQ, chunk, D]`` (a layer's query tensor), the pool, the group's pages
    (8 KV heads) and a contiguous copy of the same keys and values ``[1, HKV, keys, D]``."""

    q: torch.Tensor
    pool: Any  # PagePool
    pages: Any  # GroupPages
    k: torch.Tensor
    v: torch.Tensor
    start: int

    @property
    def chunk(self) -> int:
        return self.q.shape[2]

    @property
    def keys(self) -> int:
        return self.k.shape[2]

    def paged(self, block_m: int | None = None, block_n: int | None = None, num_warps: int | None = None,
              num_stages: int | None = None) -> Callable[[], torch.Tensor]:
        """The kernel's call (planned once, as the engine plans once per layer's launch)."""
        from headwise.kernels.paged_prefill import default_config, paged_prefill, plan_paged_prefill

        block_m = block_m or default_config(D, self.q.dtype)["block_m"]
        dev = self.q.device
        plan = plan_paged_prefill([0] * HKV, [self.chunk] * HKV, [self.start] * HKV, [h * GROUP for h in range(HKV)],
                                  GROUP, dev, block_m=block_m)
        table = self.pages.table(dev)
        out = torch.empty_like(self.q)
        q_t, out_t = self.q[0].transpose(0, 1), out[0].transpose(0, 1)  # [chunk, HQ, D] views, as the engine's

        def run() -> torch.Tensor:
            paged_prefill(q_t, self.pool.keys, self.pool.values, table, plan, self.pool.page_size,
                          out=out_t, block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
            return out

        return run

    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        from headwise.paged_cache import _gather

        return _gather(self.pool, self.pages, torch.arange(self.keys, device=self.q.device))

    def gather_flash(self) -> torch.Tensor:
        from headwise.policies.base import causal_attention

        keys, values = self.gather()
        return causal_attention(self.q, keys, values, self.start, D**-0.5)

    def flash_contiguous(self) -> torch.Tensor:
        from headwise.policies.base import causal_attention

        return causal_attention(self.q, self.k, self.v, self.start, D**-0.5)


def paged_chunk(chunk: int, keys: int, page_size: int, device: torch.device | str, dtype: torch.dtype,
                seed: int = 0) -> PagedChunk:
    """Random inputs: the keys and values of 8 KV heads in shuffled pages of a ``PagePool``, and their contiguous
    copy."""
    from headwise.policies import Full
    from headwise.pool import GroupPages, PagePool
    from headwise.spec import ModelSpec

    g = torch.Generator(device=device).manual_seed(seed)
    n = -(-keys // page_size)
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=HQ, num_kv_heads=HKV, head_dim=D,
                     max_context=keys)
    itemsize = torch.empty((), dtype=dtype).element_size()
    pool = PagePool(spec, HKV * n * page_size * 2 * D * itemsize, itemsize, page_size)
    pool.allocate(device, dtype)
    assert pool.kv is not None
    pool.kv.normal_(generator=g)
    perm = torch.randperm(HKV * n, generator=g, device=device).view(HKV, n)
    pages = GroupPages(Full(), HKV, perm.tolist())
    slots = torch.arange(keys, device=device)
    phys, within = perm[:, slots // page_size], slots % page_size  # [HKV, keys]
    k, v = pool.keys[phys, within][None].contiguous(), pool.values[phys, within][None].contiguous()
    q = torch.randn(1, HQ, chunk, D, generator=g, device=device, dtype=dtype)
    return PagedChunk(q, pool, pages, k, v, keys - chunk)


def flops(chunk: int, keys: int) -> float:
    return 4 * HQ * chunk * (keys - chunk / 2) * D


def check(chunk: int, keys: int, device: torch.device | str, dtype: torch.dtype, page_size: int = 16,
          block_m: int | None = None, block_n: int | None = None) -> dict[str, float]:
    """Max abs error of the paged kernel and of the gather path against ``paged_prefill_reference`` in fp32."""
    from headwise.kernels.paged_prefill import paged_prefill_reference

    pc = paged_chunk(chunk, keys, page_size, device, dtype, seed=1)
    table = pc.pages.table(device)
    ref = paged_prefill_reference(pc.q[0].transpose(0, 1).float(), pc.pool.keys.float(), pc.pool.values.float(),
                                  table, [0] * HKV, [chunk] * HKV, [pc.start] * HKV, [h * GROUP for h in range(HKV)],
                                  GROUP, page_size).transpose(0, 1)[None]
    out = pc.paged(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)()
    return {"paged_max_abs_err": (out.float() - ref).abs().max().item(),
            "gather_flash_max_abs_err": (pc.gather_flash().float() - ref).abs().max().item(),
            "flash_contiguous_max_abs_err": (pc.flash_contiguous().float() - ref).abs().max().item()}


def measure(chunk: int, keys: int, page_size: int, ms: Callable[[Callable[[], Any]], float], device: str = "cuda",
            dtype: torch.dtype = torch.bfloat16, configs: list[tuple[int, int, int, int]] | None = None,
            ) -> dict[str, Any]:
    """One row: every path above at ``keys`` keys, timed by ``ms`` (milliseconds of a synchronised call)."""
    pc = paged_chunk(chunk, keys, page_size, device, dtype)
    row: dict[str, Any] = {"chunk": chunk, "keys": keys, "start": pc.start, "page_size": page_size,
                           "dtype": str(dtype).removeprefix("torch.")}
    paged = pc.paged()
    floor = pc.flash_contiguous()
    row["max_abs_diff"] = (paged().float() - floor.float()).abs().max().item()
    row["paged_ms"] = round(ms(paged), 3)
    for bm, bn, w, s in configs if configs is not None else CONFIGS:
        name = f"paged[{bm}x{bn},w{w},s{s}]"
        try:
            row[f"{name}_ms"] = round(ms(pc.paged(bm, bn, w, s)), 3)
        except Exception as exc:  # a tile that does not fit (shared memory, registers) is reported, others still run
            row[f"{name}_error"] = str(exc).splitlines()[0][:200]
    row["gather_ms"] = round(ms(pc.gather), 3)
    row["gather_flash_ms"] = round(ms(pc.gather_flash), 3)
    row["flash_contiguous_ms"] = round(ms(pc.flash_contiguous), 3)
    f = flops(chunk, keys)
    for key in [k for k in row if k.endswith("_ms") and k != "gather_ms"]:
        row[key.removesuffix("_ms") + "_tflops"] = round(f / (row[key] * 1e-3) / 1e12, 1)
    timed = {k: v for k, v in row.items() if k.startswith("paged") and k.endswith("_ms")}
    best = min(timed, key=timed.__getitem__)
    row["best_paged"] = best.removesuffix("_ms")
    # > 1: the default kernel is faster than the gather path; the best tiles' time over the floor's
    row["gather_flash_over_paged"] = round(row["gather_flash_ms"] / row["paged_ms"], 2)
    row["best_paged_over_floor"] = round(row[best] / row["flash_contiguous_ms"], 2)
    return row
