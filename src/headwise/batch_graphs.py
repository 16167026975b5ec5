"""Decode steps of a batch over the page pool at padded batch sizes, replayed from CUDA graphs.

vLLM captures its decode step at padded batch sizes (1, 2, 4, 8, ...) and replays the smallest one that holds the
live batch, whatever the batch's members. ``BatchGraphs`` does the same for ``Engine.step``'s decode-only steps
over the page pool (``paged_cache.py``), for the sequences of one plan whose every head group keeps its KV in the
pool (``pool.pool_layout``: ``full``, ``streaming`` without compensation, prefill patterns decoding with ``full``,
``page_topk`` with exact bounds in pages of the pool's size).

Static buffers (``PaddedBatch``), on the device, for ``rows`` sequences and lengths up to ``limit`` tokens:

- ``meta: long [3, rows]``: each row's token id, the token's position, and the row's length (position + 1);
- ``tables: int32 [rows, per_row]``: each row's page tables, one block per (layer, ``PagedLayout``) of the plan
  (a *launch*: its heads' tables ``[heads, width]`` side by side, ``width`` pages per head for ``limit`` tokens),
  a ``select`` launch's (Quest) followed by its heads' bound-page tables ``[heads, ceil(width / page_size)]``.

A step of ``n`` sequences runs at the padded size ``size`` (the smallest of ``SIZES`` holding ``n``) over rows
``0 .. size-1``. A sequence keeps its row from step to step (a row's tables are written once, then only the pages it
takes are added: ``SequencePages.version`` says when); a sequence that is not in a step (finished, preempted,
waiting) gives its row back, and one sitting at or past ``size`` moves below it. Every row of the step without a
sequence is a *padding row*: token 0 at position 0, length 0, so the kernel reads nothing for it, and every entry
of its tables names the pool's scratch page (``PagePool.scratch``), so the key and value it writes land where no
sequence reads: a padding row never touches a live sequence's pages.

The forward (``Engine.forward_padded``) reads only these buffers, and in each layer ``PaddedBatch.attend`` writes the
tokens' keys and values through ``PagePool.write`` (slots from the positions on the device: the one write path into
the pages) and runs one ``batch_decode`` launch per (layer, layout) sized for ``limit``; no host value of the batch
enters it and no host counter changes (a Quest launch refreshes the bounds of each row's newest page and chooses its
pages first, ``paged_cache.select_pool_pages`` sized for ``limit``), so the same step runs eagerly or replayed from a
graph captured at
``size``. ``BatchGraphs.step`` then counts the token in each sequence's host counters (``HeadwiseCache.advance``).
``BatchGraphs.decode`` runs several greedy steps in a row (``Engine(multi_step=N)``): between two steps only the
argmax of the logits and the next positions are written into ``meta`` on the device, so the host reads the tokens
once per ``N`` steps and the GPU does not wait for it in between.

A sequence longer than ``limit`` (or more rows than allocated) reallocates the buffers (``limit`` within 1/8 above
the longest sequence, rows the padded size) and drops the graphs captured over the old ones. Capture is lazy: a
size's first step runs eagerly (compiling the kernels) on the capture stream (``warm_up_on_capture_stream``), then
is captured on it; all sizes share one graph memory pool, and buffers reallocated start a fresh one (the caching
allocator refuses to capture into a pool whose graphs are all gone while any block of it is still held: the
``use_count > 0`` assert of ``CUDACachingAllocator``'s ``beginAllocateToPool``).

Tested: tests/test_batch_graphs.py, on the CPU (fp32, the padded step run eagerly, with the plain-PyTorch reference
and with ``batch_decode`` under TRITON_INTERPRET=1) against the eager batched step and each sequence alone, through
joins, finishes and preemption (full + streaming plans, and Quest beside full heads); the pool's writes of a padded
step checked slot by slot; an aborted sequence's row given back outside inference mode. Its GPU tests (capture and
replay against eager, fp32 and bf16, both plans; captures again after the buffers grow, with a dropped graph's
logits still held) ran on an H200 on 2026-12-02 before the fresh pool per buffers and the warm-up on the capture
stream: a capture after the buffers grew, into the old pool's handle, hit the allocator's assert (fp32, the first
captures of the process) and the steps went on eagerly. Not yet rerun since.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from headwise.cache import as_range, group_heads
from headwise.errors import HeadwiseError
from headwise.kernels.decode_reference import batch_decode_reference
from headwise.paged_cache import refresh_newest_bounds, select_pool_pages
from headwise.plan import HeadPlan, resolve
from headwise.policies.base import PagedLayout
from headwise.pool import PagePool, pool_layout

if TYPE_CHECKING:
    from headwise.engine import Engine
    from headwise.sequence import Sequence
    from headwise.spec import ModelSpec

log = logging.getLogger(__name__)

SIZES = (1, 2, 4, 8, 16, 32, 64, 128)  # padded batch sizes, as vLLM's capture sizes up to its default maximum


def padded_size(n: int, sizes: tuple[int, ...] = SIZES) -> int | None:
    """The smallest of ``sizes`` holding ``n`` rows (None: more than the largest)."""
    return next((s for s in sizes if s >= n), None)


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}  # device index -> the process's capture stream on it


def capture_stream(device: torch.device) -> torch.cuda.Stream:
    """The side stream CUDA-graph steps are warmed up and captured on: one per device for the process, so what a
    stream's first kernels allocate for good (cuBLAS's workspace, kept per handle and stream) is allocated once, by
    a warm-up, outside every graph's memory pool."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _CAPTURE_STREAMS.get(index)
    if stream is None:
        stream = _CAPTURE_STREAMS[index] = torch.cuda.Stream(device=index)
    return stream


