"""The engine: chunked prefill and decode of a real model through a head plan.

    engine = Engine(load_model("smollm2-135m"), HeadPlan.load("plans/smollm2-135m.json"))
    for event in engine.generate(prompt_ids, max_new_tokens=64):
        print(event.text, end="")

The engine owns nothing model-specific: transformers runs the model; headwise's attention function and
cache (``attention.py``, ``cache.py``) run every layer's attention head group by head group.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headwise import attention as _attention  # registers the "headwise" attention implementation
from headwise.cache import HeadwiseCache
from headwise.errors import ContextLengthError, HeadwiseError, InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan

DEFAULT_CHUNK = 512
GRAPH_MIN_STEPS = 8  # decode steps from which generate replays them from a CUDA graph unless told (capture ~3 steps)
log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    finish_reason: str = "length"
    cuda_graph: bool = False  # decode steps replayed from a CUDA graph

    @property
    def decode_tokens_per_s(self) -> float:
        return self.new_tokens / self.decode_s if self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def kv_fraction(self) -> float:
        return self.kv_bytes / max(1, self.dense_kv_bytes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_s": round(self.prefill_s, 4),
            "decode_s": round(self.decode_s, 4),
            "prefill_tokens_per_s": round(self.prefill_tokens_per_s, 2),
            "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
            "kv_bytes": self.kv_bytes,
            "dense_kv_bytes": self.dense_kv_bytes,
            "kv_fraction": round(self.kv_fraction, 4),
            "finish_reason": self.finish_reason,
            "cuda_graph": self.cuda_graph,
        }


@dataclass
class TokenEvent:
    token_id: int
    text: str
    stats: GenerationStats | None = None  # set on the last event


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's EOS

    def __post_init__(self) -> None:
        # NaN passes every ``<``/``>`` range check, so finiteness is checked first.
        if not (isinstance(self.temperature, int | float) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if not (isinstance(self.top_p, int | float) and math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise InputError(f"top_p must be a number in (0, 1], got {self.top_p}")
        if self.seed is not None and not SEED_MIN <= self.seed < SEED_END:
            raise InputError(f"seed must be in [-2^63, 2^64), got {self.seed}")


# The range torch.Generator.manual_seed accepts.
SEED_MIN, SEED_END = -(1 << 63), 1 << 64
# Below this temperature sampling is greedy in all but name, so it is done greedily: logits divided by a
# tiny temperature overflow float32 (a logit of 30 over 1e-38 is past 3.4e38, and inf - inf is NaN inside
# the softmax), while at 1e-4 a logit gap of 1e-3 already makes the runner-up e^-10 less likely.
GREEDY_TEMPERATURE = 1e-4


def _greedy(logits: torch.Tensor) -> int:
    """Index of the largest logit, NaN counted as -inf (argmax would pick a NaN)."""
    return int(torch.argmax(torch.nan_to_num(logits.float(), nan=-math.inf)).item())


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [vocab] -> token id (greedy at temperature 0, else temperature + nucleus sampling).

    Safe against any parameter that got past validation: a NaN or tiny temperature is greedy, a NaN top_p
    keeps the whole distribution, and logits that give no finite distribution (NaN or inf) fall back to greedy
    instead of handing ``torch.multinomial`` NaN probabilities."""
    if not params.temperature > GREEDY_TEMPERATURE:  # also NaN
        return _greedy(logits)
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):
        return _greedy(logits)
    if params.top_p < 1.0:  # False for NaN: no nucleus cut
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


