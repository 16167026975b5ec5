"""KV memory in fixed-size pages: one pool per model, page tables per sequence and (layer, head group).

A *page* is ``page_size`` token slots of one KV head (its keys and values): ``page_size * 2 * head_dim *
dtype_bytes`` bytes. The pool is sized once from a memory budget (``PagePool(spec, budget_bytes)``, or
``PagePool.from_free_memory`` for a fraction of the free GPU memory, as vLLM's ``gpu_memory_utilization``)
and hands out page ids; a sequence's ``SequencePages`` holds, for every (layer, head group) of its plan, the
pages of each of the group's KV heads:

- ``full`` heads take pages as they grow; ``page_topk`` heads (Quest) too, plus a *bound page* per ``page_size`` of
  their pages, holding those pages' min and max keys (``head_pages``);
- ``streaming`` heads take the pages of their ring as its slots fill, up to ``sink + window`` slots, then
  hold that ring for good (a plan never holds more than the tokens it has seen, nor more than dense);
- layers with a native sliding window hold their window (``plan.resolve``).

Pages go back when the sequence ends or is preempted. The engine asks for a sequence's pages before every
step that grows it (``Engine.step``): admission is counting free pages, and when the pool runs dry the newest
sequence is preempted (its pages freed, its tokens recomputed later). KV bytes reported = pages held x page
bytes.

The pages themselves are one tensor, allocated once (``PagePool.allocate``, which ``Engine(pool=...)`` calls):
``kv: [num_pages + 1, 2, page_size, head_dim]``, written only through ``PagePool.write``. The last page
(``PagePool.scratch``) is never handed out: the padding rows of a decode step at a padded batch size
(``batch_graphs.py``) write their token there, so they never touch a sequence's pages. The groups whose policy has
a ``paged_layout`` the pool can hold (``pool_layout``: ``full``, ``streaming`` without compensation, prefill patterns
decoding with ``full``, ``page_topk`` with exact bounds and pages of the pool's size) keep their KV there
(``paged_cache.py``); the others (``tidal``, ``recycled``, ``quantized``, streaming with compensation, ``page_topk``
with e4m3 bounds or another page size) keep their own store tensors beside the pool while their pages are counted,
so a plan of those holds more memory than the pool.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from headwise.errors import BudgetError, InputError
from headwise.kernels.common import host_to_device
from headwise.plan import HeadPlan, resolve
from headwise.policies import Policy
from headwise.policies.base import PagedLayout
from headwise.spec import ModelSpec

DEFAULT_PAGE_SIZE = 16  # tokens per page, as vLLM's default block size and Quest's page


@dataclass(frozen=True)
class KVMemory:
    """A KV memory budget as ``--kv-memory`` gives it: ``gb`` gigabytes (10^9 bytes), or a ``fraction`` of the
    device's free memory at start-up, after the weights are loaded (vLLM's ``gpu_memory_utilization`` counts the
    whole device; this counts what is left)."""

    gb: float | None = None
    fraction: float | None = None

    @classmethod
    def parse(cls, text: str) -> KVMemory:
        """``"40"`` (GB) or ``"90%"`` (of free device memory)."""
        raw = str(text).strip()
        try:
            number = float(raw[:-1] if raw.endswith("%") else raw)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0) or (raw.endswith("%") and number > 100):
            raise InputError(f"--kv-memory takes gigabytes (e.g. 40) or a share of free device memory (e.g. 90%), "
                             f"got {text!r}")
        return cls(fraction=number / 100) if raw.endswith("%") else cls(gb=number)

    def pool(self, spec: ModelSpec, device: torch.device, dtype_bytes: int, page_size: int = DEFAULT_PAGE_SIZE,
             ) -> PagePool:
        """The page pool this budget sizes for ``spec``'s pages on ``device``."""
        if self.fraction is not None:
            return PagePool.from_free_memory(spec, self.fraction, device, dtype_bytes, page_size)
        assert self.gb is not None
        return PagePool(spec, int(self.gb * 1e9), dtype_bytes, page_size)


