"""The engine: chunked prefill and decode of a real model through a head plan.

    engine = Engine(load_model("smollm2-135m"), HeadPlan.load("plans/smollm2-135m.json"))
    for event in engine.generate(prompt_ids, max_new_tokens=64):
        print(event.text, end="")

The engine owns nothing model-specific: transformers runs the model; headwise's attention function and
cache (``attention.py``, ``cache.py``) run every layer's attention head group by head group.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headwise import attention as _attention  # registers the "headwise" attention implementation
from headwise.cache import HeadwiseCache
from headwise.errors import ContextLengthError, InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan

DEFAULT_CHUNK = 512


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    kv_bytes: int = 0
    dense_kv_bytes: int = 0
    finish_reason: str = "length"

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


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [vocab] -> token id (greedy at temperature 0, else temperature + nucleus sampling)."""
    if params.temperature <= 0:
        return int(torch.argmax(logits).item())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())


class Engine:
    """Runs a loaded model with a head plan."""

    def __init__(self, lm: LoadedModel, plan: HeadPlan | None = None, chunk_size: int = DEFAULT_CHUNK,
                 use_kernels: bool | None = None):
        if chunk_size < 1:
            raise InputError(f"chunk size must be a positive number of tokens, got {chunk_size}")
        self.lm = lm
        self.plan = plan if plan is not None else HeadPlan.dense(lm.spec, lm.name)
        self.plan.check_model(lm.spec)
        self.plan.policies()
        self.chunk_size = chunk_size
        self.use_kernels = use_kernels

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
                keep: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``input_ids: [B, L]`` (one chunk) after what ``cache`` holds. Returns logits ``[B, L, vocab]`` if
        ``all_logits``, ``[B, len(keep), vocab]`` for chunk-relative positions ``keep``, else ``[B, vocab]`` of the
        last position."""
        start = cache.get_seq_length()
        L = input_ids.shape[1]
        pos = torch.arange(start, start + L, device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], L)
        to_keep: int | torch.Tensor = 0 if all_logits else 1
        if keep is not None:
            to_keep = keep.to(input_ids.device)
        with _attention.attention_implementation(self.lm.model, _attention.ATTN_NAME):
            out = self.lm.model(
                input_ids=input_ids,
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
                headwise_cache=cache,
                logits_to_keep=to_keep,
            )
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
                logits = self.forward(torch.tensor([[next_id]], device=self.lm.device), cache)
        sync()
        stats.decode_s = time.perf_counter() - t1
        stats.kv_bytes = cache.kv_bytes()
        stats.dense_kv_bytes = self.spec.dense_kv_bytes(cache.get_seq_length(), self.lm.dtype.itemsize)
        yield TokenEvent(-1, "", stats)


def _sync_fn(device: torch.device):
    if device.type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