class Engine:
    """Runs a loaded model with a head plan."""

    def __init__(self, lm: LoadedModel, plan: HeadPlan | None = None, chunk_size: int = DEFAULT_CHUNK,
                 use_kernels: bool | None = None, cuda_graphs: bool | None = None):
        """``use_kernels``: the Triton kernels (default: on CUDA). ``cuda_graphs``: ``generate`` replays its decode
        steps from a CUDA graph (``GraphDecoder``); default: whenever the device, the kernels and every policy
        of the plan allow it and at least ``GRAPH_MIN_STEPS`` decode steps are asked for, else eager steps;
        True: required (an error says what prevents it); False: never."""
        if chunk_size < 1:
            raise InputError(f"chunk size must be a positive number of tokens, got {chunk_size}")
        self.lm = lm
        self.plan = plan if plan is not None else HeadPlan.dense(lm.spec, lm.name)
        self.plan.check_model(lm.spec)
        self.plan.policies()
        self.chunk_size = chunk_size
        self.use_kernels = use_kernels
        self.cuda_graphs = cuda_graphs

    @property
    def spec(self):
        return self.lm.spec

    # ------------------------------------------------------------------ building blocks
    def new_cache(self, batch: int = 1, reserve: int | None = None) -> HeadwiseCache:
        cache = HeadwiseCache(self.spec, self.plan, self.lm.device, self.lm.dtype, batch, self.use_kernels)
        if reserve:
            cache.reserve(reserve)
        return cache

    def check_length(self, prompt_tokens: int, new_tokens: int = 0) -> None:
        limit = self.spec.max_context
        if limit and prompt_tokens + new_tokens > limit:
            raise ContextLengthError(
                f"prompt of {prompt_tokens} tokens + {new_tokens} new tokens exceeds {self.lm.name}'s context of "
                f"{limit} tokens; shorten the prompt or lower --max-new-tokens"
            )

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HeadwiseCache, all_logits: bool = False,
                keep: torch.Tensor | None = None, position: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``input_ids: [B, L]`` (one chunk) after what ``cache`` holds. Returns logits ``[B, L, vocab]`` if
        ``all_logits``, ``[B, len(keep), vocab]`` for chunk-relative positions ``keep``, else ``[B, vocab]`` of the
        last position. ``position`` (one long element on the device): a batch-1 decode token at that position,
        run on the graph-ready path (``GraphDecoder``)."""
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
    def decode_batch(self, caches: Sequence[HeadwiseCache], token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One decode step of ``N`` independent sequences in one forward (the server's continuous batching).

        ``caches[i]`` is sequence ``i``'s batch-1 cache (each with its own length and per-head stores) and
        ``token_ids[i]`` its next token. Projections and MLPs run on the ``[N, 1]`` batch; attention runs row
        by row with each row's cache (``headwise_caches`` in ``attention.py``). Each cache's ``decode_step``
        advances first, as in ``generate``. Returns next-token logits ``[N, vocab]``.
        """
        ids = torch.as_tensor(token_ids, dtype=torch.long).reshape(-1, 1).to(self.lm.device)
        if ids.shape[0] != len(caches) or ids.shape[0] == 0:
            raise InputError(f"decode_batch needs one token per cache, got {ids.shape[0]} tokens for {len(caches)} caches")
        pos = torch.tensor([[c.get_seq_length()] for c in caches], dtype=torch.long, device=self.lm.device)
        for c in caches:
            c.decode_step += 1
        with _attention.attention_implementation(self.lm.model, _attention.ATTN_NAME):
            # No past_key_values: the model must not build one shared cache; every row's own cache is
            # reached through headwise_caches, and position_ids carry every row's own position.
            out = self.lm.model(input_ids=ids, position_ids=pos, use_cache=False,
                                headwise_caches=list(caches), logits_to_keep=1)
        return out.logits[:, -1]

    def graph_decoder(self, cache: HeadwiseCache, decode_steps: int = GRAPH_MIN_STEPS) -> GraphDecoder | None:
        """The CUDA-graph decoder ``generate`` uses for ``cache`` and ``decode_steps`` steps under ``cuda_graphs``
        (None: eager steps). Allowed but not asked for, a graph is used from ``GRAPH_MIN_STEPS`` steps on: the first
        step runs eagerly and is captured, which cost about three eager steps on an H100 (4 layers of Llama-3-8B
        shapes, bench/results/gpu_engine_decode_2026-11-23d.json)."""
        if self.cuda_graphs is False or decode_steps < 1 or (self.cuda_graphs is None and decode_steps < GRAPH_MIN_STEPS):
            return None
        why = ([] if self.lm.device.type == "cuda" else [f"the model is on {self.lm.device.type}, not CUDA"])
        why += cache.graph_blockers()
        if why:
            if self.cuda_graphs:
                raise InputError("CUDA-graph decode was asked for, but " + "; ".join(why))
            return None
        return GraphDecoder(self, cache)

    # ------------------------------------------------------------------ generation
    def encode(self, text: str) -> torch.Tensor:
        ids = self.lm.tokenizer(text, return_tensors="pt", add_special_tokens=True).input_ids
        if ids.shape[1] == 0:
            raise InputError("the prompt is empty")
        return ids

    def generate(self, prompt: str | torch.Tensor | Sequence[int], params: SamplingParams | None = None,
                 **kw: Any) -> Iterator[TokenEvent]:
        """Stream generated tokens; the last event carries ``GenerationStats``."""
        params = params or SamplingParams(**kw)
        if params.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {params.max_new_tokens}")
        if isinstance(prompt, str):
            ids = self.encode(prompt)
        elif isinstance(prompt, torch.Tensor):
            ids = prompt.reshape(1, -1)
        else:
            ids = torch.tensor([list(prompt)], dtype=torch.long)
        if ids.shape[1] == 0:
            raise InputError("the prompt is empty")
        self.check_length(ids.shape[1], params.max_new_tokens)
        ids = ids.to(self.lm.device)
        tok = self.lm.tokenizer
        stop_ids = set(params.stop_token_ids) if params.stop_token_ids is not None else (
            {tok.eos_token_id} if tok is not None and tok.eos_token_id is not None else set()
        )
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        stats = GenerationStats(prompt_tokens=ids.shape[1])
        total = ids.shape[1] + params.max_new_tokens - 1  # the last new token is never fed back
        cache = self.new_cache(1, reserve=total)
        graphs = self.graph_decoder(cache, params.max_new_tokens - 1)
        stats.cuda_graph = graphs is not None
        sync = _sync_fn(self.lm.device)
        t0 = time.perf_counter()
        logits = self.prefill(ids, cache)
        sync()
        stats.prefill_s = time.perf_counter() - t0
        generated: list[int] = []
        text_so_far = ""
        t1 = time.perf_counter()
        for step in range(params.max_new_tokens):
            next_id = sample_next(logits[0], params, gen)
            if next_id in stop_ids:
                stats.finish_reason = "stop"
                break
            generated.append(next_id)
            stats.new_tokens = len(generated)
            full = tok.decode(generated, skip_special_tokens=True) if tok is not None else ""  # tokenizer-less tests
            piece, text_so_far = full[len(text_so_far):], full
            hit = next((s for s in params.stop if s and s in text_so_far), None)
            if hit is not None:
                overshoot = len(text_so_far) - text_so_far.index(hit)
                piece = piece[: max(0, len(piece) - overshoot)]
                stats.finish_reason = "stop"
                if piece:
                    yield TokenEvent(next_id, piece)
                break
            yield TokenEvent(next_id, piece)
            if step + 1 < params.max_new_tokens:
                cache.decode_step += 1
                if graphs is not None:
                    logits = graphs.step(next_id)
                else:
                    logits = self.forward(torch.tensor([[next_id]], device=self.lm.device), cache)
        sync()
        stats.decode_s = time.perf_counter() - t1
        stats.kv_bytes = cache.kv_bytes()
        stats.dense_kv_bytes = self.spec.dense_kv_bytes(cache.get_seq_length(), self.lm.dtype.itemsize)
        yield TokenEvent(-1, "", stats)


