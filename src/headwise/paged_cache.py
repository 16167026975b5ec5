"""KV of a sequence's head groups in the engine's page pool, and the batched decode step over it.

Under an engine with a ``PagePool`` (``Engine(pool=...)``, which allocates its pages once), the head groups whose
policy has a ``paged_layout`` keep their keys and values in the sequence's pool pages (``SequencePages``) instead
of tensors of their own: ``PagedDenseStore`` (every token in position order: ``full``, and prefill patterns that
decode with it) and ``PagedRingStore`` (``streaming``'s sinks and ring, in ``SinkWindowStore``'s slot layout).
Every write goes through ``PagePool.write``. Other policies (``page_topk``, ``tidal``, ``recycled``,
``quantized``, ``streaming`` with compensation) keep their own stores beside the pool, counted in its pages.

- A prompt chunk of several tokens runs the policy's own ``attend``, as without a pool: the store gathers the
  slots it holds from its pages (``view``: a copy, as the reference path reads a contiguous cache), the policy
  attends over them and the chunk, and the store writes the chunk into its pages.
- One-token steps are attended together (``decode_over_pool``): in each layer, every (sequence, KV head) pair
  of a paged group whose layout holds the same number of slots is a row of one ``batch_decode`` launch (the
  Triton kernel with kernels on, its plain-PyTorch reference ``batch_decode_reference`` otherwise), after the
  token's key and value are written through the page tables. Rows are (sequence, KV head) pairs, not sequences,
  so sequences under different plans share a launch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from headwise.kernels.decode_reference import batch_decode_reference
from headwise.policies.base import PagedLayout
from headwise.policies.stores import DenseStore, SinkWindowStore
from headwise.pool import GroupPages, PagePool


def _gather(pool: PagePool, pages: GroupPages, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of ``slots`` (int [m]) of every head of the group: ``[1, heads, m, head_dim]`` each."""
    table = pages.table(slots.device).long()
    phys = table[:, torch.div(slots, pool.page_size, rounding_mode="floor")]  # [heads, m]
    within = (slots % pool.page_size)[None].expand_as(phys)
    return pool.keys[phys, within][None], pool.values[phys, within][None]


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
        return _gather(self.pool, self.pages, torch.arange(self.length, device=self.device))


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
        pos = torch.arange(self.seen, self.seen + n)
        keep = (pos < self.sink) | (pos >= self.seen + n - self.window)
        _check_room(self.pool, self.pages, min(self.seen + n, self.max_slots))
        idx = keep.nonzero()[:, 0].to(k.device)
        slots = self.layout.slots(pos[keep]).to(self.device)
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
        keys, values = _gather(self.pool, self.pages, slots)
        last = self.seen - 1
        positions = torch.where(slots < self.sink, slots, last - (last - slots) % max(1, self.window))
        return keys, values, positions


PagedStore = PagedDenseStore | PagedRingStore


def paged_store(pool: PagePool, pages: GroupPages, device: torch.device, dtype: torch.dtype) -> PagedStore | None:
    """The paged store of a group under the pool (None: the group's policy keeps its own store)."""
    layout = pages.policy.paged_layout()
    if layout is None:
        return None
    if layout.window:
        return PagedRingStore(pool, pages, layout, device, dtype)
    return PagedDenseStore(pool, pages, device, dtype)


@dataclass
class PoolDecodeRow:
    """One decode token of one sequence's paged head group, for ``decode_over_pool``."""

    store: PagedStore
    q_index: torch.Tensor  # the group's query heads, GQA order
    kv_index: torch.Tensor  # the group's KV heads
    token: int  # the token's index on the forward's token axis


def decode_over_pool(rows: list[PoolDecodeRow], query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     out: torch.Tensor, scale: float, use_kernels: bool) -> None:
    """Attend the decode tokens of ``rows`` (one layer), all sequences at once: write each token's key and value into
    its pages, then one ``batch_decode`` launch per ring size over every (sequence, KV head) pair.

    query, out: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (the forward's tokens); ``out`` receives each row's
    query heads at its token."""
    by_ring: dict[int, list[PoolDecodeRow]] = {}
    for r in rows:
        by_ring.setdefault(r.store.layout.ring, []).append(r)
    D = query.shape[-1]
    device = query.device
    for ring, rs in by_ring.items():
        pool = rs[0].store.pool
        heads = [len(r.kv_index) for r in rs]
        q = torch.cat([query[0, r.q_index, r.token] for r in rs])  # [pairs * group, D]
        k = torch.cat([key[0, r.kv_index, r.token] for r in rs])  # [pairs, D]
        v = torch.cat([value[0, r.kv_index, r.token] for r in rs])
        pairs = k.shape[0]
        pos = torch.tensor([r.store.tokens for r in rs])  # host counts: the decode token's position, per row
        slot = torch.cat([r.store.layout.slots(pos[i : i + 1]) for i, r in enumerate(rs)])
        per_head = torch.tensor(heads)
        positions, slots = pos.repeat_interleave(per_head), slot.repeat_interleave(per_head)
        tables = [r.store.pages.table(device) for r in rs]
        width = max(t.shape[1] for t in tables)
        table = torch.cat([torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in tables])[:, None]  # [pairs, 1, W]
        pool.write(table, slots[:, None].to(device), k[:, None, None], v[:, None, None])
        lengths = (positions + 1).to(device=device, dtype=torch.int32)
        qp = q.view(pairs, -1, D)
        if use_kernels:
            from headwise.kernels.batch_decode import batch_decode  # Triton, only when kernels are asked for

            o = batch_decode(qp, pool.keys, pool.values, table, lengths, int(positions.max()) + 1, pool.page_size,
                             ring=ring, scale=scale)
        else:
            o = batch_decode_reference(qp, pool.keys, pool.values, table, lengths, pool.page_size, ring=ring,
                                       scale=scale)
        o = o.reshape(-1, D)
        at = 0
        for r in rs:
            n = len(r.q_index)
            out[0, :, r.token].index_copy_(0, r.q_index, o[at : at + n])
            at += n
            r.store.advance(1)
