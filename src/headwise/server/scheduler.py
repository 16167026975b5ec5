"""Continuous batching: one thread owns the model and advances every running request one step at a time.

Each loop iteration (a *step*):

1. **Admit** waiting requests (FIFO) while the running batch has room (``max_batch``) and the KV budget can
   hold the new request's worst case (its KV estimate at prompt + max_tokens). A request gets its own batch-1
   ``HeadwiseCache`` reserved for its whole length, so every request keeps its own per-head lengths.
2. **Prefill**, chunked: requests still reading their prompt run their next chunk (chunk boundaries are the
   engine's, so the logits equal offline ``Engine.generate``), at most about ``chunk_size`` prompt tokens per
   step, so a long prompt delays the running requests' next tokens by one chunk's time, not by its whole
   prefill.
3. **Decode** ONE token for all decoding requests together: their last tokens are stacked into one
   ``[N, 1]`` forward (``Engine.decode_batch``), projections and MLPs batched, attention row by row with
   each row's cache. A request decoding alone replays its step from a CUDA graph instead (its own
   ``engine.GraphDecoder``, captured at its first lone step), where the engine allows graphs: one client on
   a GPU gets ``Engine.generate``'s speed; the graph survives steps taken in a batch (positions and lengths
   live on the device).

Requests join and leave between steps: a finished, stopped or cancelled request (client gone) is dropped
and its cache freed before the next step, so its KV bytes are back in the budget at once.

Nothing here knows HTTP: the app hands in ``GenRequest`` objects with an ``emit`` callback and reads
``Metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from headwise.cache import HeadwiseCache
from headwise.engine import Engine, GraphDecoder, SamplingParams, sample_next
from headwise.errors import HeadwiseError
from headwise.plan import resolve

log = logging.getLogger("headwise.server")


class QueueFullError(HeadwiseError):
    """The waiting queue is at its bound: the client should retry later (HTTP 429)."""


class TooLargeError(HeadwiseError):
    """The request alone needs more KV memory than the whole budget (HTTP 400)."""


class SchedulerStoppedError(HeadwiseError):
    """The scheduler is not running (HTTP 503)."""


class ShuttingDownError(SchedulerStoppedError):
    """The server is draining before it stops: no new requests (HTTP 503 with Retry-After)."""


@dataclass
class Event:
    """What the scheduler tells a request's consumer: a text piece, the end, or an error."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    token_id: int = -1
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    message: str = ""
    status: int = 500  # for errors: the HTTP status a non-streaming answer carries (503: shutting down)