class PagePool:
    """Free list of ``num_pages`` pages of ``page_size`` token slots of one KV head each."""

    def __init__(self, spec: ModelSpec, budget_bytes: int, dtype_bytes: int = 2, page_size: int = DEFAULT_PAGE_SIZE):
        if page_size < 1:
            raise BudgetError(f"page size must be a positive number of tokens, got {page_size}")
        self.spec, self.page_size = spec, page_size
        self.page_bytes = page_size * 2 * spec.head_dim * dtype_bytes  # keys + values of one head
        self.num_pages = int(budget_bytes) // self.page_bytes
        if self.num_pages < 1:
            raise BudgetError(f"a KV budget of {budget_bytes} bytes holds no page of {self.page_bytes} bytes "
                              f"({page_size} tokens of one KV head); raise --kv-memory")
        # Free pages: the ones never handed out (ids ``_fresh ..``), then the ones given back; no list of every
        # page id (a 60 GiB pool of bf16 pages for head_dim 128 has 15.7M of them).
        self._fresh = 0
        self._returned: list[int] = []
        self.kv: torch.Tensor | None = None  # the pages themselves, once ``allocate`` made them
        # Groups (by id) whose page lists grew (``SequencePages.grow``) since their tables were last brought to a
        # device: the first table asked for after a step's growth brings all of them (``sync_tables``).
        self._grown: dict[int, GroupPages] = {}

    @property
    def scratch(self) -> int:
        """The id of the page no sequence holds (the last one allocated): padding rows write there."""
        return self.num_pages

    def allocate(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Allocate the pages, once: ``kv: [num_pages + 1, 2, page_size, head_dim]`` (a page's keys, then its values,
        contiguous; the last page is ``scratch``). An engine over an allocated pool keeps the KV of ``paged_layout``
        policies in these pages."""
        if self.kv is not None:
            raise BudgetError("the page pool is allocated already (one allocation, at start-up)")
        itemsize = torch.empty((), dtype=dtype).element_size()
        if itemsize * self.page_size * 2 * self.spec.head_dim != self.page_bytes:
            raise BudgetError(f"the pool was sized for pages of {self.page_bytes} bytes; {dtype} pages would not be")
        self.kv = torch.empty(self.num_pages + 1, 2, self.page_size, self.spec.head_dim, device=device, dtype=dtype)

    @property
    def keys(self) -> torch.Tensor:
        """Every page's keys, ``[num_pages, page_size, head_dim]`` (a view of ``kv``)."""
        assert self.kv is not None, "PagePool.allocate first"
        return self.kv[:, 0]

    @property
    def values(self) -> torch.Tensor:
        assert self.kv is not None, "PagePool.allocate first"
        return self.kv[:, 1]

    def write(self, table: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write keys and values at token slots through page tables: the one write path into the pages.

        table: int [N, H, pages] (row ``n``'s logical -> physical pages); slots: int [N, T] on the pool's device,
        the slot of each of row ``n``'s ``T`` tokens (``PagedLayout.slots`` of its position); k, v: [N, H, T, D].
        Everything is indexed on the device (no host value enters the copy), as gpt-fast's
        ``KVCache.update(input_pos, ...)``, so a CUDA graph could replay it. The pages must be in the table already
        (``SequencePages.grow``) and the slots of one call distinct (a ring keeps at most its ``window`` newest
        tokens of a chunk: the older ones would be overwritten within the call)."""
        P = self.page_size
        N, H, T, D = k.shape
        logical = torch.div(slots, P, rounding_mode="floor").long()  # [N, T]
        phys = table.gather(2, logical[:, None, :].expand(N, H, T)).reshape(-1).long()  # [N * H * T]
        within = (slots.long() % P)[:, None, :].expand(N, H, T).reshape(-1)
        self.keys.index_put_((phys, within), k.reshape(-1, D).to(self.keys.dtype))
        self.values.index_put_((phys, within), v.reshape(-1, D).to(self.values.dtype))

    @classmethod
    def from_free_memory(cls, spec: ModelSpec, fraction: float, device: torch.device, dtype_bytes: int = 2,
                         page_size: int = DEFAULT_PAGE_SIZE) -> PagePool:
        """A pool of ``fraction`` of the device's free memory now (after the weights are loaded)."""
        if not 0 < fraction <= 1:
            raise BudgetError(f"the KV memory fraction must be in (0, 1], got {fraction}")
        if device.type != "cuda":
            raise BudgetError(f"a share of free memory needs a CUDA device, not {device.type}; give --kv-memory in GB")
        free, _ = torch.cuda.mem_get_info(device)
        return cls(spec, int(free * fraction), dtype_bytes, page_size)

    def sync_tables(self, device: torch.device | str) -> None:
        """Extend the page and bound-page tables on ``device`` of every group whose pages grew since its tables were
        last made (``SequencePages.grow``), all at once: the new page ids of every such group of every sequence and
        layer cross from the host in one copy, sliced on the device into each group's table (``GroupPages.table``
        asks for this before it hands a table out). A growing step took a page in every layer of each sequence that
        crossed a page boundary; extending each group's table at its first use instead made one host-to-device copy
        per (sequence, layer, group). A group whose tables live on another device is left to ``GroupPages.table``."""
        grown, self._grown = self._grown, {}
        key = str(device)
        pieces: list[tuple[GroupPages, str, list[list[int]], torch.Tensor | None, int]] = []
        for g in grown.values():
            for attr, lists in (("_table", g.pages), ("_bound_table", g.bound_pages)):
                width = len(lists[0]) if lists else 0
                cached = getattr(g, attr)
                if cached is None:
                    if width:
                        pieces.append((g, attr, lists, None, 0))
                elif cached[0] == key and cached[1].shape[-1] < width:
                    pieces.append((g, attr, lists, cached[1], cached[1].shape[-1]))
        if len(pieces) == 1:  # one table: its new columns as ``[heads, new]``, as GroupPages.table would copy them
            g, attr, lists, _, _ = pieces[0]
            setattr(g, attr, _extended(getattr(g, attr), lists, device))
            return
        if not pieces:
            return
        ids = [p for _, _, lists, _, start in pieces for head in lists for p in head[start:]]
        new = host_to_device(torch.tensor(ids, dtype=torch.int32), device)
        at = 0
        for g, attr, lists, old, start in pieces:
            shape = (len(lists), len(lists[0]) - start)
            part = new[at : at + shape[0] * shape[1]].view(shape)
            at += shape[0] * shape[1]
            setattr(g, attr, (key, part if old is None else torch.cat([old, part], dim=1)))

    @property
    def free_pages(self) -> int:
        return self.num_pages - self._fresh + len(self._returned)

    @property
    def used_pages(self) -> int:
        return self.num_pages - self.free_pages

    def take(self, n: int) -> list[int] | None:
        """``n`` page ids, or None (and nothing taken) if fewer are free."""
        if n > self.free_pages:
            return None
        k = min(n, len(self._returned))
        out = self._returned[len(self._returned) - k :]
        del self._returned[len(self._returned) - k :]
        out += range(self._fresh, self._fresh + n - k)
        self._fresh += n - k
        return out

    def give_back(self, pages: list[int]) -> None:
        self._returned.extend(pages)


def pool_layout(policy: Policy, page_size: int) -> PagedLayout | None:
    """How a pool of ``page_size``-token pages keeps ``policy``'s KV: its ``paged_layout``, or None (its own store
    beside the pool) when it has none or when its selection counts in pages of another size."""
    layout = policy.paged_layout()
    if layout is None or (layout.page_size and layout.page_size != page_size):
        return None
    return layout


def head_pages(policy: Policy, tokens: int, page_size: int) -> tuple[int, int]:
    """(KV pages, bound pages) one KV head of ``policy`` holds at ``tokens`` tokens in a pool of ``page_size``-token
    pages. A ``select`` layout (Quest) holds its tokens' pages plus one bound page per ``page_size`` of them (a bound
    page's key half holds the min keys of ``page_size`` pages, its value half their max keys); any other policy
    holds the pages of its ``kv_tokens`` (for a store beside the pool they are counted, not written)."""
    layout = pool_layout(policy, page_size)
    if layout is not None and layout.select:
        n = -(-tokens // page_size)
        return n, -(-n // page_size)
    return -(-policy.kv_tokens(tokens) // page_size), 0


def _first_short(policy: Policy, tokens: int, kv: int, bound: int, page_size: int) -> int:
    """The smallest length above ``tokens`` at which one head of ``policy`` needs more than ``kv`` pages or ``bound``
    bound pages (``1 << 62``: never), given it needs no more at ``tokens``. Exact because a policy's ``kv_tokens``,
    hence ``head_pages``, never decreases as the length grows: a doubling search, then a binary one."""

    def short(t: int) -> bool:
        k, b = head_pages(policy, t, page_size)
        return k > kv or b > bound

    step = 1
    while not short(tokens + step):
        step *= 2
        if step > 1 << 61:
            return 1 << 62
    lo, hi = tokens + step // 2, tokens + step  # short(hi); not short(lo) (lo == tokens when step == 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if short(mid) else (mid, hi)
    return hi


@dataclass
class GroupPages:
    """The pages of one (layer, head group): ``pages[h]`` are KV head ``h``'s (of the group), in slot order, and
    ``bound_pages[h]`` its bound pages (a ``select`` layout's page bounds; empty otherwise)."""

    policy: Policy
    heads: int
    pages: list[list[int]]
    bound_pages: list[list[int]] = field(default_factory=list)
    _table: tuple[str, torch.Tensor] | None = field(default=None, repr=False)  # (device, table), extended as pages are taken
    _bound_table: tuple[str, torch.Tensor] | None = field(default=None, repr=False)
    # The pool whose ``sync_tables`` extends this group's tables with those of every group that grew in the same
    # step (``SequencePages`` sets it; None: each table extended alone); it lists this group while its pages grew.
    _pool: PagePool | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.bound_pages:
            self.bound_pages = [[] for _ in range(self.heads)]

    def table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Page table ``[heads, pages]`` (int32, as the paged kernels index) on ``device``: extended when pages were
        taken (at most once per ``page_size`` tokens), by the new pages alone (``_extended``; under a pool, those of
        every group that grew at once: ``PagePool.sync_tables``)."""
        if self._pool is not None and id(self) in self._pool._grown:
            self._pool.sync_tables(device)
        self._table = _extended(self._table, self.pages, device)
        return self._table[1]

    def bound_table(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bound-page table ``[heads, bound pages]`` (int32): page ``i``'s bounds are in slot ``i % page_size`` of
        bound page ``i // page_size``."""
        if self._pool is not None and id(self) in self._pool._grown:
            self._pool.sync_tables(device)
        self._bound_table = _extended(self._bound_table, self.bound_pages, device)
        return self._bound_table[1]


def _extended(cached: tuple[str, torch.Tensor] | None, lists: list[list[int]],
              device: torch.device | str) -> tuple[str, torch.Tensor]:
    """``lists`` (one list of page ids per head, all of one length) as an int32 ``[heads, pages]`` tensor on
    ``device``, from ``cached``, the tensor of the same lists when they were shorter: page lists only grow until
    they are released (which drops the cache), so only the columns taken since cross from the host. A prompt chunk
    of 2048 tokens takes 128 pages per head, while rebuilding a 128K-token table from the lists converted 8192
    Python ints per head in every layer of every step. A new tensor each time: one handed out is never written."""
    width = len(lists[0]) if lists else 0
    if cached is not None and cached[0] == str(device):
        old = cached[1]
        if old.shape[-1] == width:
            return cached
        if 0 < old.shape[-1] < width:
            new = host_to_device(torch.tensor([head[old.shape[-1]:] for head in lists], dtype=torch.int32), device)
            return cached[0], torch.cat([old, new], dim=1)
    return str(device), host_to_device(torch.tensor(lists, dtype=torch.int32), device)


class SequencePages:
    """One sequence's page tables under ``plan``, per layer and head group (KV heads of a layer with equal
    policies share a group, as in ``cache.group_heads``)."""

    def __init__(self, pool: PagePool, plan: HeadPlan):
        self.pool = pool
        self.groups: list[list[GroupPages]] = []
        for row in resolve(plan.policies(), pool.spec):
            counts: dict[Policy, int] = {}
            for p in row:
                counts[p] = counts.get(p, 0) + 1
            self.groups.append([GroupPages(p, n, [[] for _ in range(n)]) for p, n in counts.items()])
        for layer in self.groups:
            for g in layer:  # only groups whose KV the pool keeps use their tables (the others' pages are counted)
                g._pool = pool if pool_layout(g.policy, pool.page_size) is not None else None
        # Every group beside the index of its policy among the distinct ones (most layers share a few): ``grow``
        # works out the pages per policy, not per group, at every step.
        distinct = list(dict.fromkeys(g.policy for layer in self.groups for g in layer))
        self._policies = distinct
        self._flat = [(g, distinct.index(g.policy)) for layer in self.groups for g in layer]
        self.tokens = 0  # the length the pages hold
        self.version = 0  # counts the changes of the page lists (pages taken or given back)
        self._due = 0  # below this length the pages held are enough (``grow`` returns at once)

    def pages_at(self, tokens: int) -> int:
        """Pages this sequence holds at ``tokens`` tokens (all layers, groups and heads)."""
        P = self.pool.page_size
        return sum(g.heads * sum(head_pages(g.policy, tokens, P)) for layer in self.groups for g in layer)

    @property
    def held(self) -> int:
        return sum(len(h) for layer in self.groups for g in layer for lists in (g.pages, g.bound_pages) for h in lists)

    @property
    def nbytes(self) -> int:
        return self.held * self.pool.page_bytes

    def grow(self, tokens: int) -> bool:
        """Hold pages for ``tokens`` tokens: take what is missing from the pool, all or nothing. False (nothing
        taken) when the pool has too few free pages.

        Called for every sequence at every step: below the next length at which some group runs short (worked out
        after each change, ``_first_short``) it only records the length; past it, the pages one head of a policy
        needs are worked out once per distinct policy and only groups short of pages are touched."""
        if tokens <= self.tokens:
            return True
        if tokens < self._due:
            self.tokens = tokens
            return True
        P = self.pool.page_size
        wanted = [head_pages(p, tokens, P) for p in self._policies]
        need = []
        total = 0
        for g, i in self._flat:
            n, m = wanted[i][0] - len(g.pages[0]), wanted[i][1] - len(g.bound_pages[0])
            if n > 0 or m > 0:
                n, m = max(0, n), max(0, m)
                need.append((g, n, m))
                total += g.heads * (n + m)
        if total:
            ids = self.pool.take(total)
            if ids is None:
                return False
            self.version += 1
            at = 0
            for g, n, m in need:  # the page tables are extended at their next use (GroupPages.table)
                for head, bounds in zip(g.pages, g.bound_pages, strict=True):
                    head.extend(ids[at : at + n])
                    bounds.extend(ids[at + n : at + n + m])
                    at += n + m
                if g._pool is not None:
                    g._pool._grown[id(g)] = g
        self.tokens = tokens
        held = {(i, len(g.pages[0]), len(g.bound_pages[0])) for g, i in self._flat}  # a few: groups of a policy agree
        self._due = min((_first_short(self._policies[i], tokens, kv, bound, P) for i, kv, bound in held),
                        default=1 << 62)
        return True

    def release(self) -> None:
        """Give every page back."""
        self.version += 1
        for layer in self.groups:
            for g in layer:
                g._table = g._bound_table = None
                if g._pool is not None:
                    g._pool._grown.pop(id(g), None)
                for head in (*g.pages, *g.bound_pages):
                    self.pool.give_back(head)
                    head.clear()
        self.tokens = 0
        self._due = 0
