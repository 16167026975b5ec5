"""``page_topk``: query-aware page selection for decode (Quest).

Quest (Tang et al., 2024, https://arxiv.org/abs/2406.10774) splits each head's KV cache into pages of
``page_size`` tokens and keeps every page's channel-wise min and max key. At each decode step the query
scores every page with the upper bound ``sum_d max(q_d * min_d, q_d * max_d)`` of ``q . k`` inside it, and
attends exactly over the top pages that fit in a token budget. Prefill is exact full attention.

How this differs from the paper, and why:
- GQA: the cache, and so the page choice, is per KV head; the bound is summed over the query heads sharing
  the KV head (Quest's models are MHA, one query head per KV head, where the two coincide).
- The first page (attention sinks) and the newest page (the current token's) are always kept; they count
  against the budget. ``budget // page_size`` pages are attended (all of them while they fit).
- A one-token chunk is treated as a decode step (selection applies); longer chunks are prefill.
- Option ``bounds="e4m3"`` (not in the paper): the page bounds are stored as float8 e4m3 with one scale per page
  row, rounded outward so the score is still an upper bound of ``q . k`` over the page, only looser. Half the
  metadata bytes, and half of what a decode step reads to score pages (at 128K tokens on an H100, batch 1: the
  step from 32.3 to 30.5 us, bench/results/bench_2026-11-23e.json). Decode fidelity on SmolLM2 (4K prompt,
  512-token budget, pages of 32, 6 x 64 teacher-forced steps): top-1 agreement with dense 0.812 / KL 0.102
  against 0.810 / 0.105 with exact bounds (bench/results/quest_bounds_precision_2026-11-23c.json).

Memory: the full cache is kept (pages are read selectively, not dropped), plus the page bounds: ``2 * head_dim``
values per page, one token slot's worth, so ``kv_tokens = seq_len + ceil(seq_len / page_size)`` (e4m3: half a
slot per page, plus two fp32 scales).
CPU: reference (mask of the selected pages + SDPA). CUDA with kernels: Triton scoring, then for a few
(sequence, KV head) pairs the attention kernel choosing the pages itself (``topk_sparse_decode``), else a Triton
top-k + the paged sparse decode kernel (``kernels/paged_decode.py``, scores and selection in ``kernels/quest.py``); the same pages either way, no gathered
copy of K/V. Decode steps replayed from a CUDA graph (``engine.GraphDecoder``) take the fused path with every
length read on the device: the bounds of the token's page are refreshed on the device (``PagedStore.append_at``),
and all reserved pages are scored, those past the cache's length -inf (``_attend_graph``).
Under an engine's page pool of ``page_size``-token pages (exact bounds): the KV in the sequence's pool pages, the
bounds in bound pages beside them, and decode steps batched over every sequence of the step with the same page
choice (``paged_cache.PagedQuestStore``, ``paged_cache.select_pool_pages``), also on padded CUDA-graph steps
(``batch_graphs.PaddedBatch.attend``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.common import MAX_SELECT_PAGES, DeviceLength
from headwise.kernels.decode_reference import quest_page_scores_reference
from headwise.policies.base import AttendContext, PagedLayout, Policy, causal_attention, check_positive
from headwise.policies.selection import attend_selected
from headwise.policies.stores import PagedStore

# Up to this many (sequence, KV head) pairs per layer group, the kernel path selects pages inside the attention
# kernel (score -> select+attend -> merge); beyond, a separate top-k kernel feeds the attention kernel. On an H100
# at 128K tokens: 8 pairs (batch 1) 32.3 against 35.2 us, 32 pairs (batch 4) 77.4 against 68.9 us
# (bench/results/bench_2026-11-23e.json).
FUSED_SELECT_MAX_HEADS = 16


@dataclass(frozen=True)
class PageTopK(Policy):
    name: ClassVar[str] = "page_topk"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.10774"
    graph_decode: ClassVar[bool] = True
    keeps_every_token: ClassVar[bool] = True  # pages are read selectively, never dropped
    dense_prefill: ClassVar[bool] = True

    page_size: int = 16
    """Tokens per page (a power of two up to 128). Quest uses 16."""
    budget: int = 4096
    """Tokens attended per decode step, as whole pages (first and newest page included)."""
    bounds: str = "exact"
    """Page bounds storage: "exact" (the KV dtype) or "e4m3" (8-bit, rounded outward: half the bytes)."""

    def validate(self) -> None:
        check_positive(self, page_size=self.page_size, budget=self.budget)
        if self.bounds not in ("exact", "e4m3"):
            raise PlanError(f"policy 'page_topk': 'bounds' must be \"exact\" or \"e4m3\", got {self.bounds!r}")
        if self.page_size < 1 or self.page_size > 128 or self.page_size & (self.page_size - 1):
            raise PlanError(f"policy 'page_topk': 'page_size' must be a power of two from 1 to 128, got {self.page_size}")
        if self.budget < 2 * self.page_size:
            raise PlanError(
                f"policy 'page_topk': 'budget' ({self.budget} tokens) must hold at least two pages "
                f"(the first and the newest, {2 * self.page_size} tokens)"
            )

    def kv_tokens(self, seq_len: int) -> int:
        pages = -(-seq_len // self.page_size)
        return seq_len + (pages if self.bounds == "exact" else -(-pages // 2))

    def short(self) -> str:
        return f"quest{self.budget}/{self.page_size}" + ("e4m3" if self.bounds == "e4m3" else "")

    def paged_layout(self) -> PagedLayout | None:
        """Under an engine's pool of ``page_size``-token pages, exact bounds: the KV in the sequence's pool pages, the
        bounds in bound pages beside them, decode batched over the pool (``paged_cache.PagedQuestStore``)."""
        if self.bounds != "exact":
            return None  # 8-bit bounds keep their own store
        return PagedLayout(select=self.budget // self.page_size, page_size=self.page_size)

    def make_store(self, batch, heads, head_dim, device, dtype) -> PagedStore:
        return PagedStore(batch, heads, head_dim, device, dtype, self.page_size, self.bounds)

    def select(self, q: torch.Tensor, store: PagedStore, use_kernels: bool) -> torch.Tensor:
        """Pages to attend: q [B, Hq, D] -> page table [B, Hkv, min(budget pages, pages in use)] (int64 from
        ``torch.topk`` on the reference path, int32 from the Triton top-k)."""
        n_pages = store.num_pages
        k = min(self.budget // self.page_size, n_pages)
        if use_kernels:
            from headwise.kernels.quest import select_pages

            return select_pages(_kernel_scores(q, store), k, use_kernel=True, bins=256)
        return torch.topk(quest_page_scores_reference(q, store.page_bounds(), n_pages), k, dim=-1, sorted=False).indices

    def attend(self, q, k, v, store: PagedStore, ctx: AttendContext) -> torch.Tensor:
        if ctx.position is not None:
            return self._attend_graph(q, k, v, store, ctx)
        store.append(k, v)  # the current token is part of the newest page it may select
        if q.shape[2] != 1:
            keys, values = store.view()
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        if ctx.use_kernels and q.shape[0] * store.heads <= FUSED_SELECT_MAX_HEADS and store.num_pages <= MAX_SELECT_PAGES:
            q0 = q[:, :, 0]
            return self._attend_fused(q0, store, store.length, _kernel_scores(q0, store), ctx)
        table = self.select(q[:, :, 0], store, ctx.use_kernels)
        return attend_selected(q, store, table, self.page_size, ctx)

    def _attend_fused(self, q0: torch.Tensor, store: PagedStore, length: int | DeviceLength, scores: torch.Tensor,
                      ctx: AttendContext) -> torch.Tensor:
        """Kernel path for few (sequence, KV head) pairs, and for CUDA-graph steps: the attention kernel selects
        the pages itself from ``scores`` (``topk_sparse_decode``: the same pages as ``select``, one launch less).
        q0: [B, Hq, D]; returns [B, Hq, 1, D]."""
        from headwise.kernels.paged_decode import topk_sparse_decode

        assert store.keys is not None and store.values is not None
        out = topk_sparse_decode(q0, store.keys, store.values, length, scores, self.budget // self.page_size,
                                 self.page_size, ctx.scale, select_bins=128)
        return out.unsqueeze(2)

    def _attend_graph(self, q, k, v, store: PagedStore, ctx: AttendContext) -> torch.Tensor:
        """A decode step for a CUDA graph (``AttendContext.position``): the fused kernel path, with every length
        read on the device. The scores cover every reserved page, those past the valid ones -inf, and the kernel
        keeps ``budget // page_size`` of them: while fewer pages than that exist, the extra picks are pages past
        the cache's length, whose tokens the kernel masks, so the same tokens are attended as on the eager path."""
        from headwise.kernels.quest import quest_page_scores

        store.append_at(k, v, ctx.position)
        assert store.bounds is not None
        pages = store.bounds.shape[2]
        if pages > MAX_SELECT_PAGES:
            raise PlanError(f"policy 'page_topk': CUDA-graph decode scores at most {MAX_SELECT_PAGES} pages per head, "
                            f"the cache reserves {pages} (use larger pages, or Engine(cuda_graphs=False))")
        length = DeviceLength(ctx.position, 1, store.capacity)
        q0 = q[:, :, 0]
        scores = quest_page_scores(q0, store.bounds, length, scales=store.bound_scales, page_size=self.page_size)
        return self._attend_fused(q0, store, length, scores, ctx)


def _kernel_scores(q: torch.Tensor, store: PagedStore) -> torch.Tensor:
    """Quest scores of the pages in use by the Triton kernel (``quest_page_scores``, 8-bit bounds with their
    scales): q [B, Hq, D] -> fp32 [B, Hkv, pages]. Triton is imported only when kernels are asked for."""
    from headwise.kernels.quest import quest_page_scores

    assert store.bounds is not None
    return quest_page_scores(q, store.bounds, store.num_pages, scales=store.bound_scales)
