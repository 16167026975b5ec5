"""Continuous batching: one thread owns the engine, decides which requests are live, and steps the engine.

The generation itself (chunked prefill mixed with batched decode, sampling, stop rules, text hold-back, the
CUDA-graph choice for a lone sequence) is the engine's: each request is one ``Sequence`` and each loop
iteration is one ``Engine.step``, exactly what offline ``Engine.generate`` runs. Here only:

1. **Admission**: waiting requests (FIFO, no overtaking) become live while the batch has room (``max_batch``)
   and the KV budget can hold the new request's worst case (``Engine.kv_estimate`` at its
   ``Sequence.max_tokens``); under an engine with a page pool (``pool.py``), while the free pages hold its
   prompt (the engine preempts the newest sequence if decoding later runs the pool dry).
2. **The queue, bounded** (``max_queue``; 429 past it), and the thread.
3. **Cancellation**: a request whose client went away is aborted before the next step, so its KV bytes are
   back in the budget at once.
4. **Events and metrics**: each step's token events go to the requests' consumers; a sequence that failed
   ends its request alone with an error event, the others go on.

Nothing here knows HTTP: the app hands in ``GenRequest`` objects with an ``emit`` callback and reads
``Metrics``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from headwise.engine import Engine, SamplingParams, StepInfo
from headwise.errors import BudgetError, HeadwiseError
from headwise.pool import SequencePages
from headwise.sequence import Sequence

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
    """One generation request as the scheduler sees it: its ``Sequence`` (made at ``submit``) and its consumer.

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
    seq: Sequence | None = None
    finished: bool = False
    prompt_counted: bool = False  # its prompt tokens are in the metrics
    prompt_pages: int = 0  # KV pages its prompt takes, under an engine with a page pool
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at the next step (thread-safe)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def generated(self) -> list[int]:
        return self.seq.generated if self.seq is not None else []

    @property
    def kv_bytes(self) -> int:
        """Bytes its cache holds now (0 before its first step and once it is freed)."""
        return self.seq.kv_bytes if self.seq is not None else 0

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
    """Owns the engine in one thread; see the module docstring."""

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
        # this lock (the engine's, which detokenizes under it in its step). The app encodes prompts with its own
        # copies, so it never waits on this thread's decoding.
        self.tok_lock = engine.tok_lock
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

    # ------------------------------------------------------------------ admission
    def submit(self, req: GenRequest) -> None:
        """Queue ``req``; raises ``QueueFullError`` (queue at its bound), ``TooLargeError`` (can never fit) or
        ``SchedulerStoppedError``."""
        try:
            req.seq = self.engine.new_sequence(req.prompt_ids, req.params, stop_ids=req.stop_ids, seq_id=req.id)
        except BudgetError as exc:  # more pages than the engine's whole pool
            raise TooLargeError(str(exc)) from None
        req.kv_estimate = self.engine.kv_estimate(req.seq.max_tokens)
        if self.engine.pool is not None:
            req.prompt_pages = SequencePages(self.engine.pool, req.seq.plan).pages_at(len(req.prompt_ids))
        elif req.kv_estimate > self.kv_budget:
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
        pool = self.engine.pool
        if pool is not None:
            # Pages: the prompt must fit in the free pages left by the admitted prompts not read yet; growing
            # past it is the engine's (it preempts the newest sequence when the pool runs dry).
            owed = sum(r.prompt_pages for r in self._running if r.seq is not None and r.seq.pages is None)
            return pool.free_pages - owed >= req.prompt_pages
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
        """Make waiting requests live (FIFO, no overtaking: a big request is never starved)."""
        while self._waiting:
            head = self._waiting[0]
            if head.cancelled:
                self._waiting.popleft()
                self._finish(head, cancelled=True)
                continue
            if not self._fits(head):
                break
            self._waiting.popleft()
            assert head.seq is not None
            self.engine.add(head.seq)
            self._running.append(head)
        self.metrics.queue_depth = len(self._waiting)
        self.metrics.running = len(self._running)

    # ------------------------------------------------------------------ one step
    def step(self) -> None:
        """Drop cancelled requests, run one engine step, hand out its events; then admit."""
        self._drop_cancelled()
        info = self.engine.step(self.prefill_budget) if self._running else StepInfo()
        if info.decode_rows:
            self.metrics.decode_steps += info.decode_steps
            self.metrics.decode_graph_steps += info.decode_steps if info.graph else 0
            self.metrics.peak_running = max(self.metrics.peak_running, info.decode_rows)
        kept = 0
        for r in self._running:
            try:  # one consumer's failure ends that request only
                kept += self._hand_out(r)
            except Exception as exc:
                log.exception("could not hand request %s its events", r.id)
                with contextlib.suppress(Exception):
                    self._finish(r, error=f"generation failed: {type(exc).__name__}: {exc}")
                r.finished = True
        self.metrics.add_tokens(kept, time.perf_counter())
        with self._cond:
            self._running = [r for r in self._running if not r.finished]
            self._account()
            self._admit()

    def _hand_out(self, r: GenRequest) -> int:
        """Send ``r`` the events its sequence produced in the step; returns the tokens it kept."""
        seq = r.seq
        assert seq is not None
        if not r.prompt_counted and seq.prefilled == len(seq.prompt_ids):
            r.prompt_counted = True
            self.metrics.prompt_tokens += len(r.prompt_ids)
        kept = 0
        for ev in seq.take_events():
            kept += ev.token_id >= 0
            if ev.text:
                r.emit(Event("token", text=ev.text, token_id=ev.token_id))
        if seq.finished:
            self._end(r)
        return kept

    def _end(self, r: GenRequest) -> None:
        """Report how ``r``'s sequence ended."""
        seq = r.seq
        assert seq is not None
        if seq.error is not None:
            log.error("request %s failed", r.id, exc_info=seq.error)
            self._finish(r, error=f"generation failed: {type(seq.error).__name__}: {seq.error}")
        else:
            self._finish(r, reason=seq.finish_reason)

    def _finish(self, r: GenRequest, reason: str | None = None, error: str | None = None,
                cancelled: bool = False, status: int = 500) -> None:
        if r.finished:
            return
        r.finished = True
        if r.seq is not None and not r.seq.finished:
            self.engine.abort(r.seq)  # frees its cache
        if cancelled:
            self.metrics.cancelled += 1
            return
        if error is not None:
            r.emit(Event("error", message=error, status=status))
            return
        r.emit(Event("done", finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                     completion_tokens=len(r.generated)))

    def _drop_cancelled(self) -> None:
        for r in self._running:
            if r.cancelled and not r.finished:
                self._finish(r, cancelled=True)
        with self._cond:
            self._running = [r for r in self._running if not r.finished]

    def _account(self) -> None:
        self.metrics.running = len(self._running)
        self.metrics.queue_depth = len(self._waiting)
        self.metrics.kv_bytes_in_use = sum(r.kv_bytes for r in self._running)
        self.metrics.kv_bytes_reserved = sum(r.reserved_bytes for r in self._running)

    def snapshot(self) -> dict[str, Any]:
        """Queue and batch sizes for ``/health``."""
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting)}
