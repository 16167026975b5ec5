"""Fuzzing the HTTP API (issue 18): random and mutated requests never get a 5xx, never end a stream with an
error, and never stop the scheduler.

Hypothesis draws request bodies field by field, each field either a plausible value or any JSON value (NaN,
infinities, 2^70, lone surrogates, nested arrays and objects), plus raw byte strings and unknown paths. The
server runs a tiny random-weight Llama with SmolLM2's real tokenizer and chat template, so a request that is
valid generates in milliseconds. The run stops sending after ``BUDGET_S`` seconds; it prints how many requests
it sent.
"""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import pytest

pytest.importorskip("fastapi")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from headwise.engine import Engine  # noqa: E402
from headwise.server.app import create_app  # noqa: E402
from headwise.server.background import serve_in_thread  # noqa: E402
from headwise.server.scheduler import Scheduler  # noqa: E402
from server_common import one_torch_thread  # noqa: E402, F401 (fixture)
from tiny import tiny_model  # noqa: E402

MODEL = "tiny"
MAX_REQUESTS = 600
BUDGET_S = 40.0  # stops sending earlier on a slow machine
TIMEOUT = 30.0

leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
    st.sampled_from(["\ud800", "\udfff x", "a\ud83d", "", MODEL, "user", "text"]),
)
any_json = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)


message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant", "developer"]),
                                 "content": st.text(max_size=30)})
SAMPLING = {
    "max_tokens": st.integers(1, 6),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "ignore_eos": st.booleans(),
}
prompt = st.one_of(st.text(min_size=1, max_size=40), st.lists(st.integers(0, 49_151), min_size=1, max_size=8))
valid_completion = st.fixed_dictionaries({"model": st.just(MODEL), "prompt": prompt}, optional=SAMPLING)
valid_chat = st.fixed_dictionaries({"model": st.just(MODEL), "messages": st.lists(message, min_size=1, max_size=3)},
                                   optional=SAMPLING | {"max_completion_tokens": st.integers(1, 6)})
KEYS = ["model", "prompt", "messages", *SAMPLING, "n", "echo", "logprobs", "best_of", "tools", "suffix"]


@st.composite
def mutated(draw: st.DrawFn, valid: st.SearchStrategy) -> dict:
    """A valid body with one to three fields replaced by any JSON value (or a message's role or content)."""
    body = draw(valid)
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(KEYS))
        messages = body.get("messages")
        if key == "messages" and isinstance(messages, list) and messages and isinstance(messages[0], dict) \
                and draw(st.booleans()):
            body["messages"][0][draw(st.sampled_from(["role", "content"]))] = draw(any_json)
        else:
            body[key] = draw(any_json)
    return body


bodies = st.one_of(valid_completion, valid_chat, mutated(valid_completion), mutated(valid_chat))
raw_bodies = st.one_of(
    bodies.map(lambda b: json.dumps(b).encode()),  # ensure_ascii: lone surrogates travel as \\udXXX escapes
    st.binary(max_size=64),
    st.sampled_from([b'{"model": "tiny", "prompt": "a", "max_tokens": ' + b"7" * 5000 + b"}",
                     b"[" * 50_000 + b"]" * 50_000, b'{"model": "tiny", "prompt": NaN}', b"\xff\xfe{}"]),
)
requests_ = st.one_of(
    st.tuples(st.just("POST"), st.sampled_from(["/v1/completions", "/v1/chat/completions"]), raw_bodies),
    st.tuples(st.just("GET"), st.sampled_from(["/v1/models", "/health", "/metrics", "/openapi.json", "/v1/x",
                                                "/../etc/passwd", "/v1/completions"]), st.just(b"")),
)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_server(smollm2):
    tok = smollm2.tokenizer
    # A context of 96 tokens bounds every generation (a chat without max_tokens takes what the context leaves).
    lm = dataclasses.replace(tiny_model("llama", vocab_size=len(tok), max_position_embeddings=96), tokenizer=tok,
                             name=MODEL)
    scheduler = Scheduler(Engine(lm), max_batch=4, kv_budget_bytes=64 << 20, max_queue=8)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        yield url, scheduler


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
    elif r.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        assert not any('"error"' in e[:10] for e in events), events


def test_fuzzed_requests_get_no_5xx_and_the_scheduler_lives(tiny_server):
    url, scheduler = tiny_server
    sent = {"n": 0, "by_status": {}}
    t_end = time.monotonic() + BUDGET_S
    client = httpx.Client(timeout=TIMEOUT)

    @settings(max_examples=MAX_REQUESTS, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(requests_)
    def one(req) -> None:
        if time.monotonic() > t_end:
            return
        method, path, raw = req
        r = client.request(method, url + path, content=raw or None,
                           headers={"content-type": "application/json"} if method == "POST" else {})
        sent["n"] += 1
        sent["by_status"][r.status_code] = sent["by_status"].get(r.status_code, 0) + 1
        check(r)
        assert scheduler.alive

    one()
    client.close()
    took = time.monotonic() - (t_end - BUDGET_S)
    print(f"\nfuzz: {sent['n']} requests in {took:.0f} s, by status {dict(sorted(sent['by_status'].items()))}")
    assert sent["n"] >= 100
    assert sent["by_status"].get(200, 0) >= sent["n"] // 10, "the fuzzer must reach generation, not only validation"
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
