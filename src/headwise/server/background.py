"""Run the app in a background thread of this process, on a free loopback port (tests, benchmarks, notebooks).

    with serve_in_thread(app) as base_url:      # e.g. "http://127.0.0.1:40123"
        OpenAI(base_url=base_url + "/v1", api_key="none").completions.create(...)
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from headwise.errors import HeadwiseError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host`` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", port: int | None = None,
                    start_timeout_s: float = 60.0, server_out: list[Any] | None = None) -> Iterator[str]:
    """Serve ``app`` (from ``create_app``) in a daemon thread, as ``headwise serve`` would; yields the base URL;
    shuts down (draining, then the lifespan) on exit. ``server_out`` receives the ``DrainingServer``, for tests
    that start its shutdown themselves."""
    from headwise.server.http import bind, make_server

    ctx = app.state.ctx
    sock = bind(host, port or 0)
    port = sock.getsockname()[1]
    server = make_server(app, ctx.scheduler, sock, host, port, grace_s=ctx.config.shutdown_grace_s,
                         head_timeout_s=ctx.config.request_timeout_s)
    if server_out is not None:
        server_out.append(server)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="headwise-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise HeadwiseError(f"the server did not start on {host}:{port} within {start_timeout_s:.0f} s")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        ctx.scheduler.stop()  # what still runs ends now with an error event, so uvicorn need not wait for it
        server.should_exit = True
        thread.join(30)
        sock.close()
