"""The OpenAI wire format as pydantic models: requests (validated), responses and stream chunks, errors.

The request models are strict (``"10"`` is not an integer, ``"yes"`` is not a boolean, NaN is not a
temperature) and every rejection names its field in OpenAI's error shape::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Fields OpenAI defines but headwise does not implement (``n > 1``, ``logprobs``, ``echo``, penalties, ...) are
refused with a 400 that says so (``code: unsupported_parameter``), rather than silently ignored; unknown extra
fields are ignored, as OpenAI's own clients send some. One extension is read, as vLLM and SGLang do:
``ignore_eos`` (generate exactly ``max_tokens``, for load tests). The same models give the app its OpenAPI
schema (``/openapi.json``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic_core import PydanticCustomError

from headwise.engine import SEED_END, SEED_MIN, SamplingParams

MAX_TOKENS_LIMIT = 1 << 31  # far above any context; keeps arithmetic on max_tokens in machine integers


class APIError(Exception):
    """An error answered to the client in OpenAI's format."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


# ---------------------------------------------------------------------- requests
def _unicode_text(value: str) -> str:
    """JSON can carry lone surrogates (``"\\ud800"``) that no tokenizer can encode: refuse them here."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("invalid_unicode", "holds a lone surrogate at character {pos} (\\u{code}); "
                                  "text must be valid Unicode",
                                  {"pos": exc.start, "code": f"{ord(value[exc.start]):04x}"}) from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


def _refuse(exc: ValidationError, kind: str, message: str) -> PydanticCustomError:
    """One error for a union that failed: the lone-surrogate error if a member found one, else ``message``."""
    for e in exc.errors():
        if e["type"] == "invalid_unicode":
            return PydanticCustomError("invalid_unicode", e["msg"])
    return PydanticCustomError(kind, message)
TokenId = Annotated[int, Field(ge=0)]


def _unsupported(name: str, neutral: Any) -> Any:
    """A validator refusing any value of ``name`` but its neutral one (or null)."""

    def check(value: Any) -> Any:
        if value is not None and value != neutral:
            raise PydanticCustomError("unsupported_parameter",
                                      "{name} = {value} is not supported by headwise serve (only {neutral})",
                                      {"name": name, "value": repr(value)[:80], "neutral": repr(neutral)})
        return value

    return check


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool | None = False


class _SamplingRequest(_Request):
    """Fields shared by both endpoints."""

    model: Text = Field(description="the served model's id (see GET /v1/models)")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="0 = greedy")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_MIN, lt=SEED_END, description="makes sampling reproducible")
    stop: Text | list[Text] | None = Field(None, description="up to 4 stop strings (not included in the text)")
    ignore_eos: bool | None = Field(False, description="extension (vLLM, SGLang): generate exactly max_tokens")
    n: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None

    _n = field_validator("n")(_unsupported("n", 1))
    _presence = field_validator("presence_penalty")(_unsupported("presence_penalty", 0))
    _frequency = field_validator("frequency_penalty")(_unsupported("frequency_penalty", 0))
    _bias = field_validator("logit_bias")(_unsupported("logit_bias", {}))

    @field_validator("stop", mode="wrap")
    @classmethod
    def _stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            value = handler(value)
        except ValidationError as exc:
            raise _refuse(exc, "stop_type", "must be a string or an array of strings") from None
        if isinstance(value, list) and len(value) > 4:
            raise PydanticCustomError("too_long", "takes at most 4 sequences, got {n}", {"n": len(value)})
        return value

    def sampling(self, default_max_tokens: int | None, max_tokens: int | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        n = max_tokens if max_tokens is not None else self.max_tokens
        return SamplingParams(
            max_new_tokens=(n if n is not None else default_max_tokens) or 0,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed, stop=tuple(s for s in stop if s),
        )


Prompt = Text | list[TokenId] | list[Text] | list[list[TokenId]]


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``."""

    prompt: Prompt = Field(description="a string or an array of token ids (one prompt per request)")
    best_of: int | None = None
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None

    _best_of = field_validator("best_of")(_unsupported("best_of", 1))
    _echo = field_validator("echo")(_unsupported("echo", False))
    _suffix = field_validator("suffix")(_unsupported("suffix", None))
    _logprobs = field_validator("logprobs")(_unsupported("logprobs", None))

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            value = handler(value)
        except ValidationError as exc:
            raise _refuse(exc, "prompt_type", "must be a non-empty string or an array of token ids") from None
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str | list):
            value = value[0]  # a batch of one
        if isinstance(value, list) and value and isinstance(value[0], str | list):
            raise PydanticCustomError("unsupported_parameter",
                                      "several prompts in one request are not supported by headwise serve; send "
                                      "one request each (they are batched together anyway)")
        if not value:
            raise PydanticCustomError("empty", "is empty")
        return value


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None

    @field_validator("content", mode="wrap")
    @classmethod
    def _content(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            raise _refuse(exc, "content_type", "must be a string or an array of {'type': 'text', 'text': ...} "
                          "parts") from None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text parts can be served by a text model
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: Any = None

    _logprobs = field_validator("logprobs")(_unsupported("logprobs", False))
    _top_logprobs = field_validator("top_logprobs")(_unsupported("top_logprobs", None))
    _tools = field_validator("tools")(_unsupported("tools", None))
    _tool_choice = field_validator("tool_choice")(_unsupported("tool_choice", None))
    _response_format = field_validator("response_format")(_unsupported("response_format", None))


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


def parsed(req: CompletionRequest | ChatCompletionRequest, default_max_tokens: int | None) -> ParsedRequest:
    """The engine-facing view of a validated request. ``default_max_tokens`` is used when the body gives none
    (``None``: the caller fills it in later, from the room left in the context)."""
    chat = isinstance(req, ChatCompletionRequest)
    n = req.max_completion_tokens if chat and req.max_completion_tokens is not None else None
    out = ParsedRequest(
        model=req.model, stream=bool(req.stream), params=req.sampling(default_max_tokens, n),
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
        ignore_eos=bool(req.ignore_eos),
    )
    if isinstance(req, ChatCompletionRequest):
        out.messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                        for m in req.messages]
    elif isinstance(req.prompt, str):
        out.prompt = req.prompt
    else:
        out.prompt_ids = list(req.prompt)  # type: ignore[arg-type]
    return out


