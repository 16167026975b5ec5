"""``headwise serve`` stops gracefully on SIGTERM and fails fast on a busy port (issue 18, items 4 and 6).

The SIGTERM test runs the real command in a subprocess on a free loopback port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")

from headwise.server.background import free_port

MODEL = "smollm2-135m"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def test_busy_port_fails_before_the_model_loads(capsys):
    from headwise.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        # A model that does not exist: had the model been loaded first, the error would be about it.
        assert main(["serve", "/no/such/model", "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("headwise: error: cannot listen on 127.0.0.1:") and "\n" not in err
    assert "model" not in err.split("(")[0]


def _events(url: str, body: dict, out: list, started: threading.Event) -> None:
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        out.append(r.status_code)
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line[6:])
                started.set()


def test_sigterm_drains_then_ends_open_streams_with_an_error_and_done():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "headwise.cli", "serve", MODEL, "--port", str(port),
                             "--threads", "1", "--shutdown-grace", "4", "--max-batch", "8"],
                            env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the server did not start"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        long_body = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 3000, "temperature": 0,
                     "ignore_eos": True}
        streams = [[], []]
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=_events, args=(url, long_body | {"stream": True}, s, e))
                   for s, e in zip(streams, started)]
        plain: dict[str, httpx.Response] = {}
        threads.append(threading.Thread(target=lambda: plain.update(
            r=httpx.post(url + "/v1/completions", json=long_body, timeout=120))))
        for t in threads:
            t.start()
        assert all(e.wait(120) for e in started)
        short: list = []
        short_started = threading.Event()
        short_thread = threading.Thread(target=_events, args=(
            url, {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0, "stream": True}, short,
            short_started))
        short_thread.start()
        assert short_started.wait(60)
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # Draining: the socket is still open, new work is refused with a hint to retry.
        refused = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 1},
                             timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert int(refused.headers["retry-after"]) >= 1
        health = httpx.get(url + "/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "draining"
        for t in [*threads, short_thread]:
            t.join(60)
        # The short request finished normally within the grace.
        assert short[0] == 200 and short[-1] == "[DONE]"
        assert json.loads(short[-2])["choices"][0]["finish_reason"] == "length"
        # The long streams were cut at the end of the grace with an error event, then [DONE].
        for s in streams:
            assert s[0] == 200 and s[-1] == "[DONE]", s[-3:]
            assert json.loads(s[-2])["error"]["code"] == "shutting_down"
        assert plain["r"].status_code == 503 and plain["r"].json()["error"]["code"] == "shutting_down"
        assert proc.wait(30) == 0
        assert 3.5 < time.monotonic() - t_term < 30
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stderr.close()
