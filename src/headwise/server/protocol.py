"""The OpenAI wire format: request validation, error bodies, response and stream-chunk objects.

Validation is written out by hand (not left to a schema library) so that every rejection names the field
and says what was expected, in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Fields OpenAI defines but headwise does not implement (``n > 1``, ``logprobs``, ``echo``, penalties, ...) are
refused with a 400 that says so, rather than silently ignored; unknown extra fields are ignored, as OpenAI's
own clients send some. One extension is read, as vLLM and SGLang do: ``ignore_eos`` (generate exactly
``max_tokens``, for load tests).
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from headwise.engine import SEED_END, SEED_MIN, SamplingParams


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    """A validated request: what to tokenize and how to sample."""

    model: str
    stream: bool
    params: SamplingParams
    include_usage: bool = False
    ignore_eos: bool = False  # vLLM/SGLang extension: generate exactly max_tokens (load tests)
    prompt: str | None = None  # completions, text prompt
    prompt_ids: list[int] | None = None  # completions, token prompt
    messages: list[dict[str, str]] = field(default_factory=list)  # chat


_UNSUPPORTED_COMPLETION = {
    "n": 1, "best_of": 1, "echo": False, "suffix": None, "logprobs": None,
    "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
}
_UNSUPPORTED_CHAT = {
    "n": 1, "logprobs": False, "top_logprobs": None, "presence_penalty": 0, "frequency_penalty": 0,
    "logit_bias": None, "tools": None, "tool_choice": None, "response_format": None,
}
_ROLES = ("system", "user", "assistant", "developer", "tool")


def _bad(message: str, param: str | None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _type_name(value: Any) -> str:
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object", type(None): "null"}.get(type(value), type(value).__name__)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{key}' must be a number, got {_type_name(value)}", key)
    if not math.isfinite(value):  # NaN passes both range checks below
        raise _bad(f"'{key}' must be a finite number, got {value}", key)
    if value > hi or value < lo or (lo_open and value == lo):
        bound = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise _bad(f"'{key}' must be in {bound}, got {value}", key)
    return float(value)


def _integer(body: dict[str, Any], key: str) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{key}' must be an integer, got {_type_name(value)}", key)
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _bad("'stop' must be a string or an array of strings", "stop")
    if len(stop) > 4:
        raise _bad(f"'stop' takes at most 4 sequences, got {len(stop)}", "stop")
    return tuple(s for s in stop if s)


def parse_request(body: Any, chat: bool, default_max_tokens: int | None) -> ParsedRequest:
    """Validate a decoded JSON body of ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions``.

    ``default_max_tokens`` is used when the body gives none (``None``: the caller fills it in later, from the
    room left in the context)."""
    if not isinstance(body, dict):
        raise _bad(f"the request body must be a JSON object, got {_type_name(body)}", None)
    model = body.get("model")
    if model is None:
        raise _bad("you must provide a model parameter", "model")
    if not isinstance(model, str):
        raise _bad(f"'model' must be a string, got {_type_name(model)}", "model")
    for key, neutral in (_UNSUPPORTED_CHAT if chat else _UNSUPPORTED_COMPLETION).items():
        if key in body and body[key] is not None and body[key] != neutral:
            raise _bad(f"'{key}' = {body[key]!r} is not supported by headwise serve (only {neutral!r})", key,
                       "unsupported_parameter")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad(f"'stream' must be a boolean, got {_type_name(stream)}", "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise _bad("'stream_options' must be an object", "stream_options")
        include_usage = bool(opts.get("include_usage", False))
    key = "max_tokens"
    if chat and body.get("max_completion_tokens") is not None:
        key = "max_completion_tokens"
    max_tokens = _integer(body, key)
    if max_tokens is None:
        max_tokens = default_max_tokens
    elif max_tokens < 1:
        raise _bad(f"'{key}' must be at least 1, got {max_tokens}", key)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = _integer(body, "seed")
    if seed is not None and not SEED_MIN <= seed < SEED_END:
        raise _bad(f"'seed' must be in [-2^63, 2^64), got {seed}", "seed")
    params = SamplingParams(
        max_new_tokens=max_tokens or 0, temperature=temperature, top_p=top_p, seed=seed, stop=_stop(body)
    )
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad(f"'ignore_eos' must be a boolean, got {_type_name(ignore_eos)}", "ignore_eos")
    req = ParsedRequest(model=model, stream=stream, params=params, include_usage=include_usage,
                        ignore_eos=ignore_eos)
    if chat:
        req.messages = _messages(body.get("messages"))
    else:
        req.prompt, req.prompt_ids = _prompt(body.get("prompt"))
    return req


def _prompt(prompt: Any) -> tuple[str | None, list[int] | None]:
    if prompt is None:
        raise _bad("you must provide a prompt parameter", "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _bad("'prompt' is empty", "prompt")
        return prompt, None
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return None, list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
        raise _bad("several prompts in one request are not supported by headwise serve; send one request each "
                   "(they are batched together anyway)", "prompt", "unsupported_parameter")
    raise _bad("'prompt' must be a non-empty string or an array of token ids", "prompt")


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise _bad("you must provide a messages parameter", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty array of {role, content} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(f"'{where}' must be an object, got {_type_name(m)}", where)
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise _bad(f"'{where}.role' must be one of {', '.join(_ROLES)}, got {role!r}", f"{where}.role")
        if isinstance(content, list):  # content parts: only text parts can be served by a text model
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise _bad(f"'{where}.content' parts must be {{'type': 'text', 'text': ...}}", f"{where}.content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise _bad(f"'{where}.content' must be a string, got {_type_name(content)}", f"{where}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content})
    return out


# ---------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_object(rid: str, model: str, fingerprint: str, text: str, finish: str | None,
                      prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, fingerprint: str, text: str, finish: str | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
    }


def chat_object(rid: str, model: str, fingerprint: str, text: str, finish: str | None,
                prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, fingerprint: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
