"""``retrieval_offload``: a head's old KV in host memory behind a nearest-neighbour index over its keys (RetrievalAttention).

RetrievalAttention (Liu et al., 2024, https://arxiv.org/abs/2409.10516) keeps a static set of tokens on the GPU, the
first ``sink`` and the last ``window``, and moves every other token's key and value to CPU memory as it leaves the
window, adding its key to an approximate-nearest-neighbour (maximum inner product) index. At each decode step each
query head attends (a) the static set on the device and (b) the ``top_k`` host tokens the index returns for its
query, copied to the device; the two partial attentions (each normalised, with its log-sum-exp) are merged exactly,
``out = sum_i e^{lse_i} o_i / sum_i e^{lse_i}``. The sets are disjoint, so with an index that returns every host
token the result is dense attention. A context's KV can then exceed the GPU's memory: the device holds
``sink + window`` tokens per head (plus the ``top_k`` retrieved ones for the step).

How this differs from the paper:
- *The index.* The paper builds its own query-aware graph (RoarGraph-like: queries and keys come from different
  distributions, so a plain key-to-key graph must scan ~30% of the keys for good recall). Here an off-the-shelf
  index over the keys from faiss-cpu, the library chosen by ``bench/ann_choice.py`` over hnswlib and usearch on real
  SmolLM2 keys and queries (``bench/results/ann_choice_2026-12-02.json``): faiss's inverted file (``index="ivf"``, default) or its HNSW
  graph (``"hnsw"``), searched wider to make up for it; or ``index="exact"`` (a brute-force inner product on the host,
  for tests and small contexts). The inverted file scores every key below ``exact_below`` host keys (32768): on
  Gemma 3 its lists miss the keys the queries seek (0.40 of the top-100 at 5% probed) while an exact search of that
  many keys costs well under a millisecond per query.
- *Where the retrieved tokens are attended.* The paper computes their partial attention on the CPU; here they are
  copied to the device (from pinned memory) and attended there, so the CPU only searches.
- *GQA*: each query head searches with its own query; its KV head's index serves the group.
- *Prefill* is exact attention: the chunk attends the static set and its own tokens on the device, and the host
  tokens streamed to the device in blocks, merged by log-sum-exp (the paper prefills densely on the GPU, then
  offloads). Its cost grows with the context, as dense prefill's does.

Overlap: a decode step copies the queries to the host, launches the static partial on the device (asynchronous on
CUDA), searches on the host meanwhile, then copies the retrieved tokens and merges.

Memory: ``kv_tokens`` counts device slots, ``min(seq_len, sink + window)``: what a plan's GPU budget pays. The host
part (every token past the static set, and the index) is ``OffloadStore.host_bytes``. Paths: plain PyTorch for the
attention, the merge through ``kernels.paged_decode.merge_splits`` with kernels on (the split-K merge of the decode
kernels), else in PyTorch. No CUDA-graph decode (the host search).
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy, check_positive
from headwise.policies.stores import SinkWindowStore

INDEXES = ("hnsw", "ivf", "exact")
IVF_TRAIN_AT = 4096  # the fewest host keys an inverted file is trained on (exact search before)
HOST_BLOCK = 1 << 24  # logits per block when prefill streams host tokens to the device (64 MiB of fp32)


@dataclass(frozen=True)
class RetrievalOffload(Policy):
    name: ClassVar[str] = "retrieval_offload"
    paper: ClassVar[str] = "https://arxiv.org/abs/2409.10516"
    keeps_every_token: ClassVar[bool] = True  # every token stays reachable: on the device or behind the index

    sink: int = 128
    """Initial tokens kept on the device (the paper's static set: 128 initial + 512 recent tokens)."""
    window: int = 512
    """Recent tokens kept on the device, the query's own included."""
    top_k: int = 100
    """Host tokens each query head retrieves and attends per decode step (the paper retrieves 100)."""
    index: str = "ivf"
    """"ivf": faiss inverted file (k-means lists, ``probe`` of them scanned; the best measured); "hnsw": faiss HNSW
    graph over the keys; "exact": every host key scored. All by maximum inner product."""
    ef: int = 256
    """HNSW search width (candidates kept while searching; at least ``top_k`` is used): recall against speed."""
    probe: float = 0.05
    """IVF: share of the inverted lists scanned per query (RetrievalAttention scans 1-3% of the keys; here 5% gave
    recall@100 0.95 on SmolLM2, 2% 0.83)."""
    exact_below: int = 32768
    """IVF: host keys below which every key is scored (the exact top-``top_k``) and the inverted file is trained once
    there are this many (at least ``IVF_TRAIN_AT``). Why 32768: on Gemma 3 at 8K
    (``bench/experiments/offload_recall.py``, the CPU) an exact search of 7.5K keys took 154 us per query on one
    thread and kept every answer token, where the inverted file at 5% of its lists took 40 us and found 0.40 of the
    top-100 (the needle's number at 0.26 of the answer tokens), at 50% 200 us and 0.86; HNSW at width 1024 809 us
    and 0.97. Exact search grows with the keys (~0.65 ms per query at 32K, extrapolated), an index beyond."""

    def validate(self) -> None:
        check_positive(self, sink=self.sink, window=self.window, top_k=self.top_k, ef=self.ef)
        if not isinstance(self.probe, int | float) or isinstance(self.probe, bool) or not 0 < self.probe <= 1:
            raise PlanError(f"policy 'retrieval_offload': 'probe' must be a share in (0, 1], got {self.probe!r}")
        if self.window < 1:
            raise PlanError("policy 'retrieval_offload': 'window' must be at least 1 (the query itself)")
        if not isinstance(self.exact_below, int) or isinstance(self.exact_below, bool) or self.exact_below < 0:
            raise PlanError(f"policy 'retrieval_offload': 'exact_below' must be a whole number of keys >= 0, got "
                            f"{self.exact_below!r}")
        if self.index not in INDEXES:
            raise PlanError(f"policy 'retrieval_offload': 'index' must be one of {', '.join(INDEXES)}, got {self.index!r}")

    def kv_tokens(self, seq_len: int) -> int:
        return min(seq_len, self.sink + self.window)

    def short(self) -> str:
        return f"offload{self.sink}+{self.window}+{self.top_k}" + {"hnsw": "", "ivf": "i", "exact": "x"}[self.index]

    def make_store(self, batch, heads, head_dim, device, dtype) -> OffloadStore:
        return OffloadStore(batch, heads, head_dim, device, dtype, self)

    def attend(self, q, k, v, store: OffloadStore, ctx: AttendContext) -> torch.Tensor:
        L = q.shape[2]
        if L == 1:
            return self._decode(q, k, v, store, ctx)
        # Prefill: exact. The chunk against the device part (before the chunk) and itself, then the host tokens.
        old_k, old_v, old_pos = store.ring.view()
        new_pos = torch.arange(ctx.start, ctx.start + L, device=q.device)
        keys, values = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
        k_pos = torch.cat([old_pos, new_pos])
        mask = (k_pos[None, :] >= 0) & (k_pos[None, :] <= new_pos[:, None])
        parts = [attention_with_lse(q, keys, values, ctx.scale, mask)]
        n = store.host_length
        if n:
            step = max(1, HOST_BLOCK // (q.shape[0] * q.shape[1] * L))
            for a in range(0, n, step):
                hk, hv = store.host_block(a, min(n, a + step))
                parts.append(attention_with_lse(q, hk, hv, ctx.scale))
        store.append(k, v)
        return merge_partials(parts, ctx.use_kernels).to(q.dtype)

    def _decode(self, q, k, v, store: OffloadStore, ctx: AttendContext) -> torch.Tensor:
        store.append(k, v)
        q_host = q[:, :, 0].float().cpu() if store.host_length else None  # before the device work is queued
        keys, values, pos = store.ring.view()
        static = attention_with_lse(q, keys, values, ctx.scale, (pos >= 0)[None, :])
        if q_host is None:
            return static[0].to(q.dtype)
        ids = store.search(q_host, min(self.top_k, store.host_length))  # on the host while the device works
        found = (ids >= 0).to(q.device, non_blocking=True)[:, :, None, None, :]  # an index may return fewer
        rk, rv = store.gather(ids.clamp_min(0))  # [B, Hq, n, D] each, on the device
        retrieved = attention_with_lse(q, rk, rv, ctx.scale, found, per_query_head=True)
        return merge_partials([static, retrieved], ctx.use_kernels).to(q.dtype)


class OffloadStore:
    """A ``retrieval_offload`` head group's cache: sinks + ring on the device (``SinkWindowStore``), every token that
    left the ring in host memory (pinned when the device is CUDA), and one index per (sequence, KV head) over the host
    keys. Host slot ``i`` holds position ``sink + i`` (tokens leave the ring in position order)."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 policy: RetrievalOffload):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype, self.policy = device, dtype, policy
        self.ring = SinkWindowStore(batch, heads, head_dim, device, dtype, policy.sink, policy.window)
        self.pin = device.type == "cuda"
        # A cache sized on the meta device (Engine.kv_estimate) allocates nothing on the host either.
        self.host = torch.device("meta") if device.type == "meta" else torch.device("cpu")
        self.host_k = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=self.host)
        self.host_v = torch.empty(batch, heads, 0, head_dim, dtype=dtype, device=self.host)
        self.host_length = 0
        self.indexes: list[list[Any]] = []  # made when the first tokens leave the ring

    @property
    def tokens(self) -> int:
        return self.ring.seen

    def reserve(self, total: int) -> None:
        """Device slots for ``total`` tokens; host rows for what will leave the ring."""
        self.ring.reserve(total)
        self._grow_host(max(0, total - self.policy.sink - self.policy.window))

    def advance(self, n: int) -> None:
        raise RuntimeError("a retrieval_offload store is not written by CUDA graphs (graph_decode is False)")

    def rewind(self, tokens: int) -> None:
        if tokens != self.ring.seen:
            raise RuntimeError(f"a retrieval_offload store cannot rewind from {self.ring.seen} to {tokens} tokens")

    def tensors(self) -> list[torch.Tensor]:
        """The device tensors (what a GPU budget counts); the host part is ``host_bytes``."""
        return self.ring.tensors()

    def host_bytes(self) -> int:
        """Bytes of the host keys and values (allocated rows), the indexes not included."""
        return sum(t.numel() * t.element_size() for t in (self.host_k, self.host_v))

    def _grow_host(self, rows: int) -> None:
        if rows <= self.host_k.shape[2]:
            return
        shape = (self.batch, self.heads, rows, self.head_dim)
        hk = torch.empty(shape, dtype=self.dtype, device=self.host, pin_memory=self.pin)
        hv = torch.empty(shape, dtype=self.dtype, device=self.host, pin_memory=self.pin)
        hk[:, :, : self.host_length] = self.host_k[:, :, : self.host_length]
        hv[:, :, : self.host_length] = self.host_v[:, :, : self.host_length]
        self.host_k, self.host_v = hk, hv

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [batch, heads, n, head_dim]``: the tokens that leave the ring (or never enter it) go to the
        host and their keys to the indexes, then the ring takes the chunk."""
        n, seen = k.shape[2], self.ring.seen
        sink, window = self.policy.sink, self.policy.window
        first = max(sink, seen - window)  # oldest position in the ring before this chunk
        last = max(sink, seen + n - window)  # positions first .. last - 1 leave (or skip) the ring
        if last > first:
            parts_k, parts_v = [], []
            if first < min(last, seen):
                old = torch.arange(first, min(last, seen), device=self.device)
                slots = sink + (old - sink) % window
                parts_k.append(self.ring.keys[:, :, slots])
                parts_v.append(self.ring.values[:, :, slots])
            a = max(first, seen) - seen  # chunk tokens that never stay in the ring
            if last > seen:
                parts_k.append(k[:, :, a : last - seen])
                parts_v.append(v[:, :, a : last - seen])
            self._to_host(torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2))
        self.ring.append(k, v)

    def _to_host(self, k: torch.Tensor, v: torch.Tensor) -> None:
        n = k.shape[2]
        need = self.host_length + n
        if need > self.host_k.shape[2]:
            self._grow_host(max(need, 2 * self.host_k.shape[2]))
        hk, hv = k.cpu(), v.cpu()
        self.host_k[:, :, self.host_length : need] = hk
        self.host_v[:, :, self.host_length : need] = hv
        keys = hk.float().numpy()
        if not self.indexes:
            self.indexes = [[make_index(self.policy, self.head_dim) for _ in range(self.heads)] for _ in range(self.batch)]
        for b in range(self.batch):
            for h in range(self.heads):
                self.indexes[b][h].add(keys[b, h])
        self.host_length = need

    def host_block(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host tokens ``a .. b-1`` on the device: ``[batch, heads, b - a, head_dim]`` each."""
        return (self.host_k[:, :, a:b].to(self.device, non_blocking=True),
                self.host_v[:, :, a:b].to(self.device, non_blocking=True))

    def search(self, q: torch.Tensor, k: int) -> torch.Tensor:
        """Host slots each query head retrieves: ``q: [batch, q_heads, head_dim]`` (fp32, host) -> long ``[batch,
        q_heads, k]``; query head ``j`` searches its KV head's index (GQA order)."""
        B, Hq, _ = q.shape
        group = Hq // self.heads
        qn = q.numpy()
        out = np.empty((B, Hq, k), dtype=np.int64)

        def one(bh: tuple[int, int]) -> None:
            b, h = bh
            out[b, h * group : (h + 1) * group] = self.indexes[b][h].search(qn[b, h * group : (h + 1) * group], k)

        pairs = [(b, h) for b in range(B) for h in range(self.heads)]
        if len(pairs) > 1 and self.policy.index != "exact":  # faiss releases the GIL while it searches
            list(_pool().map(one, pairs))
        else:
            for bh in pairs:
                one(bh)
        return torch.from_numpy(out)

    def gather(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Host keys and values at ``ids: [batch, q_heads, n]`` (host slots), copied to the device (from pinned
        memory where the device is CUDA): ``[batch, q_heads, n, head_dim]`` each."""
        B, Hq, _ = ids.shape
        group = Hq // self.heads
        kv_head = torch.arange(Hq) // group
        bi, hi = torch.arange(B)[:, None, None], kv_head[None, :, None]
        rk, rv = self.host_k[bi, hi, ids], self.host_v[bi, hi, ids]
        if self.pin:
            rk, rv = rk.pin_memory(), rv.pin_memory()
        return rk.to(self.device, non_blocking=True), rv.to(self.device, non_blocking=True)


class ExactIndex:
    """Every key scored (``keys @ q``) and the top ``k`` kept: the reference a real index is measured against."""

    def __init__(self, dim: int):
        self.keys = np.empty((0, dim), dtype=np.float32)
        self.n = 0

    def add(self, keys: np.ndarray) -> None:
        if self.n + len(keys) > len(self.keys):
            grown = np.empty((max(self.n + len(keys), 2 * len(self.keys)), self.keys.shape[1]), dtype=np.float32)
            grown[: self.n] = self.keys[: self.n]
            self.keys = grown
        self.keys[self.n : self.n + len(keys)] = keys
        self.n += len(keys)

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        scores = q @ self.keys[: self.n].T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < self.n else np.tile(np.arange(self.n), (len(q), 1))
        return top


class HnswIndex:
    """faiss's HNSW over the keys by inner product (``IndexHNSWFlat``, ``METRIC_INNER_PRODUCT``, M=32,
    efConstruction=128), grown as keys arrive. Of the three HNSW libraries faiss-cpu had the best recall@100 at every
    search width on SmolLM2's keys and queries (``bench/results/ann_choice_2026-12-02.json``: 0.88 at ef 256, 195 us
    per query; hnswlib 0.81 at 178 us, 0.87 at ef 512 and 355 us; usearch 0.79 at 435 us); its inverted file
    (``IvfIndex``) did better still."""

    def __init__(self, dim: int, ef: int, m: int = 32, ef_construction: int = 128):
        try:
            import faiss
        except ImportError:
            raise PlanError("policy 'retrieval_offload' with index \"hnsw\" needs faiss-cpu: pip install "
                            "'headwise[offload]' (or use index \"exact\")") from None
        self.index = faiss.IndexHNSWFlat(dim, m, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = ef_construction
        self.ef = ef

    def add(self, keys: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(keys, dtype=np.float32))

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """``[m, k]`` ids; -1 where the graph returned fewer than ``k``."""
        self.index.hnsw.efSearch = max(self.ef, k)
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)[1].astype(np.int64)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=min(32, os.cpu_count() or 1), thread_name_prefix="headwise-ann")


class IvfIndex:
    """faiss's inverted file over the keys by inner product (``IndexIVFFlat``): trained (k-means, ``min(4 sqrt(n),
    n / 39)`` lists) once ``train_at`` keys are there (the policy's ``exact_below``), exact search before; later keys
    join the trained lists.
    A search scans ``probe`` of the lists. The default index: on SmolLM2's keys and queries (8192 per head) it had
    recall@100 0.95 at 5% of the lists and 99 us per query, against HNSW's best 0.91 (faiss, ef 512, 382 us), and
    built in half HNSW's time (``bench/results/ann_choice_2026-12-02.json``). Lists trained on the first keys may grow
    uneven over a long context."""

    def __init__(self, dim: int, probe: float, train_at: int = IVF_TRAIN_AT):
        try:
            import faiss
        except ImportError:
            raise PlanError("policy 'retrieval_offload' with index \"ivf\" needs faiss-cpu: pip install "
                            "'headwise[offload]' (or use index \"exact\")") from None
        self.faiss, self.dim, self.probe, self.train_at = faiss, dim, probe, train_at
        self.exact: ExactIndex | None = ExactIndex(dim)
        self.index: Any = None

    def add(self, keys: np.ndarray) -> None:
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if self.exact is None:
            self.index.add(keys)
            return
        self.exact.add(keys)
        n = self.exact.n
        if n >= self.train_at:
            nlist = max(1, min(int(4 * n**0.5), n // 39))
            self.index = self.faiss.IndexIVFFlat(self.faiss.IndexFlatIP(self.dim), self.dim, nlist,
                                                 self.faiss.METRIC_INNER_PRODUCT)
            self.index.train(self.exact.keys[:n])
            self.index.add(self.exact.keys[:n])
            self.exact = None

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        """``[m, k]`` ids; -1 where the scanned lists held fewer than ``k`` keys."""
        if self.exact is not None:
            return self.exact.search(q, k)
        self.index.nprobe = max(1, round(self.probe * self.index.nlist))
        return self.index.search(np.ascontiguousarray(q, dtype=np.float32), k)[1].astype(np.int64)


def make_index(policy: RetrievalOffload, dim: int) -> Any:
    if policy.index == "hnsw":
        return HnswIndex(dim, policy.ef)
    if policy.index == "ivf":
        return IvfIndex(dim, policy.probe, max(IVF_TRAIN_AT, policy.exact_below))
    return ExactIndex(dim)


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                       mask: torch.Tensor | None = None, per_query_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of ``q: [B, Hq, L, D]`` over ``k, v: [B, Hkv, S, D]`` (GQA order; ``per_query_head``: ``[B,
    Hq, S, D]``, one key set per query head), ``mask`` broadcasting to ``[B, Hkv, group, L, S]`` (True = attend; e.g.
    ``[L, S]``) -> the normalised output fp32 ``[B,
    Hq, L, D]`` and its natural-log log-sum-exp fp32 ``[B, Hq, L]`` (-inf, output 0, where nothing is attended)."""
    B, Hq, L, D = q.shape
    Hk = Hq if per_query_head else k.shape[1]
    qg = q.float().view(B, Hk, Hq // Hk, L, D)
    logits = torch.einsum("bhgld,bhsd->bhgls", qg, k.float()) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.exp(logits - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("bhgls,bhsd->bhgld", probs, v.float())
    return out.reshape(B, Hq, L, D), lse.reshape(B, Hq, L)


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]], use_kernels: bool = False) -> torch.Tensor:
    """Exact merge of partial attentions over disjoint key sets: ``sum_i e^{lse_i} o_i / sum_i e^{lse_i}``. ``parts``:
    (output fp32 ``[B, Hq, L, D]``, natural log-sum-exp ``[B, Hq, L]``). With kernels, one decode token (``L == 1``)
    merges through ``merge_splits`` (log2 domain), the decode kernels' own split-K merge."""
    o = torch.stack([p[0] for p in parts], dim=3)  # [B, Hq, L, n, D]
    lse = torch.stack([p[1] for p in parts], dim=3)  # [B, Hq, L, n]
    if use_kernels and o.shape[2] == 1:
        from headwise.kernels.paged_decode import merge_splits

        out = torch.empty(o.shape[0], o.shape[1], o.shape[4], device=o.device, dtype=torch.float32)
        merge_splits(o[:, :, 0].contiguous(), (lse[:, :, 0] / math.log(2)).contiguous(), out, len(parts))
        return out.unsqueeze(2)
    m = lse.amax(dim=-1, keepdim=True).nan_to_num(neginf=0.0)
    w = torch.exp(lse - m)
    return (w[..., None] * o).sum(dim=3) / w.sum(dim=-1, keepdim=True).clamp_min(1e-30)
