"""The HTTP side: an OpenAI-compatible FastAPI app in front of the ``Scheduler``.

A request goes through ``Guard`` (Host allow-list, cross-origin refusal, Bearer API key, body size and
arrival deadline, enforced while the body is read), is validated against the pydantic models of
``protocol.py``, then tokenized and submitted in a worker thread with its own tokenizer copy (never on the
event loop, never under the scheduler's lock), and its tokens come back from the scheduler thread through an
``asyncio.Queue`` fed with ``call_soon_threadsafe``. A streaming response is an async generator: when the
client goes away Starlette cancels it, its ``finally`` cancels the request, and the scheduler drops it (and
frees its cache) before the next step. A non-streaming request polls ``request.is_disconnected()`` while it
waits, for the same effect.

Every handler and helper is a module-level function over an ``AppContext`` (``app.state.ctx``), so each can be
called and tested alone.

FastAPI and uvicorn are optional (``pip install headwise[serve]``); importing this module without them raises
a ``HeadwiseError`` that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import hmac
import ipaddress
import json
import logging
import queue
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from headwise.errors import HeadwiseError
from headwise.server.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ParsedRequest,
    chat_chunk,
    chat_object,
    completion_chunk,
    completion_object,
    error_from_validation,
    new_id,
    parsed,
    usage,
)
from headwise.server.scheduler import (
    Event,
    GenRequest,
    QueueFullError,
    Scheduler,
    SchedulerStoppedError,
    ShuttingDownError,
    TooLargeError,
)

try:
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import Collector
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.middleware.cors import CORSMiddleware
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the install
    raise HeadwiseError(
        f"headwise serve needs FastAPI, uvicorn and prometheus-client ({exc.name} is missing): "
        "pip install 'headwise[serve]'"
    ) from None

log = logging.getLogger("headwise.server")

# Chat turns end with the template's end-of-turn token, which is not always the tokenizer's EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # cap when a chat request gives no max_tokens (the rest of the context would
# reserve a whole context's KV per request and starve admission)
_DISCONNECT_POLL_S = 0.25
# A text prompt longer than this many characters per context token is first tokenized by its head alone:
# English runs about 4 characters per token, so the head of a prompt that cannot fit usually holds twice the
# context already, and a 20 MB prompt is refused after tokenizing 8 x context characters, not 20 MB.
_HEAD_CHARS_PER_TOKEN = 8
_TRIM_AFTER_BYTES = 1 << 20  # bodies from this size on hand their memory back to the OS afterwards
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass
class ServerConfig:
    """Limits and access rules of the HTTP front (the ``headwise serve`` flags of the same names)."""

    api_key: str | None = None
    """Bearer token required on ``/v1/*`` (as vLLM's ``--api-key``); None: no authentication."""
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS
    """``Host`` header names accepted (any port); None: any. A loopback server refuses other names, so a
    web page cannot reach it through DNS rebinding."""
    allowed_origins: tuple[str, ...] = ()
    """Browser origins allowed besides the server's own (``"*"``: any); a request from any other origin is
    refused, including the cross-origin "simple" POSTs that browsers send without a preflight."""
    max_body_bytes: int = 16 << 20
    """Largest request body, counted while it is read (chunked or not). 16 MiB holds a 128k-token prompt
    even with every character JSON-escaped."""
    request_timeout_s: float = 30.0
    """Headers, then the body, must each arrive within this many seconds (slow or half-sent requests)."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, running requests get this long to finish before their streams are ended with an error."""
    retry_after_s: int = 1
    """``Retry-After`` sent with 429 (queue full) and 503 (shutting down)."""
    tokenizer_threads: int = 2
    """Worker threads (each with its own tokenizer copy) that tokenize prompts off the event loop."""


class TokenizerPool:
    """Worker threads for prompt tokenization, each borrowing one of ``n`` copies of the tokenizer (fast
    tokenizers refuse concurrent use of one instance; the scheduler thread keeps the original)."""

    def __init__(self, tokenizer: Any, n: int):
        import copy

        self._copies: queue.Queue[Any] = queue.Queue()
        for _ in range(n):
            self._copies.put(copy.deepcopy(tokenizer))
        self.executor = ThreadPoolExecutor(max_workers=n, thread_name_prefix="headwise-tokenize")

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Any]:
        tok = self._copies.get()
        try:
            yield tok
        finally:
            self._copies.put(tok)


@dataclass
class AppContext:
    """What every handler needs: the scheduler, the served model's facts, the limits."""

    scheduler: Scheduler
    model_name: str
    config: ServerConfig
    tokenizers: TokenizerPool
    fingerprint: str
    created: int
    eos: set[int]
    end_of_turn: set[int]
    vocab: int
    max_context: int | None
    has_chat_template: bool
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    @classmethod
    def build(cls, scheduler: Scheduler, model_name: str, config: ServerConfig) -> AppContext:
        engine = scheduler.engine
        tok = engine.lm.tokenizer
        eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        end_of_turn = set(eos)
        for t in _END_OF_TURN:
            tid = tok.convert_tokens_to_ids(t)
            if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
                end_of_turn.add(tid)
        ctx = cls(scheduler=scheduler, model_name=model_name, config=config,
                  tokenizers=TokenizerPool(tok, config.tokenizer_threads),
                  fingerprint=f"headwise-{engine.plan.digest()}", created=int(time.time()), eos=eos,
                  end_of_turn=end_of_turn, vocab=len(tok), max_context=engine.plan.max_context(engine.spec),
                  has_chat_template=bool(getattr(tok, "chat_template", None)))
        ctx.registry.register(SchedulerCollector(scheduler))
        return ctx


def context(request: Request) -> AppContext:
    return request.app.state.ctx


# ---------------------------------------------------------------------------------------------- errors
def error_response(ctx: AppContext, err: APIError) -> JSONResponse:
    ctx.scheduler.metrics.count_request(err.status)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def unavailable(ctx: AppContext, message: str, code: str) -> APIError:
    return APIError(503, message, type_="server_error", code=code,
                    headers={"Retry-After": str(ctx.config.retry_after_s)})


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(context(request), APIError(
        exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
        code="not_found" if exc.status_code == 404 else None))


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422 becomes OpenAI's 400 naming the field; an unparsable body names none."""
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if errors and errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error", "invalid JSON")
        err = APIError(400, f"could not parse the request body as JSON: {detail}")
    else:
        err = error_from_validation(errors)
    return error_response(context(request), err)


# ---------------------------------------------------------------------------------------------- tokenization
def encode_prompt(ctx: AppContext, p: ParsedRequest, chat: bool) -> tuple[list[int], set[int]]:
    """Token ids of the prompt (chat: rendered with the chat template) and the ids that end generation.
    Runs in a tokenizer worker thread."""
    with ctx.tokenizers.borrow() as tok:
        if chat:
            if ctx.has_chat_template:
                text = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
                return _tokenize(ctx, tok, text, False, "messages"), ctx.end_of_turn
            # no template: a plain transcript the base model can continue
            text = "".join(f"{m['role']}: {m['content']}\n" for m in p.messages) + "assistant:"
            return _tokenize(ctx, tok, text, True, "messages"), ctx.end_of_turn
        if p.prompt_ids is not None:
            bad = [t for t in p.prompt_ids if not 0 <= t < ctx.vocab]
            if bad:
                raise APIError(400, f"'prompt' holds token ids outside the vocabulary [0, {ctx.vocab}): {bad[:5]}",
                               param="prompt")
            return list(p.prompt_ids), ctx.eos
        assert p.prompt is not None
        return _tokenize(ctx, tok, p.prompt, True, "prompt"), ctx.eos


def _tokenize(ctx: AppContext, tok: Any, text: str, special: bool, param: str) -> list[int]:
    limit = ctx.max_context
    if limit and len(text) > limit * _HEAD_CHARS_PER_TOKEN:
        head = len(tok(text[: limit * _HEAD_CHARS_PER_TOKEN], add_special_tokens=special).input_ids)
        if head > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, the {param} "
                           f"alone is longer ({head} tokens in its first {limit * _HEAD_CHARS_PER_TOKEN} "
                           f"characters, of {len(text)}). Please shorten it.",
                           param=param, code="context_length_exceeded")
    return list(tok(text, add_special_tokens=special).input_ids)


def check_lengths(ctx: AppContext, p: ParsedRequest, n_prompt: int, chat: bool) -> None:
    """Refuse an empty prompt or one that leaves no room for ``max_tokens``; fill in a chat request's
    default ``max_tokens`` from the room left."""
    limit = ctx.max_context
    param = "messages" if chat else "prompt"
    if n_prompt == 0:
        raise APIError(400, "the prompt is empty after tokenization", param=param)
    if p.params.max_new_tokens == 0:  # chat without max_tokens: what the context leaves, capped
        room = (limit - n_prompt) if limit else DEFAULT_CHAT_TOKENS
        p.params.max_new_tokens = max(1, min(DEFAULT_CHAT_TOKENS, room))
    if limit and n_prompt + p.params.max_new_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{n_prompt + p.params.max_new_tokens} tokens ({n_prompt} in the prompt, "
            f"{p.params.max_new_tokens} for the completion). Please reduce the prompt or max_tokens.",
            param=param, code="context_length_exceeded",
        )


def prepare(ctx: AppContext, p: ParsedRequest, chat: bool, emit: Callable[[Event], None]) -> GenRequest:
    """Tokenize, check lengths and submit to the scheduler (a worker thread: the heavy per-request work)."""
    ids, stop_ids = encode_prompt(ctx, p, chat)
    if p.ignore_eos:
        stop_ids = set()
    check_lengths(ctx, p, len(ids), chat)
    gen = GenRequest(new_id("chatcmpl" if chat else "cmpl"), ids, p.params, stop_ids, emit)
    try:
        ctx.scheduler.submit(gen)
    except QueueFullError as exc:
        raise APIError(429, str(exc), type_="server_overloaded", code="queue_full",
                       headers={"Retry-After": str(ctx.config.retry_after_s)}) from None
    except TooLargeError as exc:
        raise APIError(400, str(exc), param="max_tokens", code="kv_budget_exceeded") from None
    except ShuttingDownError as exc:
        raise unavailable(ctx, str(exc), "shutting_down") from None
    except SchedulerStoppedError as exc:
        raise unavailable(ctx, str(exc), "unavailable") from None
    return gen


# ---------------------------------------------------------------------------------------------- generation
async def generate(ctx: AppContext, request: Request, p: ParsedRequest, chat: bool) -> Response:
    """Hand ``p`` to the scheduler; answer with a stream or, once generation ends, one JSON object."""
    if ctx.scheduler.draining:
        return error_response(ctx, unavailable(ctx, "the server is shutting down and takes no new requests",
                                               "shutting_down"))
    if p.model != ctx.model_name:
        return error_response(ctx, APIError(
            404, f"The model '{p.model}' does not exist; this server serves '{ctx.model_name}' (see GET /v1/models)",
            param="model", code="model_not_found"))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def emit(ev: Event) -> None:
        # RuntimeError: the loop is gone (server shutting down), nobody is listening.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(events.put_nowait, ev)

    fut = loop.run_in_executor(ctx.tokenizers.executor, prepare, ctx, p, chat, emit)
    try:
        gen = await asyncio.shield(fut)
    except APIError as err:
        return error_response(ctx, err)
    except asyncio.CancelledError:  # the client left while its prompt was tokenized: drop it once submitted
        fut.add_done_callback(lambda f: f.exception() is None and f.result().cancel())
        raise
    if p.stream:
        ctx.scheduler.metrics.count_request(200)
        return StreamingResponse(stream(ctx, gen, events, p, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await collect(ctx, request, gen, events, chat)


async def collect(ctx: AppContext, request: Request, gen: GenRequest, events: asyncio.Queue[Event],
                  chat: bool) -> Response:
    """The non-streaming answer: wait for the end while watching for the client to leave."""
    pieces: list[str] = []
    try:
        while True:
            try:
                ev = await asyncio.wait_for(events.get(), _DISCONNECT_POLL_S)
            except TimeoutError:
                if await request.is_disconnected():
                    gen.cancel()
                    ctx.scheduler.wake()
                    ctx.scheduler.metrics.count_request(499)  # nginx's "client closed request"
                    return Response(status_code=499)
                continue
            if ev.kind == "token":
                pieces.append(ev.text)
            elif ev.kind == "error":
                err = (unavailable(ctx, ev.message, "shutting_down") if ev.status == 503
                       else APIError(ev.status, ev.message, type_="server_error"))
                return error_response(ctx, err)
            else:
                make = chat_object if chat else completion_object
                ctx.scheduler.metrics.count_request(200)
                return JSONResponse(make(gen.id, ctx.model_name, ctx.fingerprint, "".join(pieces),
                                         ev.finish_reason, ev.prompt_tokens, ev.completion_tokens))
    finally:
        gen.cancel()  # no-op when finished; frees the slot if this handler was cancelled


def sse(obj: dict[str, Any] | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


async def stream(ctx: AppContext, gen: GenRequest, events: asyncio.Queue[Event], p: ParsedRequest,
                 chat: bool) -> AsyncIterator[str]:
    """Server-sent events: one chunk per text piece, the finish reason, usage if asked, ``[DONE]``. An error
    (shutdown included) is one error event, then ``[DONE]``."""
    name, fp = ctx.model_name, ctx.fingerprint
    try:
        if chat:
            yield sse(chat_chunk(gen.id, name, fp, {"role": "assistant", "content": ""}, None))
        while True:
            ev = await events.get()
            if ev.kind == "token":
                yield sse(chat_chunk(gen.id, name, fp, {"content": ev.text}, None) if chat
                          else completion_chunk(gen.id, name, fp, ev.text, None))
            elif ev.kind == "error":
                code = "shutting_down" if ev.status == 503 else None
                yield sse(APIError(ev.status, ev.message, type_="server_error", code=code).body())
                break
            else:
                last = (chat_chunk(gen.id, name, fp, {}, ev.finish_reason) if chat
                        else completion_chunk(gen.id, name, fp, "", ev.finish_reason))
                yield sse(last)
                if p.include_usage:
                    yield sse(last | {"choices": [], "usage": usage(ev.prompt_tokens, ev.completion_tokens)})
                break
        yield sse("[DONE]")
    finally:
        # Runs when the stream ends and when Starlette cancels it because the client disconnected:
        # either way the scheduler drops the request before its next step.
        if not gen.finished:
            gen.cancel()
            ctx.scheduler.wake()


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 408, 413, 429, 503)
}


async def completions(request: Request, body: CompletionRequest) -> Response:
    """OpenAI's legacy completions: ``prompt`` in, text out (streamed with ``"stream": true``)."""
    return await generate(context(request), request, parsed(body, DEFAULT_COMPLETION_TOKENS), chat=False)


async def chat_completions(request: Request, body: ChatCompletionRequest) -> Response:
    """OpenAI's chat completions, rendered with the tokenizer's chat template."""
    return await generate(context(request), request, parsed(body, None), chat=True)


# ---------------------------------------------------------------------------------------------- info
async def models(request: Request) -> ModelList:
    ctx = context(request)
    return ModelList(data=[ModelCard(id=ctx.model_name, created=ctx.created, max_model_len=ctx.max_context,
                                     plan=ctx.scheduler.engine.plan.digest())])


async def health(request: Request) -> JSONResponse:
    """200 while the scheduler runs; 503 while draining for shutdown or after the scheduler died."""
    ctx = context(request)
    s = ctx.scheduler
    ok = s.alive and not s.draining
    status = "ok" if ok else ("draining" if s.draining and s.error is None else "error")
    body = {"status": status, "model": ctx.model_name, "plan": s.engine.plan.digest(), **s.snapshot()}
    if s.error is not None:
        body["error"] = f"{type(s.error).__name__}: {s.error}"
    return JSONResponse(body, status_code=200 if ok else 503,
                        headers=None if ok else {"Retry-After": str(ctx.config.retry_after_s)})


async def metrics(request: Request) -> Response:
    return Response(generate_latest(context(request).registry), media_type=CONTENT_TYPE_LATEST)


class SchedulerCollector(Collector):
    """The scheduler's counters and gauges, read at scrape time."""

    def __init__(self, scheduler: Scheduler):
        self.scheduler = scheduler

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = self.scheduler
        m = s.metrics
        with m.lock:
            by_status = sorted(m.requests_by_status.items())
        requests = CounterMetricFamily("headwise_requests", "HTTP generation requests answered, by status code.",
                                       labels=["status"])
        for status, n in by_status or [("200", 0)]:
            requests.add_metric([status], n)
        yield requests

        def counter(name: str, help_: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, help_, value=value)

        def gauge(name: str, help_: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, help_, value=value)

        yield counter("headwise_generated_tokens", "Tokens generated.", m.generated_tokens)
        yield counter("headwise_prompt_tokens", "Prompt tokens prefilled.", m.prompt_tokens)
        yield gauge("headwise_tokens_per_second", "Generated tokens per second over the last 10 s.",
                    round(m.tokens_per_s(), 3))
        yield gauge("headwise_queue_depth", "Requests waiting for admission.", m.queue_depth)
        yield gauge("headwise_running_requests", "Requests in the running batch.", m.running)
        yield gauge("headwise_running_requests_peak", "Largest batch decoded in one step since start.",
                    m.peak_running)
        yield gauge("headwise_kv_bytes_in_use", "Bytes held by the running requests' KV caches.",
                    m.kv_bytes_in_use)
        yield gauge("headwise_kv_bytes_reserved", "KV bytes reserved by admission (worst case per request).",
                    m.kv_bytes_reserved)
        yield gauge("headwise_kv_budget_bytes", "KV budget that admission keeps to.", s.kv_budget)
        yield counter("headwise_requests_cancelled", "Requests dropped because the client went away.", m.cancelled)
        yield counter("headwise_decode_steps", "Batched decode forwards run (a --multi-step step counts each of its "
                      "forwards).", m.decode_steps)
        yield counter("headwise_decode_graph_steps",
                      "Of those, forwards replayed from a CUDA graph: a request's alone (its decoder's), or under "
                      "--kv-memory the batch's at its padded size.", m.decode_graph_steps)


# ---------------------------------------------------------------------------------------------- guard
def _host_name(host_header: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``, ``"LocalHost:80"`` -> ``"localhost"``."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc keeps large freed blocks otherwise, so each refused
    multi-megabyte body would leave the process bigger)."""
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(libc_name).malloc_trim(0)


class Guard:
    """Pure ASGI middleware checking, in order: the Host header, the Origin, the API key; then it reads the
    whole body with the size limit and the deadline enforced as it arrives, and hands the app a replay of it.

    Refusals are OpenAI-shaped (400/403/401/413/408); a client that disconnects mid-upload is dropped without
    a response or a logged traceback."""

    def __init__(self, app: ASGIApp, config: ServerConfig, metrics_sink: Callable[[int], None]):
        self.app = app
        self.config = config
        self.count = metrics_sink
        self.hosts = None if config.allowed_hosts is None else {h.lower().strip("[]") for h in config.allowed_hosts}
        self.origins = set(config.allowed_origins)
        self.key = config.api_key.encode() if config.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal is not None:
            await self.reply(send, refusal)
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body = await self.read_body(scope, headers, receive, send)
        if body is None:
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect detection

        try:
            await self.app(scope, replay, send)
        finally:
            if len(body) >= _TRIM_AFTER_BYTES:
                del body
                await asyncio.get_running_loop().run_in_executor(None, _malloc_trim)

    def refusal(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        host = headers.get("host")
        if self.hosts is not None and host is not None and _host_name(host) not in self.hosts:
            return APIError(400, f"this server does not answer for host '{host[:100]}' (allowed: "
                                 f"{', '.join(sorted(self.hosts))}; see --allowed-hosts)", code="host_not_allowed")
        origin = headers.get("origin")
        if origin is not None and not self.origin_allowed(origin, scope, host):
            return APIError(403, f"cross-origin requests from '{origin[:100]}' are refused (see --allowed-origins)",
                            code="origin_not_allowed")
        if self.key is not None and scope["path"].startswith("/v1") and scope["method"] != "OPTIONS":
            auth = headers.get("authorization", "")
            scheme, _, token = auth.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.key):
                return APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                                type_="invalid_request_error", code="invalid_api_key",
                                headers={"WWW-Authenticate": "Bearer"})
        return None

    def origin_allowed(self, origin: str, scope: Scope, host: str | None) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        # The server's own pages (e.g. /docs) are same-origin.
        return host is not None and origin.lower() == f"{scope.get('scheme', 'http')}://{host}".lower()

    async def read_body(self, scope: Scope, headers: dict[str, str], receive: Receive, send: Send) -> bytes | None:
        limit = self.config.max_body_bytes
        too_big = APIError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-mb)",
                           code="request_too_large")
        try:
            declared = int(headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        if declared > limit:
            await self.reply(send, too_big)
            return None
        chunks: list[bytes] = []
        size = 0
        deadline = time.monotonic() + self.config.request_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                await self.reply(send, APIError(408, f"the request body did not arrive within "
                                                     f"{self.config.request_timeout_s:g} s", code="request_timeout"))
                return None
            if message["type"] == "http.disconnect":
                return None  # the client gave up mid-upload: nobody to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                chunks.clear()
                await self.reply(send, too_big)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def reply(self, send: Send, err: APIError) -> None:
        self.count(err.status)
        body = json.dumps(err.body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
        await send({"type": "http.response.start", "status": err.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------- the app
def create_app(scheduler: Scheduler, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The app; its lifespan starts the scheduler thread and stops it on shutdown."""
    config = config or ServerConfig()
    ctx = AppContext.build(scheduler, model_name, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not scheduler.alive:
            scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            ctx.tokenizers.executor.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="headwise", summary="OpenAI-compatible server running a model under a per-head plan",
                  version="1", lifespan=lifespan, redoc_url=None)
    app.state.ctx = ctx
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_api_route("/v1/completions", completions, methods=["POST"], responses=_ERRORS,
                      response_model=CompletionResponse)
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=_ERRORS,
                      response_model=ChatCompletionResponse)
    app.add_api_route("/v1/models", models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    if config.allowed_origins:  # answers the browsers' preflights and lets them read the answers
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins),
                           allow_methods=["GET", "POST"], allow_headers=["authorization", "content-type"])
    app.add_middleware(Guard, config=config, metrics_sink=scheduler.metrics.count_request)
    return app