def error_from_validation(errors: list[Any]) -> APIError:
    """A 400 naming the first invalid field, from pydantic's (or FastAPI's) error list."""
    err = errors[0]
    param = _param(err.get("loc", ()))
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    if kind == "missing":
        message = f"you must provide a {param} parameter" if param else "the request body is missing"
    elif param is None:
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            message = "the request body must be a JSON object"
        else:
            message = f"could not parse the request body: {msg}"
    else:
        message = f"'{param}': {msg}"
    return APIError(400, message, param=param, code="unsupported_parameter" if kind == "unsupported_parameter" else None)


_FIELDS = set(CompletionRequest.model_fields) | set(ChatCompletionRequest.model_fields) | {"role", "content",
                                                                                          "include_usage"}


def _param(loc: Any) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; union member tags (``"list[int]"``) end
    the path, as they name a type, not a field."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif p in _FIELDS:
            out += f".{p}" if out else p
        else:
            break
    return out or None


def parse_request(body: Any, chat: bool, default_max_tokens: int | None) -> ParsedRequest:
    """Validate a decoded JSON body of ``/v1/completions`` (``chat=False``) or ``/v1/chat/completions``;
    raises ``APIError`` (400, naming the field)."""
    model = ChatCompletionRequest if chat else CompletionRequest
    try:
        req = model.model_validate(body)
    except ValidationError as exc:
        raise error_from_validation(exc.errors()) from None
    return parsed(req, default_max_tokens)


# ---------------------------------------------------------------------- responses
class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """A ``/v1/completions`` answer, or one stream chunk of it (then without ``usage`` until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "headwise"
    max_model_len: int | None
    plan: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 total_tokens=prompt_tokens + completion_tokens).model_dump()


def completion_object(rid: str, model: str, fingerprint: str, text: str, finish: str | None,
                      prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return CompletionResponse(
        id=rid, created=int(time.time()), model=model, system_fingerprint=fingerprint,
        choices=[CompletionChoice(text=text, finish_reason=finish)],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    ).model_dump()


def completion_chunk(rid: str, model: str, fingerprint: str, text: str, finish: str | None) -> dict[str, Any]:
    return CompletionResponse(
        id=rid, created=int(time.time()), model=model, system_fingerprint=fingerprint,
        choices=[CompletionChoice(text=text, finish_reason=finish)],
    ).model_dump(exclude={"usage"})


def chat_object(rid: str, model: str, fingerprint: str, text: str, finish: str | None,
                prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return ChatCompletionResponse(
        id=rid, created=int(time.time()), model=model, system_fingerprint=fingerprint,
        choices=[ChatChoice(message=ChatMessageOut(content=text), finish_reason=finish)],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    total_tokens=prompt_tokens + completion_tokens),
    ).model_dump()


def chat_chunk(rid: str, model: str, fingerprint: str, delta: dict[str, str], finish: str | None) -> dict[str, Any]:
    out = ChatCompletionChunk(
        id=rid, created=int(time.time()), model=model, system_fingerprint=fingerprint,
        choices=[ChatChunkChoice(delta=ChatDelta(**delta), finish_reason=finish)],
    ).model_dump(exclude={"usage"})
    out["choices"][0]["delta"] = ChatDelta(**delta).model_dump(exclude_none=True)  # OpenAI sends only what is set
    return out
