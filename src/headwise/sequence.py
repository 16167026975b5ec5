"""One request's generation state, and the rules that end it: sampling, stop tokens, stop strings, UTF-8.

A ``Sequence`` is what ``Engine.add`` returns and ``Engine.step`` advances (``engine.py``): its prompt, its
sampling parameters, its cache, the tokens it generated and the text it may send. The stop rules and the
text hold-back live here, once, for ``Engine.generate`` and the server alike:

- a sampled stop token (EOS, or ``stop_token_ids``) ends the sequence and is not part of the output;
- a stop string ends it; the text is cut where the earliest stop string starts;
- text is released only when it is safe to send: a trailing half-decoded UTF-8 character (decoded as U+FFFD
  until its last byte arrives) and any suffix that could still grow into a stop string are held back until
  a later token decides them, so no client ever sees the start of a stop string;
- ``max_new_tokens`` ends it with ``finish_reason == "length"``.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from headwise.errors import InputError

if TYPE_CHECKING:
    from headwise.cache import HeadwiseCache
    from headwise.engine import GraphDecoder
    from headwise.plan import HeadPlan
    from headwise.pool import SequencePages


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Seq[str] = field(default_factory=tuple)
    stop_token_ids: Seq[int] | None = None  # None: the tokenizer's EOS

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


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0  # wall time of the steps that ran this sequence's prompt (shared with its batch)
    decode_s: float = 0.0  # wall time of the steps that decoded it
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
    """A generated token and the text it releases (``""`` while text is held back). ``token_id == -1``: no new
    token: the text held back until the end (after a stop token), or the last event, which carries ``stats``."""

    token_id: int
    text: str
    stats: GenerationStats | None = None  # set on the last event


def _greedy(logits: torch.Tensor) -> int:
    """Index of the largest logit, NaN counted as -inf (argmax would pick a NaN)."""
    return int(torch.argmax(torch.nan_to_num(logits.float(), nan=-math.inf)).item())


def is_greedy(params: SamplingParams) -> bool:
    """Whether ``sample_next`` picks the largest logit for ``params`` (also for a NaN temperature)."""
    return not params.temperature > GREEDY_TEMPERATURE


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [vocab] -> token id (greedy at temperature 0, else temperature + nucleus sampling).

    Safe against any parameter that got past validation: a NaN or tiny temperature is greedy, a NaN top_p
    keeps the whole distribution, and logits that give no finite distribution (NaN or inf) fall back to greedy
    instead of handing ``torch.multinomial`` NaN probabilities."""
    if is_greedy(params):
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


_MAX_MISSES = 8  # longer than any UTF-8 character's run of byte tokens (4)


