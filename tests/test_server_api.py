"""``headwise serve`` over real HTTP on 127.0.0.1: outputs equal offline generation, errors are OpenAI-shaped.

The server runs in a thread of the test process on a free loopback port, with a plan mixing full heads and
small streaming heads (sink 2 + window 8), so every request's cache has heterogeneous per-head lengths and
the streaming heads drop tokens within these short prompts.
"""

from __future__ import annotations

import json

import httpx
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from headwise.engine import Engine  # noqa: E402
from headwise.plan import HeadPlan  # noqa: E402
from headwise.server.app import create_app  # noqa: E402
from headwise.server.background import serve_in_thread  # noqa: E402
from headwise.server.scheduler import Scheduler  # noqa: E402
from server_common import mixed_plan as server_mixed_plan  # noqa: E402
from server_common import one_torch_thread  # noqa: E402, F401 (fixture)

MODEL = "smollm2-135m"
TIMEOUT = 120.0


def mixed_plan(spec) -> HeadPlan:
    return server_mixed_plan(spec, window=8, name=MODEL)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def served(smollm2):
    engine = Engine(smollm2, mixed_plan(smollm2.spec))
    scheduler = Scheduler(engine, max_batch=8, kv_budget_bytes=1 << 30, max_queue=16)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        yield url, engine, scheduler


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)


def offline(engine: Engine, prompt, n: int, **kw) -> str:
    """Offline ``Engine.generate`` text. Call it only while the server is idle: the engine switches the shared
    model's attention implementation for the duration of a forward."""
    return "".join(e.text for e in engine.generate(prompt, max_new_tokens=n, **kw))


def test_greedy_completion_equals_offline_generate(served, client):
    _, engine, _ = served
    prompt = "The three primary colours are"
    want = offline(engine, prompt, 12)  # before the request: one thread runs the model at a time
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert got.choices[0].text == want
    assert got.usage.completion_tokens == 12
    assert got.choices[0].finish_reason == "length"


def test_streamed_completion_equals_offline_generate(served, client):
    _, engine, _ = served
    prompt = "Water boils at"
    want = offline(engine, prompt, 10)
    stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_uses_the_chat_template_and_equals_offline(served, client, smollm2):
    _, engine, _ = served
    messages = [{"role": "user", "content": "Name a fruit."}]
    ids = smollm2.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = smollm2.tokenizer(ids, add_special_tokens=False).input_ids
    want = offline(engine, ids, 12)
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want
    assert got.usage.prompt_tokens == len(ids)


def test_stop_string_cuts_the_text_before_it(served, client):
    _, engine, _ = served
    prompt = "Count: 1, 2, 3,"
    full = offline(engine, prompt, 12)
    stop = full[4:7]  # a stop string that appears in the middle of the greedy output
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert got.choices[0].text == full[: full.index(stop)]
    assert got.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_equals_offline(served, client):
    _, engine, _ = served
    prompt = "A short poem about the sea:"
    kw = {"temperature": 0.9, "top_p": 0.9, "seed": 1234}
    want = offline(engine, prompt, 10, **kw)
    a = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **kw).choices[0].text
    b = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, **kw).choices[0].text
    assert a == b == want


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": "hi"}, 400, "model"),
        ({"model": MODEL}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": 42}, 400, "prompt"),
        ({"model": MODEL, "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ({"model": MODEL, "prompt": "hi", "n": 3}, 400, "n"),
        ({"model": MODEL, "prompt": "hi", "max_tokens": 9000}, 400, "prompt"),
        ({"model": MODEL, "prompt": [1] * 8192, "max_tokens": 1}, 400, "prompt"),
        ({"model": "gpt-4o", "prompt": "hi"}, 404, "model"),
    ],
    ids=["no-model", "no-prompt", "max-tokens-type", "max-tokens-0", "max-tokens-neg", "temperature-type",
         "top-p-0", "prompt-type", "stream-type", "n-3", "over-context-by-max-tokens", "prompt-over-context",
         "unknown-model"],
)
def test_bad_completion_request_gets_openai_error(served, body, status, param):
    r = httpx.post(served[0] + "/v1/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": MODEL},
        {"model": MODEL, "messages": "hello"},
        {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": MODEL, "messages": [{"role": "user", "content": 5}]},
    ],
    ids=["no-messages", "messages-type", "bad-role", "content-type"],
)
def test_bad_chat_request_gets_400(served, body):
    r = httpx.post(served[0] + "/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("messages")


def test_malformed_json_gets_400_and_server_keeps_serving(served, client):
    url = served[0]
    for raw in (b"{not json", b"", b"\xff\xfe", b"[1, 2]"):
        r = httpx.post(url + "/v1/completions", content=raw, headers={"content-type": "application/json"},
                       timeout=TIMEOUT)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    got = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert got.usage.completion_tokens == 2


def test_openai_client_raises_its_own_error_types(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="hi", max_tokens=100_000)


def test_models_and_health_describe_the_served_plan(served, client):
    url, engine, _ = served
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(url + "/health", timeout=TIMEOUT).json()
    assert health["status"] == "ok" and health["plan"] == engine.plan.digest()


def test_metrics_are_prometheus_text_with_counts(served, client):
    url = served[0]
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    httpx.post(url + "/v1/completions", content=b"{", timeout=TIMEOUT)
    text = httpx.get(url + "/metrics", timeout=TIMEOUT).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['headwise_requests_total{status="200"}'] >= 1
    assert values['headwise_requests_total{status="400"}'] >= 1
    assert values["headwise_generated_tokens_total"] >= 3
    for name in ("headwise_tokens_per_second", "headwise_queue_depth", "headwise_running_requests",
                 "headwise_kv_bytes_in_use", "headwise_kv_budget_bytes"):
        assert name in values
    assert values["headwise_kv_budget_bytes"] == 1 << 30


def test_stream_with_usage_reports_token_counts(served):
    body = {"model": MODEL, "prompt": "One, two,", "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", served[0] + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 4


def test_openapi_schema_declares_the_protocol(served):
    url = served[0]
    schema = httpx.get(url + "/openapi.json", timeout=TIMEOUT).json()
    comps = schema["components"]["schemas"]
    body = schema["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/CompletionRequest")
    props = comps["CompletionRequest"]["properties"]
    assert {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream"} <= set(props)
    assert set(comps["CompletionRequest"]["required"]) == {"model", "prompt"}
    chat = comps["ChatCompletionRequest"]
    assert "messages" in chat["required"] and "max_completion_tokens" in chat["properties"]
    responses = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert responses["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionResponse")
    assert responses["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "/v1/models" in schema["paths"] and "/health" in schema["paths"]
    assert httpx.get(url + "/docs", timeout=TIMEOUT).status_code == 200