@dataclass
class GenRequest:
    """One generation request as the scheduler sees it.

    ``emit`` is called from the scheduler thread for every event; it must not block (the app hands events
    to its event loop with ``call_soon_threadsafe``).
    """

    id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: set[int]
    emit: Callable[[Event], None]
    kv_estimate: int = 0
    submitted: float = field(default_factory=time.perf_counter)
    # --- state owned by the scheduler thread
    cache: HeadwiseCache | None = None
    prefilled: int = 0
    logits: torch.Tensor | None = None  # [vocab] next-token logits once prefill is done
    generated: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0  # characters of ``text`` already sent
    generator: torch.Generator | None = None
    kv_bytes: int = 0
    finished: bool = False
    graphs: GraphDecoder | bool | None = None  # its CUDA-graph decoder; False: the engine allows none
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at the next step (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def reserved_bytes(self) -> int:
        return max(self.kv_estimate, self.kv_bytes)


class Metrics:
    """Counters and gauges for ``/metrics`` (written by the scheduler and the app, read by scrapes)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests_by_status: dict[str, int] = {}
        self.generated_tokens = 0
        self.prompt_tokens = 0
        self.cancelled = 0
        self.decode_steps = 0
        self.decode_graph_steps = 0  # of which replayed from a request's CUDA graph (a request alone)
        self.queue_depth = 0
        self.running = 0
        self.peak_running = 0  # largest batch seen in one decode step
        self.kv_bytes_in_use = 0
        self.kv_bytes_reserved = 0
        self._token_times: deque[tuple[float, int]] = deque()

    def count_request(self, status: int) -> None:
        with self.lock:
            key = str(status)
            self.requests_by_status[key] = self.requests_by_status.get(key, 0) + 1

    def add_tokens(self, n: int, now: float) -> None:
        with self.lock:
            self.generated_tokens += n
            self._token_times.append((now, n))

    def tokens_per_s(self, window_s: float = 10.0) -> float:
        """Generated tokens per second over the last ``window_s`` seconds."""
        now = time.perf_counter()
        with self.lock:
            while self._token_times and self._token_times[0][0] < now - window_s:
                self._token_times.popleft()
            return sum(n for _, n in self._token_times) / window_s


class Scheduler:
    """Owns the engine in one thread; see the module docstring for the step."""

    def __init__(self, engine: Engine, max_batch: int = 32, kv_budget_bytes: int = 2 << 30,
                 max_queue: int = 64, prefill_tokens_per_step: int | None = None):
        if max_batch < 1:
            raise HeadwiseError(f"max batch must be at least 1, got {max_batch}")
        if max_queue < 0:
            raise HeadwiseError(f"max queue must be 0 or more, got {max_queue}")
        if kv_budget_bytes <= 0:
            raise HeadwiseError(f"KV budget must be positive, got {kv_budget_bytes} bytes")
        self.engine = engine
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.kv_budget = int(kv_budget_bytes)
        self.prefill_budget = prefill_tokens_per_step or engine.chunk_size
        self.metrics = Metrics()
        # Fast tokenizers refuse concurrent use ("Already borrowed"): every use of the engine's tokenizer takes
        # this lock. The app encodes prompts with its own copies, so it never waits on this thread's decoding.
        self.tok_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: deque[GenRequest] = deque()
        self._running: list[GenRequest] = []
        self._stop = False
        self._draining = False
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        # Called (from the scheduler thread) if the loop dies despite the per-request guards; the server sets
        # it to end the process with a non-zero status, so that a supervisor restarts it rather than a
        # process that answers 503 forever lives on.
        self.on_death: Callable[[BaseException], None] | None = None
        spec = engine.spec
        self._policies = resolve(engine.plan.policies(), spec)
        self._probe_warned = False

    # ------------------------------------------------------------------ admission
    def _plan_bytes(self, seq_len: int) -> int:
        spec, dtype_bytes = self.engine.spec, self.engine.lm.dtype.itemsize
        return sum(p.kv_bytes(seq_len, spec.head_dim, dtype_bytes) for row in self._policies for p in row)

    def kv_estimate(self, total_tokens: int) -> int:
        """KV bytes a request's cache will hold at ``total_tokens`` (prompt + generated), before it runs.

        The larger of (a) the plan's bytes (``Policy.kv_bytes``) and (b) what the request's cache reserves
        up front, measured by building that cache on the ``meta`` device (shapes without storage, about a
        millisecond): (b) sees what (a) cannot, such as a streaming ring allocated whole or page metadata kept
        in another dtype; (a) covers stores that grow instead of reserving."""
        eng = self.engine
        planned = self._plan_bytes(total_tokens)
        try:
            probe = HeadwiseCache(eng.spec, eng.plan, "meta", eng.lm.dtype, 1, eng.use_kernels)
            probe.reserve(total_tokens)
            reserved = probe.kv_bytes()
        except Exception as exc:  # a store that cannot be built on "meta": the plan's count alone
            if not self._probe_warned:
                log.warning("KV estimate from the plan only: a store cannot be sized on the meta device (%s)", exc)
                self._probe_warned = True
            reserved = 0
        return max(planned, reserved)

    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; raises ``QueueFullError`` (queue at its bound), ``TooLargeError`` (can never fit) or
        ``SchedulerStoppedError``."""
        total = len(req.prompt_ids) + req.params.max_new_tokens - 1
        req.kv_estimate = self.kv_estimate(total)
        if req.kv_estimate > self.kv_budget:
            raise TooLargeError(
                f"this request needs up to {req.kv_estimate / 2**20:.1f} MiB of KV cache (prompt "
                f"{len(req.prompt_ids)} + max_tokens {req.params.max_new_tokens} tokens under plan "
                f"{self.engine.plan.digest()}), more than the server's whole KV budget of "
                f"{self.kv_budget / 2**20:.1f} MiB; lower max_tokens or shorten the prompt"
            )
        with self._cond:
            if self._draining and not self._stop:
                raise ShuttingDownError("the server is shutting down and takes no new requests; retry on another "
                                        "replica or after it restarts")
            if self._stop or self.error is not None:
                raise SchedulerStoppedError("the server's scheduler is not running")
            if len(self._waiting) >= self.max_queue and not self._can_admit_now(req):
                raise QueueFullError(
                    f"the server is at capacity ({len(self._running)} running, {len(self._waiting)} waiting, "
                    f"queue bound {self.max_queue}); retry later"
                )
            self._waiting.append(req)
            self.metrics.queue_depth = len(self._waiting)
            self._cond.notify()

    def _can_admit_now(self, req: GenRequest) -> bool:
        return not self._waiting and self._fits(req)

    def _fits(self, req: GenRequest) -> bool:
        if len(self._running) >= self.max_batch:
            return False
        in_use = sum(r.reserved_bytes for r in self._running)
        return in_use + req.kv_estimate <= self.kv_budget

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="headwise-scheduler", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still queued or running end with a 503 error event."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
        for r in [*self._waiting, *self._running]:
            with contextlib.suppress(Exception):
                self._finish(r, error="the server is shutting down; this request was cut short", status=503)
        self._waiting.clear()
        self._running.clear()

    def drain(self, grace_s: float) -> bool:
        """Graceful stop: refuse new requests (``ShuttingDownError``), give the queued and running ones up to
        ``grace_s`` seconds to finish, then ``stop``. True if every request finished within the grace."""
        with self._cond:
            self._draining = True
        deadline = time.monotonic() + grace_s
        idle = False
        while time.monotonic() < deadline and self.alive:
            with self._cond:
                if not self._waiting and not self._running:
                    idle = True
                    break
            time.sleep(0.05)
        self.stop()
        return idle

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._stop and not self._waiting and not self._running:
                        self._cond.wait()
                    if self._stop:
                        return
                    self._admit()
                self.step()
        except BaseException as exc:  # the loop must never die silently: health turns 503 and requests fail
            self.error = exc
            log.exception("scheduler thread died")
            for r in [*self._waiting, *self._running]:
                with contextlib.suppress(Exception):
                    self._finish(r, error=f"internal error: {type(exc).__name__}: {exc}")
            if self.on_death is not None:
                self.on_death(exc)

    def _admit(self) -> None:
        """Move waiting requests into the batch (FIFO, no overtaking: a big request is never starved)."""
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._finish(head, cancelled=True)
                continue
            if not self._fits(head):
                break
            self._waiting.popleft()
            self._running.append(head)
        self.metrics.queue_depth = len(self._waiting)
        self.metrics.running = len(self._running)

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """Prefill (chunked, bounded) and one batched decode step; drop finished and cancelled requests."""
        self._drop_cancelled()
        budget = self.prefill_budget
        for r in list(self._running):
            if r.logits is not None or budget <= 0 or r.finished:
                continue
            try:
                budget -= self._prefill_chunk(r)
            except Exception as exc:
                self._fail([r], exc)
        self._drop_cancelled()
        ready = [r for r in self._running if r.logits is not None and not r.finished]
        feed: list[GenRequest] = []
        before = sum(len(r.generated) for r in ready)
        for r in ready:
            try:  # one request's failure (a bad parameter, a tokenizer error) ends that request only
                if self._sample_and_emit(r):
                    feed.append(r)
            except Exception as exc:
                self._fail([r], exc)
        # Tokens the requests kept (a sampled EOS ends a request but is not generated text).
        self.metrics.add_tokens(sum(len(r.generated) for r in ready) - before, time.perf_counter())
        if feed:
            try:
                graphs = self._graphs(feed[0]) if len(feed) == 1 else None
                if graphs is not None:  # alone: its step replayed from its CUDA graph
                    feed[0].cache.decode_step += 1
                    logits = graphs.step(feed[0].generated[-1])
                    self.metrics.decode_graph_steps += 1
                else:
                    logits = self.engine.decode_batch([r.cache for r in feed], [r.generated[-1] for r in feed])
                self.metrics.decode_steps += 1
                self.metrics.peak_running = max(self.metrics.peak_running, len(feed))
                for r, row in zip(feed, logits):
                    r.logits = row
            except Exception as exc:
                self._fail(feed, exc)
        with self._cond:
            done = [r for r in self._running if r.finished]
            self._running = [r for r in self._running if not r.finished]
            for r in done:
                r.cache = None  # free the KV memory now
                r.graphs = None
            self._account()
            self._admit()

    def _graphs(self, r: GenRequest) -> GraphDecoder | None:
        """``r``'s CUDA-graph decoder, made at its first lone decode step (None where the engine allows none:
        not CUDA, no kernels, a policy without graph decode, or too few steps left to pay for a capture)."""
        if r.graphs is None:
            assert r.cache is not None
            r.graphs = self.engine.graph_decoder(r.cache, r.params.max_new_tokens - len(r.generated)) or False
        return r.graphs or None

    def _prefill_chunk(self, r: GenRequest) -> int:
        eng = self.engine
        if r.cache is None:
            total = len(r.prompt_ids) + r.params.max_new_tokens - 1  # the last new token is never fed back
            r.cache = eng.new_cache(1, reserve=total)
            if r.params.seed is not None:
                r.generator = torch.Generator().manual_seed(r.params.seed)
        s = r.prefilled
        chunk = r.prompt_ids[s : s + eng.chunk_size]
        ids = torch.tensor([chunk], dtype=torch.long, device=eng.lm.device)
        logits = eng.forward(ids, r.cache)
        r.prefilled = s + len(chunk)
        if r.prefilled >= len(r.prompt_ids):
            r.logits = logits[0]
            r.kv_bytes = r.cache.kv_bytes()
            self.metrics.prompt_tokens += len(r.prompt_ids)
        return len(chunk)

    def _sample_and_emit(self, r: GenRequest) -> bool:
        """Sample ``r``'s next token and send the text it completes; True if ``r`` needs another forward."""
        assert r.logits is not None
        p = r.params
        tok_id = sample_next(r.logits, p, r.generator)
        r.logits = None
        if tok_id in r.stop_ids:
            self._flush(r, final=True)
            self._finish(r, reason="stop")
            return False
        r.generated.append(tok_id)
        with self.tok_lock:
            r.text = self.engine.lm.tokenizer.decode(r.generated, skip_special_tokens=True)
        hit = _first_stop(r.text, p.stop)
        if hit is not None:
            r.text = r.text[:hit]
            self._flush(r, final=True, token_id=tok_id)
            self._finish(r, reason="stop")
            return False
        last = len(r.generated) >= p.max_new_tokens
        self._flush(r, final=last, token_id=tok_id)
        if last:
            self._finish(r, reason="length")
            return False
        return True

    def _flush(self, r: GenRequest, final: bool, token_id: int = -1) -> None:
        """Send the text that is safe to send: not a possible start of a stop string, nor a split UTF-8 char."""
        end = len(r.text) if final else _safe_end(r.text, r.params.stop)
        if end > r.emitted:
            piece = r.text[r.emitted : end]
            r.emitted = end
            r.emit(Event("token", text=piece, token_id=token_id))

    def _finish(self, r: GenRequest, reason: str | None = None, error: str | None = None,
                cancelled: bool = False, status: int = 500) -> None:
        if r.finished:
            return
        r.finished = True
        if cancelled:
            self.metrics.cancelled += 1
            return
        if error is not None:
            r.emit(Event("error", message=error, status=status))
            return
        r.emit(Event("done", finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=len(r.generated)))

    def _fail(self, reqs: Sequence[GenRequest], exc: BaseException) -> None:
        log.exception("generation failed for %d request(s)", len(reqs))
        for r in reqs:
            try:
                self._finish(r, error=f"generation failed: {type(exc).__name__}: {exc}")
            except Exception:  # its consumer's emit failed too: it is finished all the same
                log.exception("could not tell request %s that it failed", r.id)

    def _drop_cancelled(self) -> None:
        for r in self._running:
            if r.cancelled and not r.finished:
                self._finish(r, cancelled=True)
                r.cache = None
                r.graphs = None

    def _account(self) -> None:
        for r in self._running:
            if r.cache is not None:
                r.kv_bytes = r.cache.kv_bytes()  # growing stores (unreserved policies) are seen as they grow
        self.metrics.running = len(self._running)
        self.metrics.queue_depth = len(self._waiting)
        self.metrics.kv_bytes_in_use = sum(r.kv_bytes for r in self._running if r.cache is not None)
        self.metrics.kv_bytes_reserved = sum(r.reserved_bytes for r in self._running)

    def snapshot(self) -> dict[str, Any]:
        """Queue and batch sizes for ``/health``."""
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting)}


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    found = [text.find(s) for s in stops if s]
    found = [i for i in found if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: Sequence[str]) -> int:
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
