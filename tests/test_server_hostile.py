"""``headwise serve`` survives hostile input: one request never takes the server down (issue 18).

Each test sends something a hostile but honest client could send, checks the answer, and then checks that
the server still serves: ``/health`` is ok and a normal request completes.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

pytest.importorskip("fastapi")

from headwise.engine import Engine, SamplingParams
from headwise.server.app import create_app
from headwise.server.background import serve_in_thread
from headwise.server.scheduler import Event, GenRequest, Scheduler
from server_common import mixed_plan, one_torch_thread  # noqa: F401 (fixture)

MODEL = "smollm2-135m"
TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, mixed_plan(smollm2.spec, window=8, name=MODEL))


@pytest.fixture(scope="module")
def served(engine):
    scheduler = Scheduler(engine, max_batch=8, kv_budget_bytes=1 << 30, max_queue=16)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        yield url, scheduler


def still_serves(url: str) -> None:
    """The server answers /health ok and completes a normal request."""
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
    r = httpx.post(url + "/v1/completions", timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2


def post_raw(url: str, raw: bytes | str, path: str = "/v1/completions", **kw) -> httpx.Response:
    return httpx.post(url + path, content=raw, headers={"content-type": "application/json"}, timeout=TIMEOUT, **kw)


# ---------------------------------------------------------------------- 1. sampling parameters
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["temperature", "top_p"])
def test_non_finite_sampling_parameter_gets_400_naming_it(served, field, literal):
    url, _ = served
    r = post_raw(url, f'{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 2, "{field}": {literal}}}')
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field
    still_serves(url)


def test_subnormal_temperature_is_served_greedily(served):
    url, _ = served
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 4}
    tiny = httpx.post(url + "/v1/completions", json=body | {"temperature": 1e-300}, timeout=TIMEOUT)
    greedy = httpx.post(url + "/v1/completions", json=body | {"temperature": 0}, timeout=TIMEOUT)
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    still_serves(url)


def test_a_failing_request_ends_alone_and_the_others_go_on(engine):
    """A request whose consumer fails on its first token ends with an error and is freed; the request
    decoding beside it finishes normally and the scheduler thread lives on."""
    scheduler = Scheduler(engine, max_batch=4, kv_budget_bytes=1 << 30, max_queue=4)
    ids = engine.encode("Once upon a time").tolist()[0]
    good_events: list[Event] = []
    good_done = threading.Event()

    def good_emit(ev: Event) -> None:
        good_events.append(ev)
        if ev.kind != "token":
            good_done.set()

    def bad_emit(ev: Event) -> None:
        raise RuntimeError("consumer exploded")

    good = GenRequest("good", ids, SamplingParams(max_new_tokens=6), set(), good_emit)
    bad = GenRequest("bad", ids, SamplingParams(max_new_tokens=6), set(), bad_emit)
    scheduler.start()
    try:
        scheduler.submit(bad)
        scheduler.submit(good)
        assert good_done.wait(TIMEOUT)
        assert good_events[-1].kind == "done" and good_events[-1].completion_tokens == 6
        assert bad.finished and bad.seq is not None and bad.seq.cache is None
        assert scheduler.alive
    finally:
        scheduler.stop()


class _PoisonedRequest(GenRequest):
    """A request whose state cannot be read: stands in for a bug outside the per-request guards."""

    @property
    def cancelled(self) -> bool:
        raise RuntimeError("scheduler bug")


def test_a_dead_scheduler_makes_serve_exit_non_zero(engine):
    from headwise.server.cli import SchedulerDiedError, serve
    from headwise.server.http import bind

    scheduler = Scheduler(engine, max_batch=2, kv_budget_bytes=1 << 30, max_queue=2)
    outcome: dict[str, BaseException | int] = {}

    def run() -> None:
        try:
            outcome["rc"] = serve(create_app(scheduler, MODEL), scheduler, bind("127.0.0.1", 0))
        except BaseException as exc:
            outcome["exc"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    deadline = time.monotonic() + TIMEOUT
    while not scheduler.alive and time.monotonic() < deadline:
        time.sleep(0.05)
    ids = engine.encode("Hi").tolist()[0]
    scheduler.submit(_PoisonedRequest("p", ids, SamplingParams(max_new_tokens=2), set(), lambda ev: None))
    t.join(TIMEOUT)
    assert not t.is_alive(), "serve must return once the scheduler died"
    assert isinstance(outcome.get("exc"), SchedulerDiedError)
    assert outcome["exc"].exit_code == 70 and "scheduler bug" in str(outcome["exc"])


# ---------------------------------------------------------------------- 5. malformed JSON and values: 400, not 500
@pytest.mark.parametrize(
    ("path", "raw", "param"),
    [
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi \\ud800 there", "max_tokens": 2}}', "prompt"),
        ("/v1/chat/completions",
         f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "\\udfff"}}], "max_tokens": 2}}',
         "messages[0].content"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "stop": ["\\ud83d"]}}', "stop"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "seed": {1 << 64}}}', "seed"),
        ("/v1/completions", f'{{"model": "{MODEL}", "prompt": "hi", "max_tokens": {"9" * 5000}}}', None),
        ("/v1/completions", '{"model": "' + MODEL + '", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", None),
    ],
    ids=["lone-surrogate-prompt", "lone-surrogate-message", "lone-surrogate-stop", "seed-2^64", "5000-digit-int",
         "nested-100000-deep"],
)
def test_malformed_values_get_400_not_500(served, path, raw, param):
    url, _ = served
    r = post_raw(url, raw, path)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    still_serves(url)


def test_largest_seed_is_accepted(served):
    url, _ = served
    r = httpx.post(url + "/v1/completions", timeout=TIMEOUT, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1,
                                                                  "temperature": 1.0, "seed": (1 << 64) - 1})
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------------- 2. large bodies: off the loop, bounded
def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_big_prompt_is_refused_while_a_stream_runs_and_health_stays_fast(served):
    """A 12 MB prompt (under the 16 MiB body limit) is refused for its length while a stream keeps
    producing tokens and /health answers within a second; three such requests leave RSS where it was."""
    url, _ = served
    big = json.dumps({"model": MODEL, "prompt": "lorem ipsum dolor " * 700_000, "max_tokens": 4})
    stream_body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 24, "temperature": 0, "stream": True,
                   "ignore_eos": True}
    outcome: dict[str, object] = {}

    def run_stream() -> None:
        with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=TIMEOUT) as r:
            outcome["stream"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    def run_big() -> None:
        outcome["big"] = [post_raw(url, big) for _ in range(3)]

    post_raw(url, big)  # the first one warms up allocator pools: RSS is compared from here
    rss0 = rss_bytes()
    threads = [threading.Thread(target=run_stream), threading.Thread(target=run_big)]
    for t in threads:
        t.start()
    health_s = []
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        assert httpx.get(url + "/health", timeout=TIMEOUT).status_code == 200
        health_s.append(time.perf_counter() - t0)
        time.sleep(0.05)
    for t in threads:
        t.join()
    assert all(r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
               for r in outcome["big"])
    events = outcome["stream"]
    assert events[-1] == "data: [DONE]" and sum('"text"' in e for e in events) >= 24
    assert max(health_s) < 1.0, f"/health took {max(health_s):.2f} s while a big body was handled"
    assert rss_bytes() - rss0 < 150 << 20, "refused big bodies must not leave memory behind"
    still_serves(url)


# ---------------------------------------------------------------------- 3, 6. access rules and limits
API_KEY = "sekret-key"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def guarded(engine):
    """A server with an API key, one allowed origin, a 1 MiB body limit, a 1.5 s request deadline, and room
    for one running request and none waiting."""
    from headwise.server.app import ServerConfig

    config = ServerConfig(api_key=API_KEY, allowed_origins=(ORIGIN,), max_body_bytes=1 << 20,
                          request_timeout_s=1.5)
    scheduler = Scheduler(engine, max_batch=1, kv_budget_bytes=1 << 30, max_queue=0)
    with serve_in_thread(create_app(scheduler, MODEL, config)) as url:
        yield url


AUTH = {"authorization": f"Bearer {API_KEY}"}


def guarded_serves(url: str) -> None:
    r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {API_KEY}", "Bearer"])
def test_api_key_is_required_as_bearer_token(guarded, auth):
    headers = {"authorization": auth} if auth else {}
    r = httpx.post(guarded + "/v1/completions", headers=headers, timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 2})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(guarded + "/v1/models", timeout=TIMEOUT).status_code == 401
    assert httpx.get(guarded + "/health", timeout=TIMEOUT).status_code == 200  # probes need no key
    guarded_serves(guarded)


def test_foreign_host_header_is_refused_on_a_loopback_server(served):
    url, _ = served
    r = httpx.post(url + "/v1/completions", headers={"host": "evil.example"}, timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(url + "/health", headers={"host": "localhost:1234"}, timeout=TIMEOUT).status_code == 200
    still_serves(url)


def test_cross_origin_simple_request_is_refused(served):
    url, _ = served
    body = f'{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 2}}'
    r = httpx.post(url + "/v1/completions", content=body, timeout=TIMEOUT,
                   headers={"content-type": "text/plain", "origin": "http://evil.example"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    same = httpx.post(url + "/v1/completions", content=body, timeout=TIMEOUT,
                      headers={"content-type": "application/json", "origin": url})
    assert same.status_code == 200, same.text
    still_serves(url)


def test_allowed_origin_gets_cors_headers(guarded):
    pre = httpx.options(guarded + "/v1/completions", timeout=TIMEOUT, headers={
        "origin": ORIGIN, "access-control-request-method": "POST",
        "access-control-request-headers": "authorization,content-type"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    r = httpx.post(guarded + "/v1/completions", headers=AUTH | {"origin": ORIGIN}, timeout=TIMEOUT,
                   json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.post(guarded + "/v1/completions", headers=AUTH | {"origin": "http://evil.example"},
                       timeout=TIMEOUT, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert other.status_code == 403
    guarded_serves(guarded)


def test_oversized_body_is_refused_while_read_chunked_or_not(guarded):
    def chunks():  # no Content-Length: Transfer-Encoding chunked
        yield b'{"model": "%s", "prompt": "' % MODEL.encode()
        for _ in range(40):
            yield b"x" * (64 << 10)
        yield b'"}'

    chunked = httpx.post(guarded + "/v1/completions", content=chunks(), headers=AUTH, timeout=TIMEOUT)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"
    declared = httpx.post(guarded + "/v1/completions", content=b"x" * (2 << 20), headers=AUTH, timeout=TIMEOUT)
    assert declared.status_code == 413
    guarded_serves(guarded)


def test_queue_full_answers_429_with_retry_after(guarded):
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", guarded + "/v1/completions", json=body, headers=AUTH, timeout=TIMEOUT) as r:
        lines = r.iter_lines()
        while not next(lines).startswith("data: {"):
            pass  # running: the batch of one is full and nothing may wait
        full = httpx.post(guarded + "/v1/completions", headers=AUTH, timeout=TIMEOUT,
                          json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
    assert int(full.headers["retry-after"]) >= 1
    deadline = time.monotonic() + TIMEOUT
    while httpx.get(guarded + "/health", timeout=TIMEOUT).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the disconnected stream frees its slot
    guarded_serves(guarded)


def _raw_connection(url: str):
    import socket

    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=TIMEOUT)


def test_half_sent_headers_are_cut_off_after_the_timeout(guarded):
    conn = _raw_connection(guarded)
    conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
    t0 = time.perf_counter()
    assert conn.recv(1024) == b""  # closed by the server
    assert time.perf_counter() - t0 < 6
    conn.close()
    guarded_serves(guarded)


def test_half_sent_body_gets_408_after_the_timeout(guarded):
    conn = _raw_connection(guarded)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 200\r\n\r\n")
    conn.sendall(head.encode() + b'{"model": "')
    t0 = time.perf_counter()
    answer = conn.recv(4096)
    waited = time.perf_counter() - t0
    while chunk := conn.recv(4096):  # the body may come in a later segment than the head ("connection: close")
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    assert waited < 6
    conn.close()
    guarded_serves(guarded)


def test_aborted_upload_is_dropped_without_a_traceback(guarded, caplog):
    import logging

    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to the root logger caplog watches
    uvicorn_log.addHandler(caplog.handler)
    conn = _raw_connection(guarded)
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n")
    conn.sendall(head.encode() + b'{"model": "' + b"x" * 1000)
    time.sleep(0.3)
    conn.close()
    time.sleep(0.5)
    uvicorn_log.removeHandler(caplog.handler)
    guarded_serves(guarded)
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL") or r.exc_info]
