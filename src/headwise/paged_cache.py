"""KV of a sequence's head groups in the engine's page pool, and the batched decode step over it.

Under an engine with a ``PagePool`` (``Engine(pool=...)``, which allocates its pages once), the head groups whose
policy has a ``paged_layout`` keep their keys and values in the sequence's pool pages (``SequencePages``) instead
of tensors of their own: ``PagedDenseStore`` (every token in position order: ``full``, and prefill patterns that
decode with it), ``PagedRingStore`` (``streaming``'s sinks and ring, in ``SinkWindowStore``'s slot layout) and
``PagedQuestStore`` (``page_topk``: every token in position order, each page's min and max key in bound pages beside
them). Every write goes through ``PagePool.write``. Other policies (``tidal``, ``recycled``, ``quantized``,
``streaming`` with compensation, ``page_topk`` with e4m3 bounds or pages of another size) keep their own stores
beside the pool, counted in its pages.

- A prompt chunk of several tokens of a group whose policy prefills densely (``Policy.dense_prefill``: ``full``,
  ``page_topk``) with kernels on (CUDA, or Triton's interpreter in tests) is written into its pages
  (``PagedDenseStore.append``) and attended in place (``prefill_over_pool``): in each layer, every (sequence, KV
  head) pair of every such chunk of the forward is a row of one ``kernels/paged_prefill.py`` launch, which reads
  the prefix through the page tables (no gathered copy).
- Any other prompt chunk, and every one with kernels off, runs the policy's own ``attend``, as without a pool: the
  store gathers the slots it holds from its pages (``view``: a copy, as the reference path reads a contiguous
  cache), the policy attends over them and the chunk, and the store writes the chunk into its pages.
- One-token steps are attended together (``decode_over_pool``): in each layer, every (sequence, KV head) pair
  of a paged group whose layout holds the same number of slots (and selects the same number of pages) is a row of
  one ``batch_decode`` launch (the Triton kernel with kernels on, its plain-PyTorch reference
  ``batch_decode_reference`` otherwise), after the token's key and value are written through the page tables. For
  ``page_topk`` the newest page's bounds are refreshed and Quest's pages chosen for every row at once
  (``select_pool_pages``: scores by ``kernels/pool_quest.py`` with kernels on, plain PyTorch otherwise, then
  ``torch.topk``) before the launch, which then reads only those pages (``selected`` mode). Rows are (sequence,
  KV head) pairs, not sequences, so sequences under different plans share a launch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from headwise.kernels.common import host_to_device
from headwise.kernels.decode_reference import batch_decode_reference
from headwise.policies.base import PagedLayout
from headwise.policies.stores import DenseStore, SinkWindowStore
from headwise.pool import GroupPages, PagePool, pool_layout

if TYPE_CHECKING:
    from headwise.kernels.paged_prefill import PrefillPlan  # imports Triton


def _gather(pool: PagePool, pages: GroupPages, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``slots`` (int [m]) of every head of the group: ``[1, heads, m, head_dim]`` each."""
    table = pages.table(slots.device).long()
    phys = table[:, torch.div(slots, pool.page_size, rounding_mode="floor")]  # [heads, m]
    within = (slots % pool.page_size)[None].expand_as(phys)
    return pool.keys[phys, within][None], pool.values[phys, within][None]


