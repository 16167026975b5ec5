"""``longheads``: each head attends the chunks it chooses, at positions re-assigned within the trained length.

LongHeads (Lu et al., 2024, https://arxiv.org/abs/2402.10685; code: github.com/LuLuLuyi/LongHeads) cuts the
context into chunks of ``chunk_size`` tokens. A query at position ``p`` in chunk ``c_q = p // chunk_size``
attends, once ``p >= window`` (``window = (top_k + 3) * chunk_size``), to ``top_k + 3`` chunks only: the first
chunk, its ``top_k`` best-scored chunks among ``1 .. c_q - 2``, the previous chunk ``c_q - 1`` and its own chunk
(up to itself). Queries at ``p < window`` attend everything, exactly (full causal attention). Every head sees at
most ``window`` tokens, so ``window`` no greater than the trained length keeps what RoPE shows it in distribution,
while different heads (and layers) read different chunks of a longer context.

*Chunk scores* (the paper's chunk representation, as its code computes it). When chunk ``c`` is complete, its
queries attend over its own keys, non-causally (``softmax(Q_c K_c^T * scale) V_c``); the mean of these outputs
over the chunk's tokens (and, here, over the query heads sharing the KV head) is the chunk's summary ``s_c``; the
chunk's representative key is the attention-pooled key ``r_c = softmax(s_c K'_c^T / sqrt(D)) K'_c``, where ``K'_c``
are the chunk's keys rotated at their offsets *inside* the chunk (positions ``0 .. chunk_size - 1``). A query
scores chunk ``c`` by ``q~ . r_c`` with ``q~`` the query before RoPE. By default (``choose_per="kv_head"``) the
scores of the query heads sharing a KV head are summed and the chunks are chosen per KV head; with
``choose_per="query_head"`` each query head has its own summary (the mean of its own outputs), representative and
choice, which is the paper's rule on its MHA Llama-2, where the two coincide. A KV head's query heads then read
different chunks of its cache: up to ``group`` times the keys and values a shared choice reads.

*Positions.* The chosen chunks are laid out in increasing order in ``top_k + 3`` slots: slot ``s`` holds its
chunk's token ``o`` at position ``s * chunk_size + o``, and the query sits at ``(top_k + 2) * chunk_size + p %
chunk_size``, inside its own chunk's slot, so every distance is below ``window``. The cache keeps keys as the model
rotated them (at their own positions) and moves the *query* instead: since ``(R(a) q) . (R(b) k)`` depends only on
``b - a``, the query rotated by ``(c_s - s) * chunk_size + a_q - p`` against key ``k`` of chunk ``c_s`` scores
exactly what the re-assigned positions give (``rope.rotate``; ``top_k + 3`` rotations of each query, none of the
keys). Where nothing moves (``p < window``) nothing is rotated, so a context within ``window`` is full attention,
bit for bit.

*Bound scores* (``chunk_score="bound"``, not the paper's). A chunk is scored instead by Quest's upper bound of the
query's attention logits over its keys as the model rotated them (at their own positions): per page of
``bound_page`` tokens (Quest's 16), ``sum_d max(q_d * kmin_d, q_d * kmax_d)`` with ``kmin, kmax`` the page's
per-channel minimum and maximum key, summed over the query heads sharing the KV head; the chunk's score is its best
page's (a bound over a whole chunk of 256 keys would be loose: any outlier key in it lifts every channel). The
paper's representative is one pooled key per chunk, which a short sentence in a chunk of natural text barely
moves: on the H200 (docs/ARCHITECTURE.md) Gemma 3 under the paper's scores found 91% of
the passkeys at 16K (a distinctive sentence in its chunk) but 30% of the needles (a key-value sentence among
Shakespeare's), where dense found 98%. A bound is never below any of its page's logits, so a chunk holding one key
the query matches scores high whatever the rest of the chunk holds. It costs two vectors per page (the paper's: one
per chunk).

*Max scores* (``chunk_score="max"``, not the paper's). A chunk is scored by its best logit for the query at the
paper's positions, ``max_o q~ . R(o) k_o`` over its keys at their offsets ``o`` inside it (for a few queries, as in
decode, computed as the query rotated by ``c * chunk_size - p`` against the keys as stored: ``(R(c C - p) q) . (R(t)
k) = q~ . R(t - c C) k``; for a prefill chunk's queries, as one product of the queries before RoPE with the keys
rotated once to their offsets, a transient copy of the complete chunks' keys);
the group's query heads' maxima summed per KV head. Nothing is kept for it, but choosing reads every key of every
complete chunk for every query past the window (a QK pass as dense attention's, without its softmax and values), so
what it saves is RoPE's range, not work. Why: on Gemma 3 at 8K (``bench/experiments/longheads_head_choice.py``, the
CPU, real weights) the global heads that copy a needle's number put 0.5-1.0 of their attention on it at every
answer token; the paper's pooled representative, which one short sentence barely moves, leaves its chunk out at some
answer tokens, which breaks the number. The best key finds it, chosen per KV head or per query head alike.

How this differs from the paper's code:
- The query attends to itself (the code's selected keys stop one short of the query during prefill).
- Prefill and decode choose chunks by one rule (the code's decode step, at the last token of a chunk, offers the
  previous chunk to the top-k rather than keeping it); chunked prefill, one-shot prefill and token-by-token decode
  give the same result.
- GQA: chunks chosen per KV head, summaries averaged over its query heads, unless ``choose_per="query_head"``
  (above).

Memory: every token is kept (LongHeads extends the context, it does not evict) plus one representative key per
complete chunk: ``kv_tokens = seq_len + ceil((seq_len // chunk_size) / 2)`` (a key is half a slot); with bound
scores two vectors per page of a complete chunk (one slot per ``bound_page`` tokens: 1/16 more). The store also
holds the queries of the chunk being filled (``group * chunk_size`` vectors per KV head, at most), which its chunk
summary needs; ``HeadwiseCache.kv_bytes`` counts them, the plan cannot (it does not know the group size); nor
does it count the ``group - 1`` more representatives per chunk and KV head that the paper's scores keep per query
head. Max scores keep nothing besides the tokens: exactly dense's KV. The store holds the tokens it has, no more
(its newest chunk may be partial: the kernel never reads past the last token), so a LongHeads head with max scores
never holds more than a dense head; the paper's and bound scores hold their scoring vectors beside them (1/512 and
1/16 more with chunks of 256), which no scheme that scores chunks by kept vectors can avoid.

Paths: past ``window`` a query block's chunks are chosen and its queries rotated once per chosen chunk in PyTorch;
with kernels on (a GPU, or TRITON_INTERPRET=1) the Triton kernel ``kernels/chunk_attention.py`` reads the chosen
chunks in place, else its reference gathers their keys and values (``top_k + 3`` chunks per query and KV head);
blocks are sized to bound the gathered bytes or the rotated queries. Within ``window``, ``causal_attention`` (or
the decode kernel). No CUDA-graph decode. Needs the layer's RoPE frequencies (``ModelSpec.rope``); on a model's
native sliding-window layer it is replaced by the window, as ``full`` is (``plan.resolve``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from headwise.errors import PlanError
from headwise.kernels.chunk_attention import chosen_chunk_attention, chosen_chunk_attention_ref
from headwise.kernels.common import INTERPRET
from headwise.policies.base import AttendContext, Policy, causal_attention, check_positive, kernel_decode
from headwise.policies.stores import DenseStore
from headwise.rope import rotate

SCORES = ("paper", "bound", "max")
CHOOSERS = ("kv_head", "query_head")
GATHER_ELEMENTS = 1 << 26  # per query block: keys gathered (x2 with values), or rotated queries with the kernel


@dataclass(frozen=True)
class LongHeads(Policy):
    name: ClassVar[str] = "longheads"
    paper: ClassVar[str] = "https://arxiv.org/abs/2402.10685"
    keeps_every_token: ClassVar[bool] = True  # chunks are read selectively, never dropped

    chunk_size: int = 256
    """Tokens per chunk. The paper uses 256."""
    top_k: int = 13
    """Chunks chosen by score per query, besides the first, the previous and its own: a head attends
    ``(top_k + 3) * chunk_size`` tokens at most. The paper's 4096-token window with chunks of 256 is ``top_k=13``."""
    chunk_score: str = "paper"
    """How chunks are scored: ``"paper"`` (the attention-pooled representative key), ``"bound"`` (Quest's upper bound
    over the chunk's pages of keys) or ``"max"`` (the chunk's best key at the paper's positions; module docstring)."""
    bound_page: int = 16
    """Tokens per page of the bound scores (a divisor of ``chunk_size``); unused with the paper's scores."""
    choose_per: str = "kv_head"
    """Who chooses chunks: ``"kv_head"`` (the group's query heads' scores summed, one choice per KV head) or
    ``"query_head"`` (each query head scores and chooses its own chunks, as on the paper's MHA model; module
    docstring)."""

    def validate(self) -> None:
        check_positive(self, chunk_size=self.chunk_size, top_k=self.top_k)
        if self.chunk_score not in SCORES:
            raise PlanError(f"policy 'longheads': 'chunk_score' must be one of {', '.join(map(repr, SCORES))}, got "
                            f"{self.chunk_score!r}")
        if self.choose_per not in CHOOSERS:
            raise PlanError(f"policy 'longheads': 'choose_per' must be one of {', '.join(map(repr, CHOOSERS))}, got "
                            f"{self.choose_per!r}")
        if self.bounds and (self.bound_page < 1 or self.chunk_size % self.bound_page):
            raise PlanError(f"policy 'longheads': 'bound_page' ({self.bound_page}) must divide 'chunk_size' "
                            f"({self.chunk_size})")
        if self.chunk_size < 1:
            raise PlanError("policy 'longheads': 'chunk_size' must be at least 1")

    @property
    def bounds(self) -> bool:
        """Whether chunks are scored by their pages' key bounds (``chunk_score="bound"``), not representatives."""
        return self.chunk_score == "bound"

    @property
    def per_query_head(self) -> bool:
        """Whether each query head chooses its own chunks (``choose_per="query_head"``)."""
        return self.choose_per == "query_head"

    @property
    def window(self) -> int:
        """Tokens a query attends at most, and the position from which chunks are chosen."""
        return (self.top_k + 3) * self.chunk_size

    @property
    def position_span(self) -> int | None:
        return self.window

    def kv_tokens(self, seq_len: int) -> int:
        return seq_len + -(-(seq_len // self.chunk_size) * self._vectors() // 2)

    @property
    def by_keys(self) -> bool:
        """Whether chunks are scored from their keys directly (``chunk_score="max"``): nothing kept for scoring."""
        return self.chunk_score == "max"

    def _vectors(self) -> int:
        """Vectors kept per complete chunk for scoring: the representative key, each page's minimum and maximum, or
        none (``max``)."""
        return 2 * (self.chunk_size // self.bound_page) if self.bounds else 0 if self.by_keys else 1

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Keys and values of every token and one representative key per complete chunk, or with bound scores its
        pages' minimum and maximum keys (the queries of the chunk being filled are not counted: see the module
        docstring)."""
        return (2 * seq_len + self._vectors() * (seq_len // self.chunk_size)) * head_dim * dtype_bytes

    def short(self) -> str:
        return (f"longheads{self.top_k}x{self.chunk_size}" + ("b" if self.bounds else "m" if self.by_keys else "")
                + ("q" if self.per_query_head else ""))

    def make_store(self, batch, heads, head_dim, device, dtype) -> ChunkStore:
        return ChunkStore(batch, heads, head_dim, device, dtype, self.chunk_size,
                          self.bound_page if self.bounds else 0, self.per_query_head, self.by_keys)

    def attend(self, q, k, v, store: ChunkStore, ctx: AttendContext) -> torch.Tensor:
        if ctx.rope is None:
            raise PlanError(f"policy 'longheads' needs layer {ctx.layer_idx}'s RoPE frequencies, which this model's "
                            "config does not give in a form headwise reads (ModelSpec.rope); use another policy")
        L, start = q.shape[2], ctx.start
        store.append(k, v)
        store.commit_queries(q, start, ctx.scale, ctx.rope)
        end, W = start + L, self.window
        if L == 1 and ctx.use_kernels and end <= W:
            assert store.keys is not None and store.values is not None
            return kernel_decode(q, store.keys, store.values, store.length, ctx.scale)
        keys, values = store.view()
        n_full = max(0, min(L, W - start))  # queries before ``window``: full attention
        if n_full == L:
            return causal_attention(q, keys, values, start, ctx.scale)
        outs = []
        if n_full:
            outs.append(causal_attention(q[:, :, :n_full], keys[:, :, : start + n_full], values[:, :, : start + n_full],
                                         start, ctx.scale))
        B, Hkv, _, D = keys.shape
        kernel = ctx.use_kernels and (q.is_cuda or INTERPRET)
        # a block's gathered chunks per chooser (the reference), or its queries rotated once per slot (the kernel)
        per_query = q.shape[1] * (self.top_k + 3) * D if kernel else self._choosers(Hkv, q.shape[1]) * self.window * D
        local = None
        if self.by_keys:  # scoring: each query's logits over every key of the complete chunks
            if self._rotate_keys(q.shape[1] // Hkv * (L - n_full)):  # enough queries: rotate the keys once
                local = local_keys(store, ctx.rope)
                per_query = max(per_query, q.shape[1] * (store.n_reps * self.chunk_size + D))
            else:  # a few queries: each rotated once per complete chunk
                per_query = max(per_query, q.shape[1] * store.n_reps * (D + self.chunk_size))
        block = max(1, GATHER_ELEMENTS // (B * per_query))
        for a in range(n_full, L, block):
            b = min(L, a + block)
            pos = torch.arange(start + a, start + b, device=q.device)
            outs.append(self.attend_chosen(q[:, :, a:b], pos, store, ctx.scale, ctx.rope, kernel, local))
        return torch.cat(outs, dim=2)

    def _rotate_keys(self, queries: int) -> bool:
        """Whether max scores for ``queries`` query vectors per KV head rotate the keys once to their offsets (at least
        a chunk's worth of queries) rather than each query once per chunk (``chunk_scores``)."""
        return queries >= self.chunk_size

    def _choosers(self, kv_heads: int, q_heads: int) -> int:
        return q_heads if self.per_query_head else kv_heads

    def choose(self, q: torch.Tensor, pos: torch.Tensor, store: ChunkStore, rope: torch.Tensor,
               local: torch.Tensor | None = None) -> torch.Tensor:
        """Chunks each query attends, in slot order: ``q: [B, Hq, Lb, D]`` at positions ``pos: [Lb]`` (all ``>=
        window``) -> ``[B, Ht, Lb, top_k + 3]`` chunk indices per chooser (``Ht``: KV heads, or query heads with
        ``choose_per="query_head"``): 0, the ``top_k`` best of ``1 .. c_q - 2`` by ``chunk_scores`` (increasing),
        ``c_q - 1``, ``c_q``. ``local``: max scores' keys at their offsets in their chunks (``local_keys``), if the
        caller has them."""
        cq = pos // self.chunk_size
        scores = self.chunk_scores(q, pos, store, rope, local)
        r = torch.arange(store.n_reps, device=q.device)
        candidate = (r[None, :] >= 1) & (r[None, :] <= cq[:, None] - 2)  # [Lb, R]
        scores = scores.masked_fill(~candidate, -math.inf)
        top = scores.topk(self.top_k, dim=-1).indices.sort(dim=-1).values
        B, Ht, Lb = top.shape[:3]
        fixed = torch.stack([torch.zeros_like(cq), cq - 1, cq], dim=-1).expand(B, Ht, Lb, 3)
        return torch.cat([fixed[..., :1], top, fixed[..., 1:]], dim=-1)

    def chunk_scores(self, q: torch.Tensor, pos: torch.Tensor, store: ChunkStore, rope: torch.Tensor,
                     local: torch.Tensor | None = None) -> torch.Tensor:
        """Every complete chunk's score for each query ``q: [B, Hq, Lb, D]`` at positions ``pos: [Lb]`` -> fp32
        ``[B, Ht, Lb, n_reps]`` per chooser: ``q~ . r_c`` (the paper's), the best page's bound, or the chunk's best
        logit at the paper's positions; a KV head's chooser sums its query heads' scores.

        Max scores take one of two equal routes (``(R(c C - p) q) . (R(t) k) = q~ . R(t - c C) k``): with ``local``
        (or ``G * Lb >= chunk_size`` queries to score) the query before RoPE against every key rotated to its offset
        in its chunk, one matrix product; with fewer queries (decode) each query rotated once per chunk against the
        keys as stored, which rotates ``n_reps`` vectors per query instead of every key."""
        B, Hq, Lb, D = q.shape
        Hkv, G = store.heads, Hq // store.heads
        if self.bounds:  # Quest's bound per page at the true positions
            ppc = self.chunk_size // self.bound_page
            qg = q.float().reshape(B, Hkv, G * Lb, D)
            up = qg.clamp(min=0)
            kmin, kmax = (t[:, :, : store.n_reps * ppc].float() for t in (store.kmin, store.kmax))
            scores = (torch.einsum("bhld,bhrd->bhlr", up, kmax) + torch.einsum("bhld,bhrd->bhlr", qg - up, kmin))
            scores = scores.view(B, Hkv, G, Lb, store.n_reps, ppc)
            scores = (scores.reshape(B, Hq, Lb, store.n_reps, ppc) if self.per_query_head else scores.sum(dim=2))
            return scores.amax(dim=-1)
        if self.by_keys:  # each chunk's best logit at the paper's positions: q~ . R(o) k over its keys
            n, C = store.n_reps, self.chunk_size
            assert store.keys is not None
            if local is None and not self._rotate_keys(G * Lb):  # each query rotated by c C - p against the keys
                keys = store.keys[:, :, : n * C].view(B, Hkv, n, C, D)  # the cache's dtype (products accumulate in fp32)
                shift = (torch.arange(n, device=q.device) * C)[None, :] - pos[:, None]  # [Lb, n]: R(c C - p) q
                qc = rotate(q.view(B, Hkv, G, Lb, 1, D), shift, rope).to(keys.dtype).view(B, Hkv, G * Lb, n, D)
                best = torch.einsum("bhlnd,bhncd->bhlnc", qc, keys).amax(dim=-1)
            else:  # the query before RoPE against the keys at their offsets in their chunks
                local = local_keys(store, rope) if local is None else local
                q_pre = rotate(q, -pos, rope).to(local.dtype).reshape(B, Hkv, G * Lb, D)
                best = torch.einsum("bhld,bhmd->bhlm", q_pre, local.view(B, Hkv, n * C, D)).view(
                    B, Hkv, G * Lb, n, C).amax(dim=-1)
            best = best.float().view(B, Hkv, G, Lb, n)
            return best.reshape(B, Hq, Lb, n) if self.per_query_head else best.sum(dim=2)
        q_pre = rotate(q, -pos, rope).float()  # the query before RoPE
        reps = store.reps[:, :, : store.n_reps].float()  # per query head, or per KV head
        if not self.per_query_head:
            q_pre = q_pre.view(B, Hkv, G, Lb, D).sum(dim=2)
        return torch.einsum("bhld,bhrd->bhlr", q_pre, reps)

    def attend_chosen(self, q: torch.Tensor, pos: torch.Tensor, store: ChunkStore, scale: float,
                      rope: torch.Tensor, kernel: bool = False, local: torch.Tensor | None = None) -> torch.Tensor:
        """Queries ``q: [B, Hq, Lb, D]`` at positions ``pos: [Lb]`` (all ``>= window``, their tokens stored) over
        their chosen chunks at re-assigned positions. Returns ``[B, Hq, Lb, D]``. ``kernel``: the Triton kernel reads
        the chunks in place (``kernels/chunk_attention.py``); else they are gathered (its reference). ``local``: as
        ``choose``."""
        B, Hq, Lb, D = q.shape
        C, n = self.chunk_size, self.top_k + 3
        Ht = self._choosers(store.heads, Hq)
        table = self.choose(q, pos, store, rope, local)  # [B, Ht, Lb, n]
        slot = torch.arange(n, device=q.device)
        a_q = (n - 1) * C + pos % C  # the query's re-assigned position
        shift = (table - slot) * C + (a_q - pos)[:, None]  # rotate the query by this for slot s: [B, Ht, Lb, n]
        q_slots = rotate(q.view(B, Ht, Hq // Ht, Lb, 1, D), shift[:, :, None], rope)  # [B, Ht, Hq / Ht, Lb, n, D]
        assert store.keys is not None and store.values is not None
        keys, values = store.keys[:, :, : store.length], store.values[:, :, : store.length]  # chunk c: c * C ..
        attend = chosen_chunk_attention if kernel else chosen_chunk_attention_ref
        return attend(q_slots, keys, values, table, pos % C, scale, C).to(q.dtype)


class ChunkStore(DenseStore):
    """``DenseStore`` (keys as the model rotated them; chunk ``c`` is tokens ``c * chunk_size ..``) + LongHeads'
    chunk representatives.

    The key and value buffers are a dense head's: the tokens reserved, no more (the newest chunk is partial until it
    completes; the attention never reads past the last token).

    ``reps: [batch, heads, chunk_capacity, head_dim]`` (``heads`` the query heads with ``per_query_head``), first
    ``n_reps`` valid: the representative key of every complete chunk (``chunk_representatives``). ``pending: [batch,
    q_heads, chunk_size, head_dim]``: the queries of the chunk being filled (positions ``n_reps * chunk_size ..
    length - 1``), kept until the chunk completes. With ``bound_page`` > 0 (``chunk_score="bound"``) ``kmin, kmax:
    [batch, heads, pages, head_dim]`` hold the per-channel minimum and maximum key of every page of ``bound_page``
    tokens of the complete chunks instead, and no queries are kept; with ``by_keys`` (``"max"``) nothing is kept
    besides the keys and values (``n_reps`` still counts the complete chunks).
    """

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 chunk_size: int, bound_page: int = 0, per_query_head: bool = False, by_keys: bool = False):
        super().__init__(batch, heads, head_dim, device, dtype)
        self.chunk_size = chunk_size
        self.bound_page = bound_page
        self.per_query_head = per_query_head
        self.by_keys = by_keys  # chunks scored from their keys alone: no representatives, bounds or queries kept
        self.rep_heads = heads  # with per-query-head representatives, the query heads (known at the first queries)
        self.reps = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.kmin = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.kmax = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.n_reps = 0
        self.pending: torch.Tensor | None = None

    @property
    def bounds(self) -> bool:
        """Chunks scored by page bounds (``chunk_score="bound"``) rather than representatives."""
        return self.bound_page > 0

    @property
    def pages_per_chunk(self) -> int:
        return self.chunk_size // self.bound_page if self.bounds else 0

    def reserve(self, total: int) -> None:
        super().reserve(total)
        self._grow_reps(total // self.chunk_size)

    def _chunks_held(self) -> int:
        return self.kmin.shape[2] // self.pages_per_chunk if self.bounds else self.reps.shape[2]

    def _grow_reps(self, chunks: int) -> None:
        if self.by_keys or chunks <= self._chunks_held():
            return

        def grown(old: torch.Tensor) -> torch.Tensor:
            per = self.pages_per_chunk if self.bounds else 1
            new = torch.empty(self.batch, old.shape[1], chunks * per, self.head_dim, device=self.device,
                              dtype=self.dtype)
            new[:, :, : self.n_reps * per] = old[:, :, : self.n_reps * per]
            return new

        if self.bounds:
            self.kmin, self.kmax = grown(self.kmin), grown(self.kmax)
        else:
            self.reps = grown(self.reps)

    def commit_queries(self, q: torch.Tensor, start: int, scale: float, rope: torch.Tensor) -> None:
        """Take the chunk's queries ``q: [B, Hq, L, D]`` (positions ``start ..``; their keys already appended):
        compute the representative of every chunk they complete, keep the rest until their chunk completes."""
        C, L = self.chunk_size, q.shape[2]
        if self.by_keys:
            self.n_reps = (start + L) // C
            return
        if self.pending is None and not self.bounds:
            self.pending = torch.empty(self.batch, q.shape[1], C, self.head_dim, device=self.device, dtype=q.dtype)
            if self.per_query_head:  # one representative per query head: nothing is held yet (no queries were)
                self.rep_heads = q.shape[1]
                self.reps = self.reps.new_empty(self.batch, self.rep_heads, self.reps.shape[2], self.head_dim)
        first, done = self.n_reps, (start + L) // C
        if done > first:
            assert self.keys is not None and self.values is not None
            have = self._chunks_held()
            if done > have:  # grow by doubling when no room was reserved, as DenseStore does
                self._grow_reps(max(done, 2 * have))
            if self.bounds:  # per-channel extremes of each completed page's keys (no queries needed)
                ppc, P = self.pages_per_chunk, self.bound_page
                keys = self.keys[:, :, first * C : done * C].view(self.batch, self.heads, (done - first) * ppc, P,
                                                                   self.head_dim)
                pages = slice(first * ppc, done * ppc)
                self.kmin[:, :, pages], self.kmax[:, :, pages] = keys.amin(dim=3), keys.amax(dim=3)
            else:
                held = start - first * C
                assert self.pending is not None
                qs = torch.cat([self.pending[:, :, :held], q[:, :, : done * C - start]], dim=2)
                reps = chunk_representatives(qs, self.keys[:, :, first * C : done * C],
                                             self.values[:, :, first * C : done * C], first, C, scale, rope,
                                             self.per_query_head)
                self.reps[:, :, first:done] = reps.to(self.dtype)
            self.n_reps = done
        a = max(start, done * C)
        if a < start + L and self.pending is not None:  # bounds need no queries (no pending buffer)
            self.pending[:, :, a - done * C : start + L - done * C] = q[:, :, a - start :]

    def tensors(self) -> list[torch.Tensor]:
        return (super().tensors() + ([self.kmin, self.kmax] if self.bounds else [] if self.by_keys else [self.reps])
                + ([self.pending] if self.pending is not None else []))


def local_keys(store: ChunkStore, rope: torch.Tensor) -> torch.Tensor:
    """The keys of the store's complete chunks rotated to their offsets inside their chunks (``R(o) k`` for the key at
    offset ``o``; the cache holds ``R(c C + o) k``): ``[B, Hkv, n_reps, chunk_size, D]`` in the cache's dtype, a
    transient for max scores (not kept)."""
    assert store.keys is not None
    n, C = store.n_reps, store.chunk_size
    keys = store.keys[:, :, : n * C].view(store.batch, store.heads, n, C, store.head_dim)
    return rotate(keys, -(torch.arange(n, device=keys.device) * C)[:, None], rope)


def chunk_representatives(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int, chunk_size: int,
                          scale: float, rope: torch.Tensor, per_query_head: bool = False) -> torch.Tensor:
    """Representative keys of complete chunks ``first, first + 1, ...``: ``q: [B, Hq, n * C, D]`` and ``k, v: [B,
    Hkv, n * C, D]`` their tokens (rotated at their own positions) -> fp32 ``[B, Hkv, n, D]`` (``[B, Hq, n, D]`` with
    ``per_query_head``).

    Per chunk: ``s = mean(softmax(Q K^T * scale) V)`` over its tokens and the group's query heads (each query head's
    own with ``per_query_head``; non-causal attention inside the chunk; relative positions, so no rotation needed),
    then ``softmax(s K'^T / sqrt(D)) K'`` with ``K'`` the keys rotated to their offsets inside the chunk."""
    B, Hq, T, D = q.shape
    Hkv, C = k.shape[1], chunk_size
    n = T // C
    qc = q.view(B, Hq, n, C, D).transpose(1, 2).reshape(B * n, Hq, C, D)
    kc = k.view(B, Hkv, n, C, D).transpose(1, 2).reshape(B * n, Hkv, C, D)
    vc = v.view(B, Hkv, n, C, D).transpose(1, 2).reshape(B * n, Hkv, C, D)
    feats = F.scaled_dot_product_attention(qc, kc, vc, scale=scale, enable_gqa=Hq != Hkv)
    summary = feats.float().view(B, n, Hkv, Hq // Hkv, C, D).mean(dim=4).permute(0, 2, 3, 1, 4)  # [B, Hkv, G, n, D]
    if not per_query_head:
        summary = summary.mean(dim=2, keepdim=True)
    chunk = first + torch.arange(n, device=q.device)
    local = rotate(k.view(B, Hkv, n, C, D), -(chunk * C)[:, None], rope).float()  # offsets inside the chunk
    w = torch.softmax(torch.einsum("bhgnd,bhncd->bhgnc", summary, local) / math.sqrt(D), dim=-1)
    return torch.einsum("bhgnc,bhncd->bhgnd", w, local).flatten(1, 2)
