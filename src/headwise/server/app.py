"""The HTTP side: an OpenAI-compatible FastAPI app in front of the ``Scheduler``.

Requests are validated and tokenized on the event loop, handed to the scheduler thread, and their tokens come
back through an ``asyncio.Queue`` fed with ``call_soon_threadsafe``. A streaming response is an async
generator: when the client goes away Starlette cancels it, its ``finally`` cancels the request, and the
scheduler drops it (and frees its cache) before the next step. A non-streaming request polls
``request.is_disconnected()`` while it waits, for the same effect.

FastAPI and uvicorn are optional (``pip install headwise[serve]``); importing this module without them raises
a ``HeadwiseError`` that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from headwise.errors import HeadwiseError
from headwise.server.protocol import (
    APIError,
    ParsedRequest,
    chat_chunk,
    chat_object,
    completion_chunk,
    completion_object,
    new_id,
    parse_request,
    usage,
)
from headwise.server.scheduler import (
    Event,
    GenRequest,
    QueueFullError,
    Scheduler,
    SchedulerStoppedError,
    TooLargeError,
)

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as exc:  # pragma: no cover - depends on the install
    raise HeadwiseError(
        f"headwise serve needs FastAPI and uvicorn ({exc.name} is missing): pip install 'headwise[serve]'"
    ) from None

# Chat turns end with the template's end-of-turn token, which is not always the tokenizer's EOS.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_TOKENS = 512  # cap when a chat request gives no max_tokens (the rest of the context would
# reserve a whole context's KV per request and starve admission)
_DISCONNECT_POLL_S = 0.25
MAX_BODY_BYTES = 64 << 20  # far above any prompt that fits a context; refuses absurd uploads early


def create_app(scheduler: Scheduler, model_name: str) -> FastAPI:
    """The app; its lifespan starts the scheduler thread and stops it on shutdown."""
    engine = scheduler.engine
    tok = engine.lm.tokenizer
    spec = engine.spec
    fingerprint = f"headwise-{engine.plan.digest()}"
    created = int(time.time())
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    vocab = len(tok)
    end_of_turn = set(eos)
    for t in _END_OF_TURN:
        tid = tok.convert_tokens_to_ids(t)
        if isinstance(tid, int) and tid != tok.unk_token_id and tid >= 0:
            end_of_turn.add(tid)
    metrics = scheduler.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not scheduler.alive:
            scheduler.start()
        yield
        scheduler.stop()

    app = FastAPI(title="headwise", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def error_response(err: APIError) -> JSONResponse:
        metrics.count_request(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                       code="not_found" if exc.status_code == 404 else None))

    # ------------------------------------------------------------------ tokenization
    def encode_prompt(p: ParsedRequest, chat: bool) -> tuple[list[int], set[int]]:
        with scheduler.tok_lock:
            if chat:
                if getattr(tok, "chat_template", None):
                    text = tok.apply_chat_template(p.messages, add_generation_prompt=True, tokenize=False)
                    ids = tok(text, add_special_tokens=False).input_ids
                else:  # no template: a plain transcript the base model can continue
                    text = "".join(f"{m['role']}: {m['content']}\n" for m in p.messages) + "assistant:"
                    ids = tok(text, add_special_tokens=True).input_ids
                return list(ids), end_of_turn
            if p.prompt_ids is not None:
                bad = [t for t in p.prompt_ids if not 0 <= t < vocab]
                if bad:
                    raise APIError(400, f"'prompt' holds token ids outside the vocabulary [0, {vocab}): {bad[:5]}",
                                   param="prompt")
                return list(p.prompt_ids), eos
            assert p.prompt is not None
            return list(tok(p.prompt, add_special_tokens=True).input_ids), eos

    def check_lengths(p: ParsedRequest, n_prompt: int, chat: bool) -> None:
        limit = spec.max_context
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

    # ------------------------------------------------------------------ generation endpoints
    async def handle(request: Request, chat: bool) -> Response:
        try:
            if int(request.headers.get("content-length") or 0) > MAX_BODY_BYTES:
                raise APIError(413, f"the request body is over {MAX_BODY_BYTES >> 20} MiB")
            raw = await request.body()
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise APIError(400, f"could not parse the request body as JSON: {exc}") from None
            p = parse_request(body, chat, None if chat else DEFAULT_COMPLETION_TOKENS)
            if p.model != model_name:
                raise APIError(404, f"The model '{p.model}' does not exist; this server serves '{model_name}' "
                               "(see GET /v1/models)", param="model", code="model_not_found")
            ids, stop_ids = encode_prompt(p, chat)
            if p.ignore_eos:
                stop_ids = set()
            check_lengths(p, len(ids), chat)
            rid = new_id("chatcmpl" if chat else "cmpl")
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Event] = asyncio.Queue()

            def emit(ev: Event) -> None:
                # RuntimeError: the loop is gone (server shutting down), nobody is listening.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(queue.put_nowait, ev)

            gen = GenRequest(rid, ids, p.params, stop_ids, emit)
            try:
                scheduler.submit(gen)
            except QueueFullError as exc:
                raise APIError(429, str(exc), type_="server_overloaded", code="queue_full") from None
            except TooLargeError as exc:
                raise APIError(400, str(exc), param="max_tokens", code="kv_budget_exceeded") from None
            except SchedulerStoppedError as exc:
                raise APIError(503, str(exc), type_="server_error", code="unavailable") from None
        except APIError as err:
            return error_response(err)
        if p.stream:
            metrics.count_request(200)
            return StreamingResponse(stream(gen, queue, p, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await collect(request, gen, queue, p, chat)

    async def collect(request: Request, gen: GenRequest, queue: asyncio.Queue[Event], p: ParsedRequest,
                      chat: bool) -> Response:
        pieces: list[str] = []
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), _DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        gen.cancel()
                        scheduler.wake()
                        metrics.count_request(499)  # nginx's "client closed request"
                        return Response(status_code=499)
                    continue
                if ev.kind == "token":
                    pieces.append(ev.text)
                elif ev.kind == "error":
                    return error_response(APIError(500, ev.message, type_="server_error"))
                else:
                    make = chat_object if chat else completion_object
                    metrics.count_request(200)
                    return JSONResponse(make(gen.id, model_name, fingerprint, "".join(pieces), ev.finish_reason,
                                             ev.prompt_tokens, ev.completion_tokens))
        finally:
            gen.cancel()  # no-op when finished; frees the slot if this handler was cancelled

    async def stream(gen: GenRequest, queue: asyncio.Queue[Event], p: ParsedRequest,
                     chat: bool) -> AsyncIterator[str]:
        def sse(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            if chat:
                yield sse(chat_chunk(gen.id, model_name, fingerprint, {"role": "assistant", "content": ""}, None))
            while True:
                ev = await queue.get()
                if ev.kind == "token":
                    if chat:
                        yield sse(chat_chunk(gen.id, model_name, fingerprint, {"content": ev.text}, None))
                    else:
                        yield sse(completion_chunk(gen.id, model_name, fingerprint, ev.text, None))
                elif ev.kind == "error":
                    yield sse(APIError(500, ev.message, type_="server_error").body())
                    break
                else:
                    last = (chat_chunk(gen.id, model_name, fingerprint, {}, ev.finish_reason) if chat
                            else completion_chunk(gen.id, model_name, fingerprint, "", ev.finish_reason))
                    yield sse(last)
                    if p.include_usage:
                        tail = last | {"choices": [], "usage": usage(ev.prompt_tokens, ev.completion_tokens)}
                        yield sse(tail)
                    break
            yield "data: [DONE]\n\n"
        finally:
            # Runs when the stream ends and when Starlette cancels it because the client disconnected:
            # either way the scheduler drops the request before its next step.
            if not gen.finished:
                gen.cancel()
                scheduler.wake()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handle(request, chat=True)

    # ------------------------------------------------------------------ info endpoints
    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "headwise",
            "max_model_len": spec.max_context, "plan": engine.plan.digest(),
        }]}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = scheduler.alive
        body = {"status": "ok" if ok else "error", "model": model_name, "plan": engine.plan.digest(),
                **scheduler.snapshot()}
        if not ok and scheduler.error is not None:
            body["error"] = f"{type(scheduler.error).__name__}: {scheduler.error}"
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(render_metrics(scheduler), media_type="text/plain; version=0.0.4")

    return app


def render_metrics(scheduler: Scheduler) -> str:
    """Prometheus text exposition format (no client library needed)."""
    m = scheduler.metrics
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lines.append(f"{name}{labels} {value:g}" if isinstance(value, float) else f"{name}{labels} {value}")

    with m.lock:
        by_status = sorted(m.requests_by_status.items())
    metric("headwise_requests_total", "counter", "HTTP generation requests answered, by status code.",
           [(f'{{status="{s}"}}', n) for s, n in by_status] or [('{status="200"}', 0)])
    metric("headwise_generated_tokens_total", "counter", "Tokens generated.", [("", m.generated_tokens)])
    metric("headwise_prompt_tokens_total", "counter", "Prompt tokens prefilled.", [("", m.prompt_tokens)])
    metric("headwise_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [("", round(m.tokens_per_s(), 3))])
    metric("headwise_queue_depth", "gauge", "Requests waiting for admission.", [("", m.queue_depth)])
    metric("headwise_running_requests", "gauge", "Requests in the running batch.", [("", m.running)])
    metric("headwise_running_requests_peak", "gauge", "Largest batch decoded in one step since start.",
           [("", m.peak_running)])
    metric("headwise_kv_bytes_in_use", "gauge", "Bytes held by the running requests' KV caches.",
           [("", m.kv_bytes_in_use)])
    metric("headwise_kv_bytes_reserved", "gauge", "KV bytes reserved by admission (worst case per request).",
           [("", m.kv_bytes_reserved)])
    metric("headwise_kv_budget_bytes", "gauge", "KV budget that admission keeps to.", [("", scheduler.kv_budget)])
    metric("headwise_requests_cancelled_total", "counter", "Requests dropped because the client went away.",
           [("", m.cancelled)])
    metric("headwise_decode_steps_total", "counter", "Batched decode steps run.", [("", m.decode_steps)])
    metric("headwise_decode_graph_steps_total", "counter",
           "Decode steps of a request alone run by its CUDA-graph decoder (the first captures, the rest replay; "
           "counted in decode_steps too).",
           [("", m.decode_graph_steps)])
    return "\n".join(lines) + "\n"