def _gather_prefix(pool: PagePool, pages: GroupPages, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of slots ``0 .. n-1`` of every head of the group, ``[1, heads, n, head_dim]`` each: whole pages
    copied, one ``index_select`` over page ids per half (a token-by-token gather indexes every slot with two int64
    tensors of its own; at a 64K prefix that cost as much as the attention it fed)."""
    P = pool.page_size
    used = -(-n // P)
    table = pages.table(pool.keys.device)[:, :used]  # [heads, used]
    heads, D = table.shape[0], pool.spec.head_dim
    ids = table.reshape(-1)
    keys = pool.keys.index_select(0, ids).view(heads, used * P, D)[:, :n]
    values = pool.values.index_select(0, ids).view(heads, used * P, D)[:, :n]
    return keys[None], values[None]


def _check_room(pool: PagePool, pages: GroupPages, slots: int) -> None:
    held = len(pages.pages[0]) * pool.page_size
    if slots > held:
        raise RuntimeError(f"a paged store needs {slots} slots but its pages hold {held}: the engine grows a "
                           "sequence's pages (SequencePages.grow) before every step")


class PagedDenseStore(DenseStore):
    """A ``DenseStore`` whose tokens live in the sequence's pool pages: position ``p`` in slot ``p``."""

    def __init__(self, pool: PagePool, pages: GroupPages, device: torch.device, dtype: torch.dtype):
        super().__init__(1, pages.heads, pool.spec.head_dim, device, dtype)
        self.pool, self.pages, self.layout = pool, pages, PagedLayout()

    @property
    def capacity(self) -> int:
        return len(self.pages.pages[0]) * self.pool.page_size

    def reserve(self, total: int) -> None:
        """Nothing to allocate: the engine grows the sequence's pages before every step."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        _check_room(self.pool, self.pages, self.length + n)
        slots = torch.arange(self.length, self.length + n, device=self.device)
        self.pool.write(self.pages.table(self.device)[None], slots[None], k, v)
        self.length += n

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        raise RuntimeError("a paged store's decode steps run batched over the pool (HeadwiseCache.graph_blockers)")

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token, ``[1, heads, length, head_dim]``: gathered from the pages (a copy)."""
        return _gather_prefix(self.pool, self.pages, self.length)


class PagedRingStore(SinkWindowStore):
    """A ``SinkWindowStore`` (no compensation) whose slots live in the sequence's pool pages."""

    def __init__(self, pool: PagePool, pages: GroupPages, layout: PagedLayout, device: torch.device,
                 dtype: torch.dtype):
        super().__init__(1, pages.heads, pool.spec.head_dim, device, dtype, layout.sink, layout.window)
        self.pool, self.pages, self.layout = pool, pages, layout

    @property
    def capacity(self) -> int:
        """Slots holding a token: at most ``sink + window``."""
        return min(self.seen, self.max_slots)

    def reserve(self, total: int) -> None:
        """Nothing to allocate: the engine grows the sequence's pages (its ring) before every step."""

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write positions ``seen .. seen+n-1``: the sinks among them and the last ``window`` (the others would be
        overwritten within the chunk)."""
        n = k.shape[2]
        _check_room(self.pool, self.pages, min(self.seen + n, self.max_slots))
        # The kept tokens of the chunk, from host ints: the sinks among them, then the last ``window`` from where
        # the sinks end. Made on the device (no boolean mask to compact, no host tensor to copy: on a GPU either
        # would stop the host until the device drains, in every layer of every prompt chunk).
        sinks = max(0, min(n, self.sink - self.seen))
        tail = max(sinks, n - self.window)
        idx = torch.arange(tail, n, device=k.device)
        if sinks:
            idx = torch.cat([torch.arange(sinks, device=k.device), idx])
        slots = self.layout.slots(idx.to(self.device) + self.seen)
        self.pool.write(self.pages.table(self.device)[None], slots[None], k.index_select(2, idx),
                        v.index_select(2, idx))
        self.seen += n

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        raise RuntimeError("a paged store's decode steps run batched over the pool (HeadwiseCache.graph_blockers)")

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[1, heads, slots, head_dim]`` of the slots holding a token (gathered from the pages: a
        copy) and their positions ``[slots]``: slot ``s`` past the sinks holds the newest position ``p < seen``
        with ``p = s (mod window)``."""
        held = self.capacity
        slots = torch.arange(held, device=self.device)
        keys, values = _gather_prefix(self.pool, self.pages, held)  # every slot of the ring's pages
        last = self.seen - 1
        positions = torch.where(slots < self.sink, slots, last - (last - slots) % max(1, self.window))
        return keys, values, positions


class PagedQuestStore(PagedDenseStore):
    """``page_topk``'s store in the pool (Quest): the tokens in the sequence's pages as ``PagedDenseStore``, and the
    channel-wise min and max key of each page in its bound pages (``GroupPages.bound_pages``: page ``i``'s min key in
    the key half of slot ``i % page_size`` of bound page ``i // page_size``, its max key in the value half), written
    through ``PagePool.write`` whenever a token is: the bounds ``stores.PagedStore`` keeps, in the pool."""

    def __init__(self, pool: PagePool, pages: GroupPages, layout: PagedLayout, device: torch.device,
                 dtype: torch.dtype):
        super().__init__(pool, pages, device, dtype)
        self.layout = layout

    @property
    def num_pages(self) -> int:
        """Pages holding at least one token."""
        return -(-self.length // self.pool.page_size)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [1, heads, n, head_dim]`` and refresh the bounds of every page they touch (a page already
        partly filled is reduced again over all its tokens)."""
        start = self.length
        super().append(k, v)
        P = self.pool.page_size
        pages = torch.arange(start // P, self.num_pages, device=self.device)  # [m]
        slots = pages[:, None] * P + torch.arange(P, device=self.device)  # [m, P]
        keys, _ = _gather(self.pool, self.pages, slots.reshape(-1).clamp(max=self.capacity - 1))
        keys = keys.view(self.pages.heads, len(pages), P, -1)
        past = (slots >= self.length)[None, :, :, None]  # slots holding no token yet
        low = keys.masked_fill(past, float("inf")).amin(dim=2)  # [heads, m, D]
        high = keys.masked_fill(past, float("-inf")).amax(dim=2)
        self.pool.write(self.pages.bound_table(self.device)[None], pages[None], low[None], high[None])

    def page_bounds(self) -> torch.Tensor:
        """Bounds of the pages in use, ``[1, heads, num_pages, 2, head_dim]`` (as ``stores.PagedStore.page_bounds``),
        gathered from the bound pages (a copy)."""
        pages = torch.arange(self.num_pages, device=self.device)
        table = self.pages.bound_table(self.device).long()
        phys = table[:, torch.div(pages, self.pool.page_size, rounding_mode="floor")]  # [heads, m]
        within = (pages % self.pool.page_size)[None].expand_as(phys)
        return torch.stack([self.pool.keys[phys, within], self.pool.values[phys, within]], dim=2)[None]


PagedStore = PagedDenseStore | PagedRingStore


def paged_store(pool: PagePool, pages: GroupPages, device: torch.device, dtype: torch.dtype) -> PagedStore | None:
    """The paged store of a group under the pool (None: the group's policy keeps its own store)."""
    layout = pool_layout(pages.policy, pool.page_size)
    if layout is None:
        return None
    if layout.select:
        return PagedQuestStore(pool, pages, layout, device, dtype)
    if layout.window:
        return PagedRingStore(pool, pages, layout, device, dtype)
    return PagedDenseStore(pool, pages, device, dtype)


@dataclass
class PoolDecodeRow:
    """One decode token of one sequence's paged head group, for ``decode_over_pool``."""

    store: PagedStore
    kv_heads: tuple[int, ...]  # the group's KV heads (KV head ``h``'s query heads are ``h * group ..``, GQA order)
    token: int  # the token's index on the forward's token axis


@dataclass
class PoolPrefillRow:
    """A prompt chunk (several tokens) of one sequence's paged head group whose policy prefills densely
    (``Policy.dense_prefill``), its keys and values already written into its pages, for ``prefill_over_pool``."""

    store: PagedDenseStore
    kv_heads: list[int]  # the group's KV heads (KV head ``h``'s query heads are ``h * group ..``, GQA order)
    token: int  # the chunk's first token on the forward's token axis
    length: int  # its tokens
    start: int  # the position of its first token (the keys before it)


@dataclass
class PoolRows:
    """The work of one layer's forward that runs over the pool, all sequences at once, after each sequence's own
    groups attended: decode tokens (``decode_over_pool``) and dense prompt chunks (``prefill_over_pool``)."""

    decode: list[PoolDecodeRow] = field(default_factory=list)
    prefill: list[PoolPrefillRow] = field(default_factory=list)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor, scale: float,
               use_kernels: bool) -> None:
        """query, out: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (the forward's tokens)."""
        if self.prefill:
            prefill_over_pool(self.prefill, query, out, scale)
        if self.decode:
            decode_over_pool(self.decode, query, key, value, out, scale, use_kernels)


def prefill_over_pool(rows: list[PoolPrefillRow], query: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """Attend the prompt chunks of ``rows`` (one layer) causally over their pages: one ``paged_prefill`` launch for
    every (sequence, KV head) pair of every chunk (Triton, only with kernels on: the engine takes this path then, and
    the policy's ``attend`` over a gathered copy otherwise). The chunks' keys and values are in the pages already
    (``PagedDenseStore.append``). query, out: [1, Hq, T, D]; ``out`` receives each chunk's query heads at its
    tokens."""
    from headwise.kernels.paged_prefill import default_config, paged_prefill  # Triton: kernels on only

    pool = rows[0].store.pool
    group = pool.spec.group_size
    device = query.device
    block_m = default_config(query.shape[-1], pool.keys.dtype)["block_m"]
    pairs = tuple((r.token, r.length, r.start, h * group) for r in rows for h in r.kv_heads)
    plan = _prefill_plan(pairs, group, str(device), block_m)
    table = _padded_tables([r.store.pages.table(device) for r in rows])[:, 0]  # [pairs, W]
    paged_prefill(query[0].transpose(0, 1), pool.keys, pool.values, table, plan, pool.page_size, scale=scale,
                  out=out[0].transpose(0, 1), block_m=block_m)


@functools.lru_cache(maxsize=64)
def _prefill_plan(pairs: tuple[tuple[int, int, int, int], ...], group: int, device: str, block_m: int) -> PrefillPlan:
    """The launch plan of rows (token, length, start, first query head), made once for every layer whose dense groups
    have the same rows in a forward (a dense plan: all of them), as vLLM's metadata builder runs once per batch: one
    host-to-device copy per forward instead of one per layer. Plans are never written after they are made."""
    from headwise.kernels.paged_prefill import plan_paged_prefill

    token0, lengths, starts, head0 = (list(c) for c in zip(*pairs))
    return plan_paged_prefill(token0, lengths, starts, head0, group, device, block_m=block_m)


def _padded_tables(tables: list[torch.Tensor]) -> torch.Tensor:
    """Page tables ``[heads_i, pages_i]`` of several rows stacked into ``[sum heads_i, 1, max pages]`` (zero padded:
    entries past a row's pages are never read)."""
    width = max(1, max(t.shape[1] for t in tables))
    return torch.cat([t if t.shape[1] == width else torch.nn.functional.pad(t, (0, width - t.shape[1]))
                      for t in tables])[:, None]


def _slot(layout: PagedLayout, position: int) -> int:
    """``layout.slots`` of one host position, in host ints."""
    if not layout.window or position < layout.sink:
        return position
    return layout.sink + (position - layout.sink) % layout.window


@functools.lru_cache(maxsize=32)
def _step_rows(rows: tuple[tuple[int, int, int, int, int], ...], device: str) -> torch.Tensor:
    """Decode rows' (slot, position, token, pages per head, bound pages per head), as host ints, on ``device`` as a long
    ``[5, rows]``: made once for every layer whose rows of a layout have the same values in a step (every layer,
    unless the layers' groups differ: a sequence's groups of one layout are at the same position in each layer), one
    host-to-device copy per step instead of one per layer. Never written after it is made."""
    return host_to_device(torch.tensor(list(zip(*rows)), dtype=torch.long), device)


@dataclass(frozen=True)
class _PairHeads:
    """The (row, KV head) pairs of a layer's decode rows of one layout, on the device (long): each pair's row, its
    index among its row's KV heads and its KV head; the query heads of the pairs (GQA order) and the pair of each;
    the KV heads of each row."""

    row: torch.Tensor  # [pairs]
    index: torch.Tensor  # [pairs]
    kv: torch.Tensor  # [pairs]
    q: torch.Tensor  # [pairs * group]
    q_pair: torch.Tensor  # [pairs * group]
    heads: torch.Tensor  # [rows]


@functools.lru_cache(maxsize=256)
def _pair_heads(heads: tuple[tuple[int, ...], ...], group: int, device: str) -> _PairHeads:
    """``_PairHeads`` of rows whose KV heads are ``heads``: one host-to-device copy, made again only when a layer's
    decode rows change (a sequence joins or leaves the batch), not at every step. Never written after it is made."""
    kv = [h for hs in heads for h in hs]
    parts = [[i for i, hs in enumerate(heads) for _ in hs], [j for hs in heads for j in range(len(hs))], kv,
             [h * group + g for h in kv for g in range(group)], [p for p in range(len(kv)) for _ in range(group)],
             [len(hs) for hs in heads]]
    on_device = host_to_device(torch.tensor([x for part in parts for x in part], dtype=torch.long), device)
    return _PairHeads(*on_device.split([len(part) for part in parts]))


@functools.lru_cache(maxsize=8)
def _zero(device: str) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def _pair_tables(tables: list[torch.Tensor], heads: _PairHeads, row_widths: torch.Tensor, widths: torch.Tensor,
                 width: int, device: torch.device) -> torch.Tensor:
    """The tables of a layer's decode rows (``[heads_i, pages_i]`` each, on the device) as the ``[pairs, 1, width]``
    table of their (row, KV head) pairs, zero padded (entries past a pair's pages are never read): one
    concatenation of them all and one gather, whatever the number of rows (a pad of each row's table cost a copy per
    row in every layer). row_widths: long [rows], each row's pages per head; widths: long [pairs], its pair's;
    width: a host int, their maximum."""
    sizes = heads.heads * row_widths
    base = (sizes.cumsum(0) - sizes).index_select(0, heads.row) + heads.index * widths  # each pair's first entry
    cols = torch.arange(max(1, width), device=device)
    total = sum(t.numel() for t in tables)  # the zero appended below
    index = torch.where(cols < widths[:, None], base[:, None] + cols, total)
    return torch.cat([*(t.reshape(-1) for t in tables), _zero(str(device))])[index][:, None]


def refresh_newest_bounds(pool: PagePool, table: torch.Tensor, bound_table: torch.Tensor,
                           positions: torch.Tensor) -> None:
    """Write the bounds of the page holding each row's newest token (a decode step's write), over the page's tokens
    up to it. table, bound_table: [rows, 1, pages] (``_pair_tables``); positions: long [rows] on the device."""
    P = pool.page_size
    page = torch.div(positions, P, rounding_mode="floor")  # [rows]
    phys = table[:, 0].long().gather(1, page[:, None])  # [rows, 1]
    within = torch.arange(P, device=positions.device)
    keys = pool.keys[phys, within[None]]  # [rows, P, D]
    past = (page[:, None] * P + within[None] > positions[:, None])[:, :, None]
    low = keys.masked_fill(past, float("inf")).amin(dim=1)  # [rows, D]
    high = keys.masked_fill(past, float("-inf")).amax(dim=1)
    pool.write(bound_table, page[:, None], low[:, None, None], high[:, None, None])


def pool_page_scores_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_size: int,
                               bound_table: torch.Tensor, lengths: torch.Tensor, n_cols: int) -> torch.Tensor:
    """Quest page scores of a batch of rows over their bound pages, vectorised over the rows (plain PyTorch; the
    Triton kernel is ``kernels.pool_quest.pool_page_scores``).

    q: [rows, group, D] (the query heads sharing each row's KV head); k_pool, v_pool: the pool's
    ``[pages, page_size, D]`` (``PagePool.keys``, ``.values``), where page ``i``'s min key is slot ``i % page_size`` of
    key page ``bound_table[r, 0, i // page_size]`` and its max key the same slot of the value page;
    bound_table: [rows, 1, bound pages]; lengths: int [rows] on q's device (tokens each row holds); ``n_cols``, a host
    int, the columns (``ceil(max_len / page_size)``: sizes the work, no host sync). Each page scores
    ``sum_d max(q_d min_d, q_d max_d)`` summed over the group, in fp32 (``quest_page_scores_reference``), the first and
    the newest page +inf, columns past a row's pages -inf. Returns fp32 [rows, n_cols]. Gathers every row's bounds
    into fp32 (``2 * D * 4`` bytes per page) before scoring them."""
    P = page_size
    n_pages = torch.div(lengths.long() + P - 1, P, rounding_mode="floor").clamp(max=n_cols)  # [rows]
    pages = torch.arange(n_cols, device=q.device)
    col = torch.div(pages, P, rounding_mode="floor").clamp(max=bound_table.shape[2] - 1)
    phys = bound_table[:, 0].long()[:, col]  # [rows, n_cols]
    low, high = k_pool[phys, pages % P].float(), v_pool[phys, pages % P].float()  # [rows, n_cols, D]
    qf = q.float()
    scores = torch.einsum("rpd,rd->rp", high, qf.clamp(min=0).sum(dim=1))
    scores += torch.einsum("rpd,rd->rp", low, qf.clamp(max=0).sum(dim=1))
    rows = torch.arange(q.shape[0], device=q.device)
    scores[:, 0] = float("inf")
    scores[rows, (n_pages - 1).clamp(min=0)] = float("inf")
    return scores.masked_fill(pages[None] >= n_pages[:, None], float("-inf"))


def select_pool_pages(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_size: int,
                      bound_table: torch.Tensor, lengths: torch.Tensor, max_len: int, select: int,
                      use_kernels: bool = False) -> torch.Tensor:
    """Quest's page choice for a batch of rows over their bound pages: the scores (shapes as
    ``pool_page_scores_reference``; the Triton kernel with ``use_kernels``), then the ``select`` best pages of each row
    (all while fewer exist), as ``int32 [rows, 1, k]`` logical pages, -1 padded: the pages ``PageTopK.select`` picks
    from the same bounds. ``max_len`` (host int) bounds ``lengths``."""
    n_cols = max(1, -(-max_len // page_size))
    if use_kernels:
        from headwise.kernels.pool_quest import pool_page_scores  # Triton, only when kernels are asked for

        scores = pool_page_scores(q, k_pool, v_pool, page_size, bound_table, lengths, n_cols)
    else:
        scores = pool_page_scores_reference(q, k_pool, v_pool, page_size, bound_table, lengths, n_cols)
    n_pages = torch.div(lengths.long() + page_size - 1, page_size, rounding_mode="floor")
    chosen = torch.topk(scores, min(select, n_cols), dim=-1, sorted=False).indices  # [rows, k]
    chosen = torch.where(chosen < n_pages[:, None], chosen, -1)  # picks past a short row's pages
    return chosen.to(torch.int32)[:, None]


def decode_over_pool(rows: list[PoolDecodeRow], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     out: torch.Tensor, scale: float, use_kernels: bool) -> None:
    """Attend the decode tokens of ``rows`` (one layer), all sequences at once: write each token's key and value into
    its pages, then one ``batch_decode`` launch per (ring size, pages selected) over every (sequence, KV head) pair.
    For a ``select`` layout (Quest) the newest page's bounds are refreshed and the pages chosen first
    (``select_pool_pages``); the launch then reads only those.

    query, out: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (the forward's tokens); ``out`` receives each row's
    query heads at its token."""
    by_layout: dict[tuple[int, int], list[PoolDecodeRow]] = {}
    for r in rows:
        by_layout.setdefault((r.store.layout.ring, r.store.layout.select), []).append(r)
    D = query.shape[-1]
    device = query.device
    dev = str(device)
    for (ring, select), rs in by_layout.items():
        pool = rs[0].store.pool
        # Host ints per row only: the rows' positions, slots, tokens and table widths cross to the device once per
        # step (``_step_rows``), their heads once per batch (``_pair_heads``), and the tables, kept on the device by
        # each group (``GroupPages.table``), are joined by one gather (``_pair_tables``): no host-to-device copy, pad
        # or clone per row in any layer (a mixed step of 32 decode rows at 32 layers made ~1,500 of each).
        host = [(_slot(r.store.layout, r.store.tokens), r.store.tokens, r.token, len(r.store.pages.pages[0]),
                 len(r.store.pages.bound_pages[0])) for r in rs]
        per_row = _step_rows(tuple(host), dev)  # [5, rows]
        heads = _pair_heads(tuple(r.kv_heads for r in rs), pool.spec.group_size, dev)
        slots, positions, tokens, widths, bound_widths = per_row.index_select(1, heads.row).unbind(0)  # per pair
        table = _pair_tables([r.store.pages.table(dev) for r in rs], heads, per_row[3], widths,
                             max(h[3] for h in host), device)  # [pairs, 1, W]
        # One gather each for the rows' queries, keys and values, and one scatter of their outputs below, instead of a
        # launch per row (a mixed step of 54 decode rows at 32 layers made ~15,000 such launches).
        q_tokens = tokens.index_select(0, heads.q_pair)
        q = query[0, heads.q, q_tokens]  # [pairs * group, D]
        k = key[0, heads.kv, tokens]  # [pairs, D]
        v = value[0, heads.kv, tokens]
        pairs = k.shape[0]
        pool.write(table, slots[:, None], k[:, None, None], v[:, None, None])
        lengths = (positions + 1).to(torch.int32)
        max_len = max(h[1] for h in host) + 1
        qp = q.view(pairs, -1, D)
        selected = None
        if select:
            bound_table = _pair_tables([r.store.pages.bound_table(dev) for r in rs], heads, per_row[4],
                                       bound_widths, max(h[4] for h in host), device)
            refresh_newest_bounds(pool, table, bound_table, positions)
            selected = select_pool_pages(qp, pool.keys, pool.values, pool.page_size, bound_table, lengths, max_len,
                                         select, use_kernels)
        if use_kernels:
            from headwise.kernels.batch_decode import batch_decode  # Triton, only when kernels are asked for

            o = batch_decode(qp, pool.keys, pool.values, table, lengths, max_len, pool.page_size, ring=ring,
                             selected=selected, scale=scale)
        else:
            o = batch_decode_reference(qp, pool.keys, pool.values, table, lengths, pool.page_size, ring=ring,
                                       selected=selected, scale=scale)
        out[0, heads.q, q_tokens] = o.reshape(-1, D).to(out.dtype)  # one scatter: (head, token) pairs are distinct
        for r in rs:
            r.store.advance(1)
