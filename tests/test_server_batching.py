"""Continuous batching and admission control of ``headwise serve``, over real HTTP on 127.0.0.1.

Concurrent streaming requests must come back complete and unmixed (each equal to its own offline greedy
output), decode together (one forward per step for the whole batch), beat one request's tokens/s in
aggregate, and a request that cannot fit the KV budget must wait in the bounded queue (or get 429 when the
queue is full) until a slot frees, e.g. because a streaming client went away.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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

NAMES = ["Alice", "Bob", "Carol", "Dave", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory",
         "Niaj", "Olivia", "Peggy", "Rupert", "Sybil", "Trent", "Victor", "Walter", "Xavier", "Yvonne", "Zoe",
         "Arthur", "Beatrice", "Cedric", "Daphne", "Edgar", "Fiona", "Gideon", "Harriet", "Isaac", "Juliet"]


def mixed_plan(spec) -> HeadPlan:
    return server_mixed_plan(spec, window=8, name=MODEL)


def prompts(n: int) -> list[str]:
    """Distinguishable prompts: each asks to continue a different count with a different name."""
    return [f"{NAMES[i]} counts from {10 * i + 3}: {10 * i + 3}, {10 * i + 4}," for i in range(n)]


def metrics(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=TIMEOUT).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_for(cond, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(smollm2):
    return Engine(smollm2, mixed_plan(smollm2.spec))


def run_concurrent(engine: Engine, n: int, max_tokens: int) -> dict[str, float]:
    """n concurrent streaming requests vs offline greedy; returns tokens/s alone and in aggregate."""
    texts = prompts(n)
    # Offline references first: one thread runs the model at a time.
    want = ["".join(e.text for e in engine.generate(t, max_new_tokens=max_tokens)) for t in texts]
    assert len(set(want)) == n, "prompts must be distinguishable for the mix-up check to mean anything"
    scheduler = Scheduler(engine, max_batch=n, kv_budget_bytes=1 << 30, max_queue=n)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=TIMEOUT)

        def one(prompt: str) -> tuple[str, int]:
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            text, used = "", 0
            for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    used = chunk.usage.completion_tokens
            return text, used

        t0 = time.perf_counter()
        alone_text, alone_tokens = one(texts[0])
        alone_s = time.perf_counter() - t0
        assert alone_text == want[0]
        t0 = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            results = list(pool.map(one, texts))
        wall_s = time.perf_counter() - t0
        m = metrics(url)
    got = [r[0] for r in results]
    mismatched = [i for i in range(n) if got[i] != want[i]]
    assert not mismatched, f"requests {mismatched} differ from their offline output, e.g. {got[mismatched[0]]!r}"
    total = sum(r[1] for r in results)
    assert total == n * max_tokens
    assert m["headwise_running_requests_peak"] >= n // 2, "requests must decode together in one batch"
    numbers = {"alone_tokens_per_s": alone_tokens / alone_s, "aggregate_tokens_per_s": total / wall_s,
               "peak_batch": m["headwise_running_requests_peak"]}
    print(f"\n{n} concurrent: {numbers}")
    assert numbers["aggregate_tokens_per_s"] > numbers["alone_tokens_per_s"]
    return numbers


def test_8_concurrent_streams_complete_unmixed_and_beat_one_alone(engine):
    run_concurrent(engine, 8, max_tokens=8)


@pytest.mark.slow
def test_32_concurrent_streams_complete_unmixed_and_beat_one_alone(engine):
    run_concurrent(engine, 32, max_tokens=12)


def test_new_request_joins_while_a_long_one_runs(engine):
    scheduler = Scheduler(engine, max_batch=4, kv_budget_bytes=1 << 30, max_queue=4)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        long_body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0,
                     "stream": True, "ignore_eos": True}
        seen = 0
        with httpx.stream("POST", url + "/v1/completions", json=long_body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        break
            short = httpx.post(url + "/v1/completions", timeout=TIMEOUT,
                               json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "temperature": 0})
            assert short.status_code == 200
            # The short request finished while the long one is still streaming: it did not wait for it.
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
        assert short.json()["usage"]["completion_tokens"] == 3
        assert len(rest) >= 10 and rest[-1]["choices"][0]["finish_reason"] == "length"


def test_admission_waits_for_kv_then_429_and_disconnect_frees_the_slot(smollm2):
    engine = Engine(smollm2)  # dense: the estimate is exactly the bytes the cache reserves
    ids = engine.encode("Tell me a story").shape[1]
    long_est = engine.kv_estimate(ids + 400 - 1)
    short_est = engine.kv_estimate(ids + 4 - 1)
    # Room for the long request or the short one, not both.
    scheduler = Scheduler(engine, max_batch=8, kv_budget_bytes=long_est + short_est - 1, max_queue=1)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        too_big = httpx.post(url + "/v1/completions", timeout=TIMEOUT,
                             json={"model": MODEL, "prompt": "Tell me a story", "max_tokens": 2000})
        assert too_big.status_code == 400 and too_big.json()["error"]["code"] == "kv_budget_exceeded"

        short_body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 4, "temperature": 0}
        long_body = short_body | {"max_tokens": 400, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=long_body, timeout=TIMEOUT) as r:
            lines = r.iter_lines()  # kept: dropping the iterator closes the stream (a disconnect)
            while not next(lines).startswith("data: {"):
                pass  # the long request is running once its first token arrives
            assert wait_for(lambda: metrics(url)["headwise_kv_bytes_in_use"] > 0)
            waiting: dict[str, httpx.Response] = {}
            t = threading.Thread(target=lambda: waiting.update(
                r=httpx.post(url + "/v1/completions", json=short_body, timeout=TIMEOUT)))
            t.start()
            assert wait_for(lambda: metrics(url)["headwise_queue_depth"] == 1), "the short request must wait"
            full = httpx.post(url + "/v1/completions", json=short_body, timeout=TIMEOUT)
            assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full"
            assert t.is_alive()
        # The streaming client is gone: its slot frees and the waiting request runs.
        t.join(TIMEOUT)
        assert waiting["r"].status_code == 200
        assert waiting["r"].json()["usage"]["completion_tokens"] == 4
        assert wait_for(lambda: metrics(url)["headwise_running_requests"] == 0)
        m = metrics(url)
        assert m["headwise_requests_cancelled_total"] == 1
        assert m["headwise_kv_bytes_in_use"] == 0
        assert m["headwise_generated_tokens_total"] < 200, "the cancelled request must stop generating"
        assert m['headwise_requests_total{status="429"}'] == 1


def test_disconnected_stream_frees_its_cache_at_once(engine):
    scheduler = Scheduler(engine, max_batch=4, kv_budget_bytes=1 << 30, max_queue=4)
    with serve_in_thread(create_app(scheduler, MODEL)) as url:
        body = {"model": MODEL, "prompt": "Write a long essay about rivers.", "max_tokens": 1000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: {")
                if chunks == 3:
                    # Read while the stream is open: leaving the loop drops the iterator, which closes it.
                    assert metrics(url)["headwise_running_requests"] == 1
                    break
        closed = time.perf_counter()
        assert wait_for(lambda: metrics(url)["headwise_running_requests"] == 0, timeout=10)
        freed_s = time.perf_counter() - closed
        m = metrics(url)
        assert m["headwise_kv_bytes_in_use"] == 0 and m["headwise_requests_cancelled_total"] == 1
        assert m["headwise_generated_tokens_total"] < 100
        assert freed_s < 5
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"


def test_kv_estimate_is_what_the_request_cache_really_reserves(engine):
    for total in (5, 40, 300):
        real = engine.new_cache(1, reserve=total).kv_bytes()
        assert engine.kv_estimate(total) == real
    # Streaming rings grow as tokens arrive (up to sink + window): a short request reserves exactly its plan's
    # slots (K and V, head_dim 64, float32), not whole rings.
    assert engine.kv_estimate(5) == engine.plan.kv_tokens(engine.spec, 5) * 2 * 64 * 4
