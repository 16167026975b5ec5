"""The engine: chunked prefill and decode of a real model through a head plan, one step at a time.

    engine = Engine(load_model("smollm2-135m"), HeadPlan.load("plans/smollm2-135m.json"))
    for event in engine.generate(prompt_ids, max_new_tokens=64):
        print(event.text, end="")

``generate`` is ``add`` plus a loop of ``step``. ``Engine.add`` makes a ``Sequence`` (``sequence.py``: one
request's prompt, sampling, stop rules and cache) live; ``Engine.step`` advances every live sequence once, in
one forward: each decoding sequence feeds back its last token, and sequences still reading their prompt run
their next chunk (chunked prefill mixed with decode, as vLLM and Sarathi do), within a budget of prompt tokens
per step. The server's scheduler (``server/scheduler.py``) only decides which sequences are live.

The engine owns nothing model-specific: transformers runs the model; headwise's attention function and
cache (``attention.py``, ``cache.py``) run every layer's attention head group by head group. On a
tensor-parallel model (``LoadedModel.tp``, ``tp.py``) a cache holds this rank's heads only, and rank 0 announces
each forward to the other ranks before it runs it.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from headwise import attention as _attention  # registers the "headwise" attention implementation
from headwise.batch_graphs import (
    BatchGraphs,
    PaddedBatch,
    capture_graph,
    padded_blockers,
    padded_size,
    warm_up_on_capture_stream,
)
from headwise.cache import HeadwiseCache
from headwise.errors import BudgetError, ContextLengthError, HeadwiseError, InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.pool import PagePool, SequencePages
from headwise.sequence import (
    GREEDY_TEMPERATURE,
    SEED_END,
    SEED_MIN,
    GenerationStats,
    SamplingParams,
    Sequence,
    Status,
    TokenEvent,
    is_greedy,
    sample_next,
)

DEFAULT_CHUNK = 512
GRAPH_MIN_STEPS = 8  # decode steps from which a lone sequence replays them from a CUDA graph unless told (capture ~3 steps)
_T = TypeVar("_T")
log = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHUNK", "GRAPH_MIN_STEPS", "GREEDY_TEMPERATURE", "SEED_END", "SEED_MIN", "Engine", "GenerationStats", "GraphDecoder", "SamplingParams",
           "Sequence", "StepInfo", "TokenEvent", "sample_next"]


@dataclass
class StepInfo:
    """What one ``Engine.step`` did (the server's metrics read it)."""

    decode_rows: int = 0  # sequences that fed back a token
    preempted: int = 0  # sequences preempted to free pages
    prefill_tokens: int = 0  # prompt tokens read
    chunk_starts: list[int] = field(default_factory=list)  # prompt position each prompt chunk read starts at
    decode_steps: int = 0  # forwards each decode row ran: 1, or up to ``Engine.multi_step`` in a multi-step
    graph: bool = False  # the step was replayed from a CUDA graph (a lone sequence's, or the pool's at ``padded``)
    padded: int = 0  # the padded batch size of a decode step run on static buffers over the pool (0: none)
    seconds: float = 0.0
    finished: list[Sequence] = field(default_factory=list)  # sequences that ended in this step


DENSE_PREFILL = ("paged", "gather")
"""``Engine(dense_prefill=...)``: the paged prefill kernel over the pool, or a gathered copy and SDPA."""


class Engine:
    """Runs a loaded model with a head plan."""

    def __init__(self, lm: LoadedModel, plan: HeadPlan | None = None, chunk_size: int = DEFAULT_CHUNK,
                 use_kernels: bool | None = None, cuda_graphs: bool | None = None, pool: PagePool | None = None,
                 padded_decode: bool | None = None, multi_step: int = 1, dense_prefill: str = "paged",
                 compile_layers: bool = False):
        """``use_kernels``: the Triton kernels (default: on CUDA). ``cuda_graphs``: a sequence decoding alone replays
        its decode steps from a CUDA graph (``GraphDecoder``); default: whenever the device, the kernels and every policy
        of the plan allow it and at least ``GRAPH_MIN_STEPS`` decode steps are asked for, else eager steps;
        True: required (an error says what prevents it); False: never. ``pool``: the KV pages sequences hold
        (``pool.py``), allocated here once if they are not yet: a step grows a sequence only when its pages are
        there, preempting the newest sequence when the pool runs dry; the KV of policies with a ``paged_layout``
        lives in those pages and their decode steps run batched over the pool (``paged_cache.py``); without a
        pool, every sequence's cache is reserved for its whole length.

        ``padded_decode``: under a pool, a step that only decodes, with every sequence under one plan whose groups
        all keep their KV in the pool, runs on static buffers at a padded batch size (``batch_graphs.py``), replayed
        from a CUDA graph captured at that size when the device, the kernels and ``cuda_graphs`` allow it (the
        pool's decode graphs take the place of a lone sequence's ``GraphDecoder``, which cannot read pool pages).
        Default: whenever such a graph can be captured, else the eager batched step; True: always, eagerly where
        no graph can be captured (CPU tests of the padded step); False: never.

        ``multi_step``: a padded decode-only step whose sequences all decode greedily runs up to this many decode
        steps in a row, each fed the argmax of the last on the device, and reads the tokens back once
        (``BatchGraphs.decode``; vLLM's multi-step scheduling). The tokens are those of single steps; the host's work
        per step (pages, tables, sampling, stop checks) is paid once per ``multi_step`` tokens instead of between
        every two forwards, where the GPU waits for it. A sequence ending on a stop token inside the run wastes the
        rest of it, and a prompt waiting for pages waits up to ``multi_step`` steps more. The run is shortened to the
        fewest tokens any of its sequences has left and is one step where some sequence samples, replays tokens after
        a preemption, or cannot get the pages for the run without preempting another.

        ``dense_prefill``: how a prompt chunk of a group that prefills densely (``full``, ``page_topk``) attends its
        pages under a pool with the kernels on: ``"paged"``, the Triton kernel reading the pages in place, several
        sequences' chunks in one launch (``paged_cache.prefill_over_pool``); ``"gather"``, each sequence's keys and
        values gathered into a contiguous copy, then SDPA (flash on a GPU: ``policies.base.causal_attention``), as the
        engine does with the kernels off. On the H200 the paged kernel took 1238 ms for a 32-layer 8192-token chunk
        after 64K where flash over a contiguous cache took 872 (docs/serving.md): ``"gather"`` is the dense baseline
        with the field's prefill kernel, at the cost of one copy of the prefix per chunk and layer.

        ``compile_layers``: compile the model's decoder layers in place with ``torch.compile``
        (``fusion.compile_layers``; headwise's attention function stays out of the graphs), fusing their
        elementwise work (norms, the SiLU product, rotary embeddings, residual adds); off by default."""
        if dense_prefill not in DENSE_PREFILL:
            raise InputError(f"dense_prefill must be one of {', '.join(DENSE_PREFILL)}, got {dense_prefill!r}")
        if chunk_size < 1:
            raise InputError(f"chunk size must be a positive number of tokens, got {chunk_size}")
        if multi_step < 1:
            raise InputError(f"multi_step must be at least 1, got {multi_step}")
        self.multi_step = multi_step
        self.lm = lm
        self.plan = plan if plan is not None else HeadPlan.dense(lm.spec, lm.name)
        self.plan.check_model(lm.spec)
        self.plan.policies()
        self.chunk_size = chunk_size
        self.use_kernels = use_kernels
        self.cuda_graphs = cuda_graphs
        self.padded_decode = padded_decode
        self.dense_prefill = dense_prefill
        self.compiled: list[str] = []
        if compile_layers:
            from headwise.fusion import compile_layers as compile_modules

            self.compiled = compile_modules(lm.model)
        # id(plan) -> (plan, the pool's padded decode steps under it, or None: the eager batched step)
        self._batch_graphs: dict[int, tuple[HeadPlan, BatchGraphs | None]] = {}
        self.live: list[Sequence] = []  # sequences ``step`` advances, in arrival order
        # Fast tokenizers refuse concurrent use ("Already borrowed"): detokenizing in ``step`` and encoding
        # elsewhere (the server's handlers) both take this lock.
        self.tok_lock = threading.Lock()
        self._lock = threading.RLock()  # one step (or add, abort) at a time
        self._ids = itertools.count()
        self.pool = pool
        if pool is not None:
            if lm.tp is not None:
                from headwise.tp import POOL_UNSUPPORTED

                raise InputError(POOL_UNSUPPORTED)
            if pool.kv is None:
                pool.allocate(lm.device, lm.dtype)
            elif pool.kv.dtype != lm.dtype or pool.kv.device.type != lm.device.type:
                raise BudgetError(f"the page pool holds {pool.kv.dtype} pages on {pool.kv.device}; the model runs in "
                                  f"{lm.dtype} on {lm.device}")

    @property
    def spec(self):
        return self.lm.spec

    @property
    def kernels(self) -> bool:
        """Whether attention runs on the Triton kernels (``use_kernels``, default: on CUDA)."""
        return self.lm.device.type == "cuda" if self.use_kernels is None else self.use_kernels

    # ------------------------------------------------------------------ building blocks
    def new_cache(self, batch: int = 1, reserve: int | None = None, plan: HeadPlan | None = None,
                  pages: SequencePages | None = None) -> HeadwiseCache:
        """An empty cache under ``plan`` (default: the engine's), with room for ``reserve`` tokens; with ``pages`` (a
        sequence's, in the engine's pool), the groups whose policy has a ``paged_layout`` keep their KV in them. On
        a tensor-parallel model: this rank's share of ``plan`` (``TPGroup.local_plan``)."""
        plan = plan or self.plan
        tp = self.lm.tp
        if tp is None:
            cache = HeadwiseCache(self.spec, plan, self.lm.device, self.lm.dtype, batch, self.use_kernels, pages,
                                  paged_prefill=self.dense_prefill == "paged")
        else:
            cache = HeadwiseCache(tp.local_spec(self.spec), tp.local_plan(plan), self.lm.device, self.lm.dtype,
                                  batch, self.use_kernels)
            tp.register(cache, plan)
        if reserve:
            cache.reserve(reserve)
        return cache

    def kv_estimate(self, total_tokens: int, plan: HeadPlan | None = None) -> int:
        """The most KV bytes a sequence's cache will hold on its way to ``total_tokens`` (``Sequence.max_tokens``), before
        it runs.

        The larger of (a) the plan's bytes at their peak (``Policy.peak_kv_bytes``: a quantized head's largest
        residual, which it holds at some step before ``total_tokens``) and (b) what the cache reserves up front,
        measured by building it on the ``meta`` device (shapes without storage, about a millisecond): (b) sees
        what (a) cannot, such as page metadata kept in another dtype; (a) covers stores that grow instead of
        reserving."""
        plan = plan or self.plan
        planned = plan.kv_bytes(self.spec, total_tokens, self.lm.dtype.itemsize, peak=True)
        try:
            probe = HeadwiseCache(self.spec, plan, "meta", self.lm.dtype, 1, self.use_kernels)
            probe.reserve(total_tokens)
            reserved = probe.kv_bytes()
        except Exception as exc:  # a store that cannot be built on "meta": the plan's count alone
            log.debug("KV estimate from the plan only: a store cannot be sized on the meta device (%s)", exc)
            reserved = 0
        return max(planned, reserved)

    def kv_bytes(self, cache: HeadwiseCache) -> int:
        """Exact bytes ``cache``'s stores hold (``HeadwiseCache.kv_bytes``), summed over the ranks of a
        tensor-parallel model."""
        tp = self.lm.tp
        if tp is None:
            return cache.kv_bytes()
        if tp.driver:
            tp.announce("kv_bytes", [cache])
        return tp.sum(cache.kv_bytes())

    def check_length(self, prompt_tokens: int, new_tokens: int = 0, plan: HeadPlan | None = None) -> None:
        """Raise ``ContextLengthError`` if the prompt and the tokens to generate do not fit the model's context
        under ``plan`` (default: the engine's; ``HeadPlan.max_context``: a ``longheads`` plan has no limit)."""
        limit = (plan or self.plan).max_context(self.spec)
        if limit and prompt_tokens + new_tokens > limit:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens + {new_tokens} new tokens exceeds {self.lm.name}'s context of "
                f"{limit} tokens; shorten the prompt or lower --max-new-tokens (or use a plan whose heads keep "
                f"distances within it, such as longheads)"
            )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HeadwiseCache, all_logits: bool = False,
                keep: torch.Tensor | None = None, position: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``input_ids: [B, L]`` (one chunk) after what ``cache`` holds. Returns logits ``[B, L, vocab]`` if
        ``all_logits``, ``[B, len(keep), vocab]`` for chunk-relative positions ``keep``, else ``[B, vocab]`` of the
        last position. ``position`` (one long element on the device): a batch-1 decode token at that position,
        run on the graph-ready path (``GraphDecoder``)."""
        tp = self.lm.tp
        if tp is not None and tp.driver:
            if position is not None:
                raise HeadwiseError("graph-ready decode steps do not run on a tensor-parallel model")
            tp.announce("forward", [cache], input_ids=input_ids.cpu(), all_logits=all_logits,
                        keep=None if keep is None else keep.cpu())
        start = cache.get_seq_length()
        L = input_ids.shape[1]
        if position is not None:
            pos = position.view(1, 1)
        else:
            pos = torch.arange(start, start + L, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], L)
        to_keep: int | torch.Tensor = 0 if all_logits else 1
        if keep is not None:
            to_keep = keep.to(input_ids.device)
        cache.position = position
        try:
            with _attention.attention_implementation(self.lm.model, _attention.ATTN_NAME):
                out = self.lm.model(
                    input_ids=input_ids,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    headwise_cache=cache,
                    logits_to_keep=to_keep,
                )
        finally:
            cache.position = None
        logits = out.logits
        return logits if (all_logits or keep is not None) else logits[:, -1]

    def prefill(self, input_ids: torch.Tensor, cache: HeadwiseCache, all_logits: bool = False,
                progress: Any = None) -> torch.Tensor:
        """Chunked prefill of ``input_ids: [B, T]``; returns last-position logits ``[B, vocab]`` or all
        logits ``[B, T, vocab]``."""
        outs = []
        logits = None
        for s in range(0, input_ids.shape[1], self.chunk_size):
            logits = self.forward(input_ids[:, s : s + self.chunk_size], cache, all_logits)
            if all_logits:
                outs.append(logits)
            if progress is not None:
                progress.update(min(self.chunk_size, input_ids.shape[1] - s))
        assert logits is not None
        return torch.cat(outs, dim=1) if all_logits else logits

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits of ``input_ids: [B, T]`` under the plan: ``[B, T, vocab]``, or ``[B, len(positions),
        vocab]`` for the given sorted absolute positions only (saves memory with large vocabularies)."""
        self.check_length(input_ids.shape[1])
        input_ids = input_ids.to(self.lm.device)
        cache = self.new_cache(input_ids.shape[0], reserve=input_ids.shape[1])
        if positions is None:
            return self.prefill(input_ids, cache, all_logits=True)
        positions = positions.to(torch.long).cpu()
        outs = []
        for s in range(0, input_ids.shape[1], self.chunk_size):
            e = min(s + self.chunk_size, input_ids.shape[1])
            keep = positions[(positions >= s) & (positions < e)] - s
            if keep.numel() == 0:
                keep = torch.tensor([e - s - 1])  # still run the chunk; drop its logits below
                self.forward(input_ids[:, s:e], cache, keep=keep)
                continue
            outs.append(self.forward(input_ids[:, s:e], cache, keep=keep))
        return torch.cat(outs, dim=1)

    @torch.inference_mode()
    def decode_batch(self, caches: Seq[HeadwiseCache], token_ids: Seq[int] | torch.Tensor) -> torch.Tensor:
        """One decode step of ``N`` independent sequences in one forward: ``caches[i]`` is sequence ``i``'s batch-1
        cache and ``token_ids[i]`` its next token; each cache's ``decode_step`` advances first. Returns next-token
        logits ``[N, vocab]`` (``forward_packed`` with one-token segments)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1).tolist()
        if len(ids) != len(caches) or not ids:
            raise InputError(f"decode_batch needs one token per cache, got {len(ids)} tokens for {len(caches)} caches")
        for c in caches:
            c.decode_step += 1
        return self.forward_packed(list(caches), [[t] for t in ids], list(range(len(ids))))

    @torch.inference_mode()
    def forward_packed(self, caches: list[HeadwiseCache], chunks: list[list[int]], keep: list[int]) -> torch.Tensor:
        """Feed ``chunks[i]`` after what ``caches[i]`` holds, for every ``i``, in one forward: the chunks are packed
        along the token axis of one ``[1, T]`` row with each token's own position; projections, MLPs and the LM head
        run once over the row, attention segment by segment over each cache (``attention.PackedBatch``). Returns
        next-token logits ``[len(keep), vocab]`` for the segments ``keep`` names (at their last token)."""
        tp = self.lm.tp
        if tp is not None and tp.driver:
            tp.announce("forward_packed", list(caches), chunks=[list(c) for c in chunks], keep=list(keep))
        lengths = [len(c) for c in chunks]
        starts = list(itertools.accumulate(lengths, initial=0))[:-1]
        device = self.lm.device
        ids = torch.tensor([[t for c in chunks for t in c]], dtype=torch.long, device=device)
        pos = torch.tensor([[c.get_seq_length() + j for c, n in zip(caches, lengths) for j in range(n)]],
                           dtype=torch.long, device=device)
        last = torch.tensor([starts[i] + lengths[i] - 1 for i in keep], dtype=torch.long, device=device)
        batch = _attention.PackedBatch(caches, starts, lengths)
        with _attention.attention_implementation(self.lm.model, _attention.ATTN_NAME):
            # No past_key_values: the model must not build one shared cache; every segment's own cache is
            # reached through headwise_batch, and position_ids carry every token's own position.
            out = self.lm.model(input_ids=ids, position_ids=pos, use_cache=False, headwise_batch=batch,
                                logits_to_keep=last)
        return out.logits[0]

    @torch.inference_mode()
    def forward_padded(self, batch: PaddedBatch, size: int) -> torch.Tensor:
        """The decode step of rows ``0 .. size-1`` of ``batch``'s static buffers (``batch_graphs.py``) in one forward
        of ``[1, size]`` tokens: token ids and positions from ``batch.meta``, attention through ``PaddedBatch.attend``.
        Reads no host value of the batch and changes no host counter, so a CUDA graph can capture it. Returns
        next-token logits ``[size, vocab]``."""
        ids, pos = batch.meta[0, :size][None], batch.meta[1, :size][None]
        with _attention.attention_implementation(self.lm.model, _attention.ATTN_NAME):
            out = self.lm.model(input_ids=ids, position_ids=pos, use_cache=False, headwise_batch=batch,
                                logits_to_keep=0)
        return out.logits[0]

    def batch_graphs(self, decode: Seq[Sequence]) -> BatchGraphs | None:
        """The padded decode steps over the pool for a decode-only step of ``decode`` under ``padded_decode`` (None:
        the eager batched step). Raises ``InputError`` when ``cuda_graphs=True`` and the plan or the device rules a
        graph out."""
        if self.pool is None or self.padded_decode is False or not decode:
            return None
        plan = decode[0].plan
        if any(s.plan is not plan for s in decode) or padded_size(len(decode)) is None:
            return None  # several plans in one step, or more rows than the largest size: eager
        known = self._batch_graphs.get(id(plan))
        if known is not None and known[0] is plan:
            return known[1]
        padded_why = padded_blockers(plan, self.spec, self.pool.page_size)
        why = padded_why + ([] if self.lm.device.type == "cuda" else [f"the model is on {self.lm.device.type}, not CUDA"])
        why += [] if self.kernels else ["the decode kernels are off (use_kernels)"]
        why += sorted({b for row in plan.policies() for p in row if (b := p.graph_blocker())})
        if why and self.cuda_graphs:
            raise InputError("CUDA-graph decode was asked for, but " + "; ".join(why))
        graphs = None
        if not (padded_why or (why and not self.padded_decode) or (self.cuda_graphs is False and not self.padded_decode)):
            graphs = BatchGraphs(self, plan, capture=not why and self.cuda_graphs is not False)
        # Buffers of plans no live sequence runs under any more go (their graphs with them).
        self._batch_graphs = {k: v for k, v in self._batch_graphs.items() if any(s.plan is v[0] for s in self.live)}
        self._batch_graphs[id(plan)] = (plan, graphs)
        return graphs

    def graph_decoder(self, cache: HeadwiseCache, decode_steps: int = GRAPH_MIN_STEPS) -> GraphDecoder | None:
        """The CUDA-graph decoder a sequence decoding alone uses for ``cache`` and ``decode_steps`` steps under ``cuda_graphs``
        (None: eager steps). Allowed but not asked for, a graph is used from ``GRAPH_MIN_STEPS`` steps on: the first
        step runs eagerly and is captured, which cost about three eager steps on an H100 (4 layers of Llama-3-8B
        shapes, bench/results/gpu_engine_decode_2026-11-23d.json)."""
        if self.cuda_graphs is False or decode_steps < 1 or (self.cuda_graphs is None and decode_steps < GRAPH_MIN_STEPS):
            return None
        why = ([] if self.lm.device.type == "cuda" else [f"the model is on {self.lm.device.type}, not CUDA"])
        why += [] if self.lm.tp is None else ["the model is tensor-parallel (its ranks step together eagerly)"]
        why += cache.graph_blockers()
        if why:
            if self.cuda_graphs:
                raise InputError("CUDA-graph decode was asked for, but " + "; ".join(why))
            return None
        return GraphDecoder(self, cache)

    # ------------------------------------------------------------------ generation
    def encode(self, text: str) -> torch.Tensor:
        with self.tok_lock:
            ids = self.lm.tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
        if ids.shape[1] == 0:
            raise InputError("the prompt is empty")
        return ids

    def detokenize(self, ids: list[int]) -> str:
        """Text of generated token ids (special tokens skipped; ``""`` without a tokenizer, as in tiny-model tests)."""
        tok = self.lm.tokenizer
        if tok is None:
            return ""
        with self.tok_lock:
            return tok.decode(ids, skip_special_tokens=True)

    def new_sequence(self, prompt: str | torch.Tensor | Seq[int], params: SamplingParams | None = None, *,
                     stop_ids: set[int] | None = None, plan: HeadPlan | None = None, seq_id: str | None = None,
                     keep_cache: bool = False, **kw: Any) -> Sequence:
        """A checked ``Sequence`` that is not live yet (``add`` makes it live). ``stop_ids``: the token ids that end
        it (default: ``params.stop_token_ids``, else the tokenizer's EOS).
        ``plan``: its own head plan (default: the engine's); sequences under different plans step together.
        ``keep_cache``: once finished, the sequence keeps its cache (``Sequence.keep_cache``); not under a page pool,
        whose pages a finished sequence gives back."""
        params = params or SamplingParams(**kw)
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        if keep_cache and self.pool is not None:
            raise InputError("keep_cache needs an engine without a page pool: a finished sequence gives its pages "
                             "back to the pool")
        if isinstance(prompt, str):
            ids = self.encode(prompt)[0].tolist()
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(-1).tolist()
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise InputError("the prompt is empty")
        if plan is not None:
            plan.check_model(self.spec)
            plan.policies()
        self.check_length(len(ids), params.max_new_tokens, plan)
        if self.pool is not None:
            most = SequencePages(self.pool, plan or self.plan).pages_at(len(ids) + params.max_new_tokens - 1)
            if most > self.pool.num_pages:
                raise BudgetError(f"this sequence needs up to {most} KV pages, more than the pool's {self.pool.num_pages}; "
                                  "lower max_new_tokens, shorten the prompt or give the pool more memory")
        if stop_ids is None:
            tok = self.lm.tokenizer
            stop_ids = set(params.stop_token_ids) if params.stop_token_ids is not None else (
                {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set())
        return Sequence(seq_id or f"seq-{next(self._ids)}", ids, params, stop_ids, plan or self.plan, keep_cache)

    def add(self, prompt: str | torch.Tensor | Seq[int] | Sequence, params: SamplingParams | None = None,
            **kw: Any) -> Sequence:
        """Make a sequence live: the next ``step`` starts its prompt. ``prompt`` is a ``Sequence`` from
        ``new_sequence``, or what ``new_sequence`` takes (with ``params`` and its keywords)."""
        seq = prompt if isinstance(prompt, Sequence) else self.new_sequence(prompt, params, **kw)
        with self._lock:
            if seq.finished or seq in self.live:
                raise InputError(f"sequence {seq.id} is finished or live already")
            self.live.append(seq)
        return seq

    def abort(self, seq: Sequence) -> None:
        """Drop ``seq`` (a client went away): it finishes with ``finish_reason == "abort"`` and its cache is freed
        before the next step. A finished sequence is left as it is."""
        with self._lock:
            seq.finish("abort")
            self._release(seq)

    @torch.inference_mode()
    def step(self, prefill_tokens: int | None = None) -> StepInfo:
        """Advance every live sequence once, in one forward; sample and take a token for each sequence that
        reached the end of its prompt or decodes. Prompt chunks (``chunk_size`` tokens, at the same offsets as a
        sequence alone) are taken in arrival order while ``prefill_tokens`` (default ``chunk_size``) remain, at
        least one chunk per step, so a long prompt delays the decoding sequences by about one chunk per step.

        A failure is the failing sequences' alone: one sequence's (making its cache, choosing its graph,
        sampling) ends it with ``finish_reason == "error"`` and ``Sequence.error`` set; a failed forward ends the
        sequences it carried (their caches may hold part of the step). The others go on."""
        with self._lock:
            info = StepInfo()
            budget = self.chunk_size if prefill_tokens is None else prefill_tokens
            decode: list[Sequence] = []
            chunks: list[tuple[Sequence, list[int]]] = []
            for s in list(self.live):  # arrival order: the older a sequence, the sooner it gets its pages
                if s.status is Status.DECODE:
                    if self._hold(s, s.cached + 1, info):
                        decode.append(s)
                    continue
                if s.status is not Status.PREFILL or budget <= 0:
                    continue
                chunk = s.prompt_ids[s.prefilled : s.prefilled + self.chunk_size]
                if not self._hold(s, s.prefilled + len(chunk), info):
                    continue
                if s.cache is None and not self._start(s):
                    continue
                chunks.append((s, chunk))
                budget -= len(chunk)
            t0 = time.perf_counter()
            run = self._multi(decode, chunks)
            if run is not None:
                sampled = self._multi_step(run[0], decode, run[1], info)
            else:
                sampled = [(s, [token]) for s, token in self._sample(self._forward_step(decode, chunks, info))]
            if not sampled and self.lm.device.type == "cuda":
                # Only prompt chunks, nothing sampled: no token read back, so the GPU may still be running them. Wait,
                # so their time is this step's, not the next one's (serving run 21: dense's decode-only steps after a
                # preempted prompt's chunk took 1.2-1.4 s against a 25 ms median).
                torch.cuda.synchronize(self.lm.device)
            info.seconds = time.perf_counter() - t0
            if info.decode_rows and not info.decode_steps:
                info.decode_steps = 1
            for s in decode:
                s.stats.decode_s += info.seconds
            for s, _ in chunks:
                s.stats.prefill_s += info.seconds
            for s, tokens in sampled:
                for token in tokens:  # a multi-step's tokens after the one that ended the sequence are dropped
                    if s.finished:
                        break
                    try:
                        s.accept(token, self.detokenize)
                    except Exception as exc:  # e.g. a tokenizer that cannot decode a sampled id
                        s.finish("error", exc)
            info.finished = [s for s in self.live if s.finished]
            for s in info.finished:
                self._release(s)
            return info

    def _hold(self, s: Sequence, tokens: int, info: StepInfo) -> bool:
        """Make ``s`` hold pages for ``tokens`` tokens (always, without a pool). When the pool is dry, preempt the
        newest sequence holding pages that arrived after ``s``, until they fit; False (``s`` waits) if none is left."""
        if self.pool is None:
            return True
        if s.pages is None:
            s.pages = SequencePages(self.pool, s.plan)
        while not s.pages.grow(tokens):
            later = self.live[self.live.index(s) + 1 :]
            victim = next((v for v in reversed(later) if v.pages is not None and v.pages.held), None)
            if victim is None:
                return False
            self._release_memory(victim)
            victim.preempt()
            info.preempted += 1
        return True

    def _multi(self, decode: list[Sequence], chunks: list[tuple[Sequence, list[int]]]) -> tuple[BatchGraphs, int] | None:
        """The padded steps and the number of steps for a multi-step run of ``decode`` (``multi_step``), its pages
        taken; None: a single step."""
        if self.multi_step < 2 or chunks or not decode or self.pool is None:
            return None
        if any(s.finished or not is_greedy(s.params) or s.fed + 1 != len(s.generated) for s in decode):
            return None
        steps = min(self.multi_step, *(s.params.max_new_tokens - len(s.generated) for s in decode))
        if steps < 2:
            return None
        try:
            padded = self.batch_graphs(decode)
        except Exception:  # the single step reports it
            return None
        if padded is None:
            return None
        for s in decode:  # the run's pages, without preempting anyone (what one sequence took stays: it needs them next)
            assert s.pages is not None
            if not s.pages.grow(s.cached + steps):
                return None
        return padded, steps

    def _multi_step(self, padded: BatchGraphs, decode: list[Sequence], steps: int,
                    info: StepInfo) -> list[tuple[Sequence, list[int]]]:
        """``steps`` greedy decode steps of ``decode`` in a row (``BatchGraphs.decode``); each sequence's tokens."""
        out = self._shared_forward("a multi-step decode", decode, decode, lambda: padded.decode(decode, steps),
                                   steps=steps)
        if out is None:
            return []
        tokens, info.padded, info.graph = out
        info.decode_rows, info.decode_steps = len(decode), steps
        for s in decode:
            s.fed += steps
            s.stats.cuda_graph |= info.graph
        return list(zip(decode, tokens, strict=True))

    def _start(self, s: Sequence) -> bool:
        """Give ``s`` its cache, reserved for its whole length (``Sequence.max_tokens``), over its pool pages under a
        pool; False if that failed."""
        try:
            s.cache = self.new_cache(1, reserve=s.max_tokens, plan=s.plan, pages=s.pages)
        except Exception as exc:  # e.g. out of memory: this sequence alone fails
            s.finish("error", exc)
            return False
        return True

    def _forward_step(self, decode: list[Sequence], chunks: list[tuple[Sequence, list[int]]],
                      info: StepInfo) -> list[tuple[Sequence, torch.Tensor]]:
        """Run the step's forward; returns (sequence, next-token logits ``[vocab]``) for each sequence to sample."""
        if self.pool is not None and decode and not chunks:
            try:
                padded = self.batch_graphs(decode)
            except Exception as exc:  # cuda_graphs=True and something prevents them: these sequences fail
                for s in decode:
                    s.finish("error", exc)
                return []
            if padded is not None:
                return self._padded_step(padded, decode, info)
        elif len(decode) == 1 and not chunks:
            graphs = self._graphs(decode[0])
            if graphs is not None:
                s = decode[0]
                assert s.cache is not None
                try:
                    s.cache.decode_step += 1
                    logits = graphs.step(s.generated[s.fed])
                except Exception as exc:
                    s.finish("error", exc)
                    return []
                info.decode_rows, info.graph = 1, True
                s.stats.cuda_graph |= graphs.graph is not None  # not after a failed capture (the steps run eagerly)
                s.fed += 1
                return [(s, logits[0])] if s.fed == len(s.generated) else []
        decode = [s for s in decode if not s.finished]  # _graphs may have failed one
        members = [*decode, *(s for s, _ in chunks)]
        if not members:
            return []
        feeds = [[s.generated[s.fed]] for s in decode] + [c for _, c in chunks]
        caches = [s.cache for s in members]
        assert all(c is not None for c in caches)
        # Logits where a token is sampled: a decode row caught up with its tokens (not one replaying them after
        # a preemption), a chunk ending the prompt of a sequence that has not sampled yet.
        sample = [s.fed + 1 == len(s.generated) for s in decode]
        sample += [s.prefilled + len(c) >= len(s.prompt_ids) and not s.generated for s, c in chunks]
        keep = [i for i, x in enumerate(sample) if x]

        def forward() -> torch.Tensor:
            if len(members) == 1:  # one sequence: the plain batch-1 forward, [1, vocab] at its last token
                ids = torch.tensor([feeds[0]], dtype=torch.long, device=self.lm.device)
                return self.forward(ids, caches[0])[: len(keep)]  # type: ignore[arg-type]
            return self.forward_packed(caches, feeds, keep)  # type: ignore[arg-type]

        logits = self._shared_forward("a step", members, decode, forward)
        if logits is None:
            return []
        info.decode_rows = len(decode)
        for s in decode:
            s.fed += 1
        for (s, c) in chunks:
            info.chunk_starts.append(s.prefilled)
            s.prefilled += len(c)
            info.prefill_tokens += len(c)
            if s.prefilled == len(s.prompt_ids) and s.generated:
                s.status = Status.DECODE  # a preempted sequence replays its tokens next
        kept = [members[i] for i in keep]
        return list(zip(kept, logits, strict=True))

    def _shared_forward(self, what: str, members: list[Sequence], decode: list[Sequence],
                        fn: Callable[[], _T], steps: int = 1) -> _T | None:
        """Run ``fn``, the forward ``members`` share, after counting ``steps`` decode steps in each of ``decode``'s
        caches; if it fails, every member finishes with the error (logged once) and the result is None."""
        try:
            for s in decode:
                s.cache.decode_step += steps  # type: ignore[union-attr]
            out = fn()
            _sync_fn(self.lm.device)()
            return out
        except Exception as exc:  # the forward all of them shared
            log.exception("%s of %d sequence(s) failed", what, len(members))
            for s in members:
                s.finish("error", exc)
            return None

    def _padded_step(self, padded: BatchGraphs, decode: list[Sequence],
                     info: StepInfo) -> list[tuple[Sequence, torch.Tensor]]:
        """A decode-only step over the pool at a padded batch size (``BatchGraphs.step``)."""
        sample = [s.fed + 1 == len(s.generated) for s in decode]  # not a preempted sequence replaying its tokens
        out = self._shared_forward("a padded decode step", decode, decode, lambda: padded.step(decode))
        if out is None:
            return []
        logits, info.padded, info.graph = out
        info.decode_rows = len(decode)
        for s in decode:
            s.fed += 1
            s.stats.cuda_graph |= info.graph
        return [(s, row) for s, row, x in zip(decode, logits, sample, strict=True) if x]

    def _graphs(self, s: Sequence) -> GraphDecoder | None:
        """``s``'s CUDA-graph decoder, made at its first lone decode step (None where the engine allows none: not
        CUDA, no kernels, a policy without graph decode, or too few steps left to pay for a capture)."""
        if s.graphs is None:
            assert s.cache is not None
            try:
                s.graphs = self.graph_decoder(s.cache, s.params.max_new_tokens - len(s.generated)) or False
            except Exception as exc:  # cuda_graphs=True and something prevents them: this sequence fails
                s.finish("error", exc)
                return None
        return s.graphs or None

    def _sample(self, rows: list[tuple[Sequence, torch.Tensor]]) -> list[tuple[Sequence, int]]:
        """One token per row; greedy rows with one argmax over the batch (one device sync)."""
        out: list[tuple[Sequence, int]] = []
        greedy = [i for i, (s, _) in enumerate(rows) if is_greedy(s.params)]
        stacked = torch.stack([rows[i][1] for i in greedy]).float() if greedy else None
        # NaN counted as -inf (argmax would pick a NaN), as sample_next does.
        picked = torch.nan_to_num(stacked, nan=-math.inf).argmax(dim=-1).tolist() if stacked is not None else []
        best = dict(zip(greedy, picked))
        for i, (s, logits) in enumerate(rows):
            if i in best:
                out.append((s, best[i]))
                continue
            try:
                out.append((s, sample_next(logits, s.params, s.generator)))
            except Exception as exc:  # e.g. non-finite probabilities
                s.finish("error", exc)
        return out

    def _release(self, s: Sequence) -> None:
        """Take finished ``s`` out of the live set; record its KV stats and free its CUDA-graph decoder, its pages
        and its cache (unless ``s.keep_cache``)."""
        if s in self.live:
            self.live.remove(s)
        if s.cache is not None:
            s.stats.kv_bytes = self.kv_bytes(s.cache) if s.pages is None else s.pages.nbytes
            s.stats.dense_kv_bytes = self.spec.dense_kv_bytes(s.cache.get_seq_length(), self.lm.dtype.itemsize)
        self._release_memory(s, keep_cache=s.keep_cache)

    def _release_memory(self, s: Sequence, keep_cache: bool = False) -> None:
        for _, graphs in self._batch_graphs.values():
            if graphs is not None:
                graphs.forget(s)
        s.graphs = None
        if not keep_cache:
            s.cache = None
        if s.pages is not None:
            s.pages.release()

    def generate(self, prompt: str | torch.Tensor | Seq[int], params: SamplingParams | None = None,
                 **kw: Any) -> Iterator[TokenEvent]:
        """Stream generated tokens; the last event carries ``GenerationStats``. ``add`` + a loop of ``step``:
        other live sequences advance with it. A failure of this sequence is raised."""
        seq = self.add(prompt, params, **kw)
        try:
            while True:
                if not seq.finished:
                    self.step()
                if seq.error is not None:
                    raise seq.error
                yield from seq.take_events()
                if seq.finished:
                    return
        finally:
            if not seq.finished:  # the consumer stopped early
                self.abort(seq)


class GraphDecoder:
    """Batch-1 decode steps of one cache replayed from a CUDA graph.

    Eager decode on a GPU is bound by launches and Python (docs/kernels.md, "Engine decode on a GPU"). Here the
    first step runs eagerly on the graph-ready path: the token's position is a device tensor
    (``AttendContext.position``), the stores write at slots computed from it, and the kernels read their
    lengths from it (``kernels.common.DeviceLength``), sized for the cache's reserved length. That step
    also compiles the kernels. Then the same step is captured once. Every later step writes the token id and
    position into the graph's input tensors, replays it, and counts the token in the host-side counters
    (``HeadwiseCache.advance``). One capture serves the whole generation.

    Needs a batch-1 cache with reserved room, the kernels, and policies with ``graph_decode`` (``full``,
    ``streaming`` without compensation, ``page_topk``, prefill patterns that decode with them) or whose reserved
    length allows it (``Policy.graph_blocker_at``: ``quantized``, whose groups leave the residual on the host
    between replays, in ``advance``). ``capture=False`` runs every
    step eagerly on the graph-ready path: it tests everything but the capture itself, on any device. If the capture
    fails (a model whose forward cannot be captured, e.g. one with offloading hooks), the host-side counters are
    restored and the steps go on eagerly with a warning, or, under ``Engine(cuda_graphs=True)``, a
    ``HeadwiseError`` says why.
    """

    def __init__(self, engine: Engine, cache: HeadwiseCache, capture: bool = True):
        why = cache.graph_blockers() + ([] if engine.lm.tp is None else ["the model is tensor-parallel"])
        if why:
            raise InputError("this cache cannot decode from a CUDA graph: " + "; ".join(why))
        if cache.reserved <= cache.get_seq_length():
            raise InputError("CUDA-graph decode needs room reserved in the cache (Engine.new_cache(reserve=...))")
        self.engine, self.cache, self.capture = engine, cache, capture
        device = engine.lm.device
        self.ids = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None

    # The whole step runs under inference mode, as ``Engine.forward`` does: the host code between replays writes in
    # place tensors the forward made (the quantized store's residual, settled in ``advance``; ``ids`` and ``position``
    # when ``Engine.step`` made the decoder), which outside inference mode is an error.
    @torch.inference_mode()
    def step(self, token_id: int) -> torch.Tensor:
        """Feed ``token_id`` at the cache's next position; returns its logits ``[1, vocab]``, valid until the
        next step (a graph's output buffer)."""
        cache = self.cache
        n = cache.get_seq_length()
        if n >= cache.reserved:
            raise ContextLengthError(f"the cache holds room for {cache.reserved} tokens; a decode step at position {n} "
                                     f"does not fit")
        self.ids.fill_(int(token_id))
        self.position.fill_(n)
        if self.graph is not None:
            self.graph.replay()
            cache.advance(1)
            assert self.logits is not None
            return self.logits
        if not self.capture:
            return self.engine.forward(self.ids, cache, position=self.position)
        with warm_up_on_capture_stream(self.engine.lm.device):  # the eager step is the capture's warm-up
            logits = self.engine.forward(self.ids, cache, position=self.position)
        self._capture()
        return logits

    def _capture(self) -> None:
        """Capture the step just run (its warm-up) in a graph with a memory pool of its own. A failure leaves no
        graph, the host-side counters and the current stream as they were; the steps go on eagerly."""
        cache = self.cache
        saved = cache.host_counters()
        try:
            graph, self.logits = capture_graph(lambda: self.engine.forward(self.ids, cache, position=self.position),
                                               self.engine.lm.device)
        except Exception as exc:  # any capture failure: fall back (or report) with the cause
            self.logits = None
            cache.restore_host_counters(saved)
            self.capture = False
            if self.engine.cuda_graphs:
                raise HeadwiseError(f"capturing a decode step in a CUDA graph failed: {exc}") from exc
            log.warning("decode steps run eagerly: capturing one in a CUDA graph failed (%s)", exc)
            return
        cache.restore_host_counters(saved)  # capturing ran the step's host code, not the step
        self.graph = graph


def freeze_heap() -> int:
    """Move every object alive now out of the garbage collector's generations (a collection, then ``gc.freeze``), as
    vLLM does once its engine has started. The model, torch.compile's graphs and Triton's kernels live as long as the
    process; a full collection during a step would walk them all again (465 ms inside one prompt step of issue 13's
    mix on an H200, docs/serving.md run 20). Objects made later are collected as usual; ``gc.unfreeze`` undoes it.
    The server calls it once the engine is built, ``headwise bench serve`` after its warm-up. Returns how many objects
    are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