@contextmanager
def warm_up_on_capture_stream(device: torch.device) -> Iterator[None]:
    """Run the block (a step's eager run before its capture) on ``capture_stream(device)``, after the current stream's
    work and before its next (torch's warm-up before ``torch.cuda.graph``); a no-op off CUDA."""
    if device.type != "cuda":
        yield
        return
    main, side = torch.cuda.current_stream(device), capture_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        yield
    main.wait_stream(side)


def capture_graph(fn: Callable[[], torch.Tensor], device: torch.device, pool: tuple[int, int] | None = None,
                  ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Capture ``fn`` on ``capture_stream(device)`` into ``pool`` (None: a pool of its own); returns the graph and
    ``fn``'s output (the graph's output buffer). A failure raises with the caller's stream current again.

    Unlike ``torch.cuda.graph``, the allocator's cache is not emptied first: emptying it hands every cached block back
    to the driver, to be allocated again by the steps after (run 20's one capture after the prompts ended took a 1.19
    s step, where a step that captured at padded 64 mid-run took 158 ms for 8 forwards), and vLLM skips it for its
    captures after the first. Only when the capture runs out of memory is the cache emptied and the capture tried
    once more."""
    try:
        return _capture_once(fn, device, pool, empty_cache=False)
    except torch.OutOfMemoryError:
        return _capture_once(fn, device, pool, empty_cache=True)


def _capture_once(fn: Callable[[], torch.Tensor], device: torch.device, pool: tuple[int, int] | None,
                  empty_cache: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """One capture of ``fn`` (``torch.cuda.graph``'s steps: synchronize, optionally empty the cache, begin on the
    capture stream, end); the caller's stream is current again after it, whether it succeeded or raised."""
    before = torch.cuda.current_stream(device)
    torch.cuda.synchronize(device)
    if empty_cache:
        torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(capture_stream(device)):
            graph.capture_begin(*(() if pool is None else (pool,)))
            try:
                out = fn()
            finally:
                graph.capture_end()
    except BaseException:
        torch.cuda.set_stream(before)
        raise
    return graph, out


def padded_blockers(plan: HeadPlan, spec: ModelSpec, page_size: int) -> list[str]:
    """Why ``plan``'s decode steps cannot run on padded static buffers over a pool of ``page_size``-token pages
    (empty: they can): a head group keeping its own store beside the pool (``pool.pool_layout``)."""
    own = sorted({p.short() for row in resolve(plan.policies(), spec) for p in row
                  if pool_layout(p, page_size) is None})
    return [f"policies keeping their own store beside the pool: {', '.join(own)}"] if own else []