def first_stop(text: str, stops: Seq[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    found = [text.find(s) for s in stops if s]
    found = [i for i in found if i >= 0]
    return min(found) if found else None


def safe_end(text: str, stops: Seq[str]) -> int:
    """Length of the prefix of ``text`` that can be sent now: hold back a trailing partial UTF-8 character
    (decoded as U+FFFD) and any suffix that could still grow into a stop string."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, end), 0, -1):
            if text[end - k : end] == s[:k]:
                hold = max(hold, k)
                break
    return end - hold


class Status(enum.Enum):
    PREFILL = "prefill"  # reading its prompt, one chunk per step
    DECODE = "decode"  # feeding back its last token, one per step
    FINISHED = "finished"


class Sequence:
    """One request: prompt, sampling, stop rules, its cache, its output so far and its stats.

    Created by ``Engine.add``; the engine's ``step`` runs its prompt chunk by chunk, then feeds back one token
    per step, and calls ``accept`` with every token it samples. Read the output with ``take_events``.
    ``error`` holds the exception that ended it, if one did (``finish_reason == "error"``): a failure of
    this sequence alone (its sampling, its cache) or of a forward it shared.
    """

    def __init__(self, seq_id: str, prompt_ids: list[int], params: SamplingParams, stop_ids: set[int],
                 plan: HeadPlan, keep_cache: bool = False):
        self.id = seq_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.stop_ids = stop_ids
        self.plan = plan
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        self.status = Status.PREFILL
        self.cache: HeadwiseCache | None = None  # made at its first step, freed when it finishes (unless keep_cache)
        # Once finished, keep the cache as the last step left it (its CUDA-graph decoder is freed as usual), for a
        # reading after the end (``eval.runner.measure_kv``); it goes with the sequence, or with ``cache = None``.
        self.keep_cache = keep_cache
        self.prefilled = 0  # prompt tokens in the cache
        self.generated: list[int] = []
        self.fed = 0  # generated tokens in the cache (behind ``generated`` by one while decoding; less while a
        # preempted sequence replays its tokens)
        self.pages: SequencePages | None = None  # its page tables when the engine has a ``PagePool``
        self.preemptions = 0
        self.text = ""  # decoded output (``detokenize(generated)``), cut at a stop string
        # Incremental detokenization (``_detokenized``): the text of ``generated[:_read_at]``, and the last committed
        # window of tokens with its standalone text, so each token decodes a few tokens rather than all of them.
        self._committed = ""
        self._prefix_at = self._read_at = 0
        self._prefix_text = ""
        self._incremental = True
        self._misses = 0  # consecutive tokens whose window did not extend its run's text
        self.emitted = 0  # characters of ``text`` released in events
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.graphs: GraphDecoder | bool | None = None  # its CUDA-graph decoder; False: none allowed
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.arrived = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._events: list[TokenEvent] = []

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def max_tokens(self) -> int:
        """The most tokens its cache will hold: prompt + ``max_new_tokens`` - 1 (the last new token is never fed
        back)."""
        return len(self.prompt_ids) + self.params.max_new_tokens - 1

    @property
    def cached(self) -> int:
        """Tokens in its cache."""
        return self.prefilled + self.fed

    @property
    def kv_bytes(self) -> int:
        """KV bytes it holds now: its pages x page bytes under a pool, else its cache's tensors."""
        if self.pages is not None:
            return self.pages.nbytes
        return self.cache.kv_bytes() if self.cache is not None else 0

    def preempt(self) -> None:
        """Forget the cache (the engine frees it and the pages): the prompt is read again, then the generated
        tokens are fed back one per step without sampling (``fed < len(generated)``), which rebuilds the cache
        by the very steps that built it, whatever the policies, before sampling goes on."""
        self.cache, self.graphs = None, None
        self.prefilled = self.fed = 0
        self.status = Status.PREFILL
        self.preemptions += 1

    def accept(self, token_id: int, detokenize: Callable[[list[int]], str]) -> None:
        """Take a sampled token: end on a stop token, a stop string or the length limit; release safe text."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token_id in self.stop_ids:
            self.finish("stop")
            return
        self.generated.append(token_id)
        self.stats.new_tokens = len(self.generated)
        self.text = self._detokenized(detokenize)
        hit = first_stop(self.text, self.params.stop)
        if hit is not None:
            self.text = self.text[:hit]
            self._release(token_id, final=True)
            self.finish("stop")
            return
        last = len(self.generated) >= self.params.max_new_tokens
        self._release(token_id, final=last)
        if last:
            self.finish("length")
        else:
            self.status = Status.DECODE

    def _detokenized(self, detokenize: Callable[[list[int]], str]) -> str:
        """``detokenize(generated)``, computed from the newest tokens only (as vLLM's incremental detokenizer): the
        window from the start of the last committed run of tokens is decoded, and what it adds to that run's own
        text is appended to the text committed so far. A run is committed once its text ends on a whole character
        (no trailing U+FFFD, a partial UTF-8 sequence), so every window starts on a character boundary and its
        first token has the token before it as context (a SentencePiece decoder strips a leading space from the
        start of whatever it decodes). Decoding all the tokens at every step cost ~0.26 ms per sequence at 512
        tokens (SmolLM2's tokenizer), host time the GPU waits for in a batched step. If a window's text does not
        extend its run's (a tokenizer that rewrites across tokens, e.g. cleaning spaces before punctuation), the
        sequence decodes all its tokens for that token: a byte-fallback decoder (Gemma's) turns a whole run of byte
        tokens into U+FFFD while its last character is incomplete, the characters of that run already committed
        included, until the character completes. After ``_MAX_MISSES`` such tokens in a row (a tokenizer that
        rewrites across tokens, e.g. cleaning spaces before punctuation), it decodes all its tokens from then on."""
        gen = self.generated
        if not self._incremental:
            return detokenize(gen)
        window = detokenize(gen[self._prefix_at :])
        if not window.startswith(self._prefix_text):
            self._misses += 1
            self._incremental = self._misses < _MAX_MISSES
            return detokenize(gen)
        self._misses = 0
        tail = window[len(self._prefix_text) :]
        text = self._committed + tail
        if tail and not tail.endswith("\ufffd"):
            self._committed = text
            self._prefix_at, self._read_at = self._read_at, len(gen)
            self._prefix_text = detokenize(gen[self._prefix_at : self._read_at])
        return text

    def _release(self, token_id: int, final: bool) -> None:
        end = len(self.text) if final else safe_end(self.text, self.params.stop)
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        self._events.append(TokenEvent(token_id, piece))

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the sequence: release any held-back text, then the stats event. The engine frees its cache."""
        if self.finished:
            return
        self.status = Status.FINISHED
        self.finished_at = time.perf_counter()
        self.finish_reason = self.stats.finish_reason = reason
        self.error = error
        if error is None and self.emitted < len(self.text):
            self._events.append(TokenEvent(-1, self.text[self.emitted :]))
            self.emitted = len(self.text)
        self._events.append(TokenEvent(-1, "", self.stats))

    def take_events(self) -> list[TokenEvent]:
        """Events produced since the last call, oldest first (the last one of a finished sequence has stats)."""
        out, self._events = self._events, []
        return out