class GraphDecoder:
    """Batch-1 decode steps of one cache replayed from a CUDA graph.

    Eager decode on a GPU is bound by launches and Python (docs/kernels.md, "Engine decode on a GPU"). Here the
    first step runs eagerly on the graph-ready path: the token's position is a device tensor
    (``AttendContext.position``), the stores write at slots computed from it, and the kernels read their
    lengths from it (``kernels.sparse_decode.DeviceLength``), sized for the cache's reserved length. That step
    also compiles the kernels. Then the same step is captured once. Every later step writes the token id and
    position into the graph's input tensors, replays it, and counts the token in the host-side counters
    (``HeadwiseCache.advance``). One capture serves the whole generation.

    Needs a batch-1 cache with reserved room, the kernels, and policies with ``graph_decode`` (``full``,
    ``streaming`` without compensation, ``page_topk``, prefill patterns that decode with them). ``capture=False`` runs every
    step eagerly on the graph-ready path: it tests everything but the capture itself, on any device. If the capture
    fails (a model whose forward cannot be captured, e.g. one with offloading hooks), the host-side counters are
    restored and the steps go on eagerly with a warning, or, under ``Engine(cuda_graphs=True)``, a
    ``HeadwiseError`` says why.
    """

    def __init__(self, engine: Engine, cache: HeadwiseCache, capture: bool = True):
        why = cache.graph_blockers()
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
        logits = self.engine.forward(self.ids, cache, position=self.position)
        if self.capture:
            self._capture()
        return logits

    def _capture(self) -> None:
        cache = self.cache
        saved = cache.host_counters()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.logits = self.engine.forward(self.ids, cache, position=self.position)
        except Exception as exc:  # any capture failure: fall back (or report) with the cause
            cache.restore_host_counters(saved)
            self.capture = False
            if self.engine.cuda_graphs:
                raise HeadwiseError(f"capturing a decode step in a CUDA graph failed: {exc}") from exc
            log.warning("decode steps run eagerly: capturing one in a CUDA graph failed (%s)", exc)
            return
        cache.restore_host_counters(saved)  # capturing ran the step's host code, not the step
        self.graph = graph


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