@dataclass
class _Launch:
    """One ``batch_decode`` launch of a layer: the plan's KV heads of that layer sharing a ``PagedLayout``."""

    layout: PagedLayout
    groups: list[tuple[int, int]]  # (index of the group in the layer, its first head in the launch)
    heads: int
    q_index: torch.Tensor  # the launch's query heads in the layer, GQA order
    kv_index: torch.Tensor
    offset: int = 0  # its first column in a row of ``PaddedBatch.tables``
    width: int = 0  # pages per head
    bound_offset: int = 0  # a ``select`` layout's bound-page tables: first column, bound pages per head
    bound_width: int = 0
    q_range: tuple[int, int] | None = None  # ``q_index`` / ``kv_index`` as a range of consecutive heads, when they are
    kv_range: tuple[int, int] | None = None  # one: the launch reads and writes views instead of gathered copies


@dataclass
class _Row:
    seq: Sequence
    version: int = -1  # SequencePages.version its tables were written at
    written: list[int] = field(default_factory=list)  # pages written per (layer, group), in ``PaddedBatch.order``
    written_bounds: list[int] = field(default_factory=list)  # bound pages written, likewise


class PaddedBatch:
    """Static buffers of decode steps over the pool for up to ``rows`` sequences of ``limit`` tokens under ``plan``."""

    def __init__(self, pool: PagePool, plan: HeadPlan, rows: int, limit: int, device: torch.device,
                 use_kernels: bool):
        """``use_kernels``: attend with the Triton ``batch_decode`` kernel, else with its plain-PyTorch reference
        (which reads lengths on the host: no graph)."""
        spec = pool.spec
        self.pool, self.plan, self.rows, self.limit, self.device = pool, plan, rows, limit, device
        self.use_kernels = use_kernels
        P = pool.page_size
        self.launches: list[list[_Launch]] = []
        offset = 0
        for row in resolve(plan.policies(), spec):
            by_layout: dict[PagedLayout, _Launch] = {}
            for gi, g in enumerate(group_heads(row, spec.group_size, device)):
                layout = pool_layout(g.policy, P)
                if layout is None:
                    raise HeadwiseError(f"{g.policy.short()} keeps its own store: no padded decode over the pool")
                launch = by_layout.get(layout)
                if launch is None:
                    launch = by_layout[layout] = _Launch(layout, [], 0, g.q_index[:0], g.kv_index[:0])
                launch.groups.append((gi, launch.heads))
                launch.heads += len(g.kv_heads)
                launch.q_index = torch.cat([launch.q_index, g.q_index])
                launch.kv_index = torch.cat([launch.kv_index, g.kv_index])
            for launch in by_layout.values():
                launch.q_range, launch.kv_range = as_range(launch.q_index.tolist()), as_range(launch.kv_index.tolist())
                held = min(limit, launch.layout.ring) if launch.layout.ring else limit
                launch.offset, launch.width = offset, max(1, -(-held // P))
                offset += launch.heads * launch.width
                if launch.layout.select:
                    launch.bound_offset, launch.bound_width = offset, -(-launch.width // P)
                    offset += launch.heads * launch.bound_width
            self.launches.append(list(by_layout.values()))
        self.per_row = offset
        # (layer, group index, launch, first head) in the order ``_Row.written`` counts them
        self.order = [(i, gi, launch, h0) for i, layer in enumerate(self.launches) for launch in layer
                      for gi, h0 in launch.groups]
        self.meta = torch.zeros(3, rows, dtype=torch.long, device=device)
        self.tables = torch.full((rows, self.per_row), pool.scratch, dtype=torch.int32, device=device)
        self.views = [[self.tables[:, la.offset : la.offset + la.heads * la.width].view(rows, la.heads, la.width)
                       for la in layer] for layer in self.launches]
        self.bound_views = [[self.tables[:, la.bound_offset : la.bound_offset + la.heads * la.bound_width]
                             .view(rows, la.heads, la.bound_width) for la in layer] for layer in self.launches]
        self.occupant: list[_Row | None] = [None] * rows
        self.row_of: dict[int, int] = {}  # id(sequence) -> its row

    # ------------------------------------------------------------------ rows
    def forget(self, seq: Sequence) -> None:
        """Give ``seq``'s row back (its pages are going back to the pool, or it left the batch)."""
        r = self.row_of.pop(id(seq), None)
        if r is not None:
            self.occupant[r] = None
            self.tables[r].fill_(self.pool.scratch)

    def fill(self, seqs: list[Sequence], size: int) -> list[int]:
        """Put the step's sequences (``len(seqs) <= size <= rows``, every one with a cache and pages holding its
        next token) in rows ``< size`` and write their inputs; every other row below ``size`` is a padding row.
        Returns each sequence's row."""
        assert len(seqs) <= size <= self.rows
        present = {id(s) for s in seqs}
        for occ in list(self.occupant):
            if occ is not None and id(occ.seq) not in present:
                self.forget(occ.seq)
        free = iter([r for r in range(size) if self.occupant[r] is None])
        rows = []
        for s in seqs:
            r = self.row_of.get(id(s))
            if r is None or r >= size:
                new = next(free)
                if r is None:
                    self.occupant[new] = _Row(s, written=[0] * len(self.order), written_bounds=[0] * len(self.order))
                else:  # moves below ``size``: its tables with it
                    self.tables[new].copy_(self.tables[r])
                    self.occupant[new], self.occupant[r] = self.occupant[r], None
                    self.tables[r].fill_(self.pool.scratch)
                self.row_of[id(s)] = r = new
            rows.append(r)
        self._write_tables(rows, seqs)
        meta = [[0] * size for _ in range(3)]  # padding rows: token 0 at position 0, length 0
        for r, s in zip(rows, seqs):
            assert s.cache is not None
            pos = s.cache.get_seq_length()
            meta[0][r], meta[1][r], meta[2][r] = s.generated[s.fed], pos, pos + 1
        self.meta[:, :size].copy_(torch.tensor(meta, dtype=torch.long))
        return rows

    def _write_tables(self, rows: list[int], seqs: list[Sequence]) -> None:
        """Add the pages each row's sequence took since its tables were last written, in one scatter. The indices and
        page ids are gathered as Python ints and become two tensors once: with every (layer, group) of every row
        taking a page each ``page_size`` tokens, tensors made per (row, layer, group) cost the host more than the
        step's GPU work at 50 rows (run 17's profiled decode-only step: 3,328 ``arange`` calls)."""
        idx: list[int] = []
        vals: list[int] = []
        for r, s in zip(rows, seqs):
            occ = self.occupant[r]
            pages = s.pages
            assert occ is not None and pages is not None
            if occ.version == pages.version:
                continue
            base = r * self.per_row
            for k, (i, gi, launch, h0) in enumerate(self.order):
                gp = pages.groups[i][gi]
                for lists, written, offset, width in ((gp.pages, occ.written, launch.offset, launch.width),
                                                      (gp.bound_pages, occ.written_bounds, launch.bound_offset,
                                                       launch.bound_width)):
                    have, done = len(lists[0]), written[k]
                    if have == done:
                        continue
                    if have < done or have > width:
                        raise HeadwiseError(f"row {r}: {have} pages for a table of {width} written up to {done}")
                    for h, held in enumerate(lists):  # head-major, as the table's [heads, width] view
                        start = base + offset + (h0 + h) * width
                        idx.extend(range(start + done, start + have))
                        vals.extend(held[done:have])
                    written[k] = have
            occ.version = pages.version
        if idx:
            flat = self.tables.view(-1)
            flat.index_copy_(0, torch.tensor(idx, dtype=torch.long).to(self.device),
                             torch.tensor(vals, dtype=torch.int32).to(self.device))

    # ------------------------------------------------------------------ the layer's attention
    def attend(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
               ) -> torch.Tensor:
        """One layer's attention of the padded batch: query [1, Hq, size, D]; key, value [1, Hkv, size, D] (row ``b``'s
        token at index ``b``). Writes each row's key and value into its pages, then one ``batch_decode`` launch per
        layout; a ``select`` layout (Quest) first refreshes the bounds of each row's newest page and chooses its pages
        (``paged_cache.select_pool_pages``, sized for ``limit``, lengths read on the device; a padding row, of length
        0, chooses none). Returns [1, Hq, size, D]."""
        size = query.shape[2]
        pool = self.pool
        positions, lengths = self.meta[1, :size], self.meta[2, :size]
        out = torch.empty_like(query)
        for launch, view, bound_view in zip(self.launches[layer_idx], self.views[layer_idx],
                                            self.bound_views[layer_idx]):
            table = view[:size]
            if launch.kv_range is not None:  # consecutive heads: views, no gathered copies (fewer kernels a step)
                k0, k1 = launch.kv_range
                k, v = key[0, k0:k1], value[0, k0:k1]
            else:
                k, v = key[0].index_select(0, launch.kv_index), value[0].index_select(0, launch.kv_index)
            k, v = k.transpose(0, 1)[:, :, None], v.transpose(0, 1)[:, :, None]  # [size, heads, 1, D]
            pool.write(table, launch.layout.slots(positions)[:, None], k, v)
            o_view = None
            if launch.q_range is not None:
                q0, q1 = launch.q_range
                q = query[0, q0:q1].transpose(0, 1)  # [size, heads * group, D], strided
                o_view = out[0, q0:q1].transpose(0, 1)  # the kernel writes the layer's output in place
            else:
                q = query[0].index_select(0, launch.q_index).transpose(0, 1)
            selected = None
            if launch.layout.select:
                H = launch.heads
                pair_tables = table.reshape(size * H, 1, -1)
                bounds = bound_view[:size].reshape(size * H, 1, -1)
                per_pair = [t[:, None].expand(size, H).reshape(-1) for t in (positions, lengths)]  # no host sync
                refresh_newest_bounds(pool, pair_tables, bounds, per_pair[0])
                selected = select_pool_pages(q.reshape(size * H, -1, q.shape[-1]), pool.keys, pool.values,
                                             pool.page_size, bounds, per_pair[1], self.limit,
                                             launch.layout.select, self.use_kernels).view(size, H, -1)
            if self.use_kernels:
                from headwise.kernels.batch_decode import batch_decode  # Triton: only with kernels

                o = batch_decode(q, pool.keys, pool.values, table, lengths, self.limit, pool.page_size,
                                 ring=launch.layout.ring, selected=selected, scale=scale, out=o_view)
            else:
                o = batch_decode_reference(q, pool.keys, pool.values, table, lengths, pool.page_size,
                                           ring=launch.layout.ring, selected=selected, scale=scale)
                if o_view is not None:
                    o_view.copy_(o)
            if o_view is None:
                out[0].index_copy_(0, launch.q_index, o.transpose(0, 1))
        return out


class BatchGraphs:
    """Decode-only steps over the pool of the sequences of one plan, at padded sizes: replayed from one CUDA graph
    per size when ``capture`` (CUDA, the kernels), else run eagerly on the same static buffers (any device)."""

    def __init__(self, engine: Engine, plan: HeadPlan, capture: bool, sizes: tuple[int, ...] = SIZES):
        assert engine.pool is not None
        self.engine, self.plan, self.capture, self.sizes = engine, plan, capture, sizes
        self.batch: PaddedBatch | None = None
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # size -> (graph, its logits)
        self.mempool: tuple[int, int] | None = None  # the graphs' memory pool: made with the buffers they read

    # The static buffers are made inside ``Engine.step`` (under torch.inference_mode, so they are inference tensors) and
    # are written in place from the host: that too runs under inference mode, whichever thread calls (``Engine.abort``
    # from the server's scheduler releases a sequence's row).
    @torch.inference_mode()
    def forget(self, seq: Sequence) -> None:
        if self.batch is not None:
            self.batch.forget(seq)

    @torch.inference_mode()
    def step(self, seqs: list[Sequence]) -> tuple[list[torch.Tensor], int, bool]:
        """Feed each sequence's next token (``generated[fed]``) at its position. Returns each sequence's next-token
        logits ``[vocab]`` (views of the step's output, valid until the next step), the padded size and whether the
        step was replayed from a graph. Counts the token in each sequence's host counters."""
        size, rows = self._fill(seqs)
        logits, replayed = self._run(size)
        _advance(seqs, 1)
        return [logits[r] for r in rows], size, replayed

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], steps: int) -> tuple[list[list[int]], int, bool]:
        """``steps`` greedy decode steps of every sequence in a row without the host in between (multi-step
        scheduling, as vLLM's ``num_scheduler_steps``): each step's next tokens are the argmax of its logits, taken on
        the device (NaN counted as -inf, as ``Engine._sample`` does), and written with the next positions into the
        static inputs the next step reads; one read of the tokens at the end. Every sequence must hold pages for
        ``steps`` more tokens. Returns each sequence's ``steps`` tokens, the padded size and whether the steps were
        replayed from a graph. Counts the ``steps`` tokens fed in each sequence's host counters."""
        size, rows = self._fill(seqs)
        assert self.batch is not None
        meta = self.batch.meta[:, :size]
        live = meta[2] > 0  # padding rows (length 0) stay token 0 at position 0
        tokens = torch.empty(steps, size, dtype=torch.long, device=meta.device)
        replayed = True
        for j in range(steps):
            logits, graph = self._run(size)
            replayed &= graph
            tokens[j] = torch.nan_to_num(logits.float(), nan=-math.inf).argmax(dim=-1)
            if j + 1 < steps:
                meta[0].copy_(torch.where(live, tokens[j], 0))
                meta[1:3] += live
        _advance(seqs, steps)
        picked = tokens[:, rows].T.tolist()  # the one device sync
        return picked, size, replayed

    def _fill(self, seqs: list[Sequence]) -> tuple[int, list[int]]:
        """The step's padded size, its buffers (``_buffers``) and the sequences' inputs written in them: (the size,
        each sequence's row)."""
        size = padded_size(len(seqs), self.sizes)
        assert size is not None, "more sequences than the largest padded size"
        self._buffers(seqs, size)
        assert self.batch is not None
        return size, self.batch.fill(seqs, size)

    def _run(self, size: int) -> tuple[torch.Tensor, bool]:
        """One decode step of the filled buffers at ``size``: the graph's replay, else captured (after an eager run on
        the capture stream, whose logits it returns), else eager. Returns the logits and whether it was a replay."""
        if size in self.graphs:
            graph, logits = self.graphs[size]
            graph.replay()
            return logits, True
        if self.capture:
            with warm_up_on_capture_stream(self.engine.lm.device):
                logits = self.engine.forward_padded(self.batch, size)  # type: ignore[arg-type]
            self._capture(size)
            return logits, False
        return self.engine.forward_padded(self.batch, size), False  # type: ignore[arg-type]

    def _buffers(self, seqs: list[Sequence], size: int) -> None:
        """Buffers with room for ``size`` rows and the longest sequence: reallocated (doubling) when too small."""
        need = max(s.max_tokens for s in seqs)
        b = self.batch
        if b is not None and b.rows >= size and b.limit >= need:
            return
        rows = max(size, b.rows if b is not None else 1)
        # The launches are sized for ``limit``: within 1/8 above the longest sequence (a few reallocations per doubling
        # of the lengths, each dropping the graphs, against up to 2x the kernel's work at a power of two).
        grain = 1 << max(0, need.bit_length() - 4)
        limit = max(-(-need // grain) * grain, b.limit if b is not None else 1)
        pool = self.engine.pool
        assert pool is not None
        # The graphs read the old buffers: they go, and with them their pool. Its handle is not reused: once its
        # graphs are gone the allocator frees the pool's blocks only when it empties its cache (when an allocation
        # finds no room, or a capture runs out of memory: ``capture_graph``), and refuses a capture into it while
        # any block of it is still held (a dropped graph's logits a caller kept).
        self.batch, self.graphs, self.mempool = None, {}, None
        self.batch = PaddedBatch(pool, self.plan, rows, limit, self.engine.lm.device, self.engine.kernels)

    def _capture(self, size: int) -> None:
        """Capture the step at ``size`` (just run eagerly on the capture stream, its warm-up) into the buffers' pool.
        A failure leaves no graph at ``size`` and the current stream as it was; no capture is tried after it."""
        batch = self.batch
        assert batch is not None
        device = self.engine.lm.device
        try:
            if self.mempool is None:
                self.mempool = torch.cuda.graph_pool_handle()
            graph, logits = capture_graph(lambda: self.engine.forward_padded(batch, size), device, self.mempool)
        except Exception as exc:  # any capture failure: padded steps go on eagerly (or report) with the cause
            self.capture = False
            if self.engine.cuda_graphs:
                raise HeadwiseError(f"capturing a batched decode step in a CUDA graph failed: {exc}") from exc
            log.warning("batched decode steps run eagerly: capturing one in a CUDA graph failed (%s)", exc)
            return
        self.graphs[size] = (graph, logits)


def _advance(seqs: list[Sequence], tokens: int) -> None:
    """Count ``tokens`` fed on the device in each sequence's host counters."""
    for s in seqs:
        assert s.cache is not None
        s.cache.advance(tokens)


__all__ = ["SIZES", "BatchGraphs", "PaddedBatch", "capture_graph", "capture_stream", "padded_blockers", "padded_size",
           "warm_up_on_capture_stream"]
