"""``headwise serve`` survives hostile input: one request never takes the server down (issue 18).

Each test sends something a hostile but honest client could send, checks the answer, and then checks that
the server still serves: ``/health`` is ok and a normal request completes.
"""

from __future__ import annotations

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
        assert bad.finished and bad.cache is None
        assert scheduler.alive
    finally:
        scheduler.stop()


class _PoisonedRequest(GenRequest):
    """A request whose state cannot be read: stands in for a bug outside the per-request guards."""

    @property
    def cancelled(self) -> bool:
        raise RuntimeError("scheduler bug")


def test_a_dead_scheduler_makes_serve_exit_non_zero(engine):
    from headwise.server.background import free_port
    from headwise.server.cli import SchedulerDiedError, serve

    scheduler = Scheduler(engine, max_batch=2, kv_budget_bytes=1 << 30, max_queue=2)
    outcome: dict[str, BaseException | int] = {}

    def run() -> None:
        try:
            outcome["rc"] = serve(create_app(scheduler, MODEL), scheduler, "127.0.0.1", free_port())
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
