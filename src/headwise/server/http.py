"""uvicorn as ``headwise serve`` runs it: a socket bound before the model loads, a deadline on request
headers, and a shutdown that drains.

On SIGTERM or SIGINT the listening socket stays open while the scheduler drains: new requests get 503 with
``Retry-After`` (so a load balancer moves them elsewhere), running ones get ``shutdown_grace_s`` to finish,
and whatever still runs then is ended with an error event and ``[DONE]`` (a non-streaming request gets a
503). Only then does uvicorn stop. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import FrameType
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from headwise.errors import InputError
from headwise.server.scheduler import Scheduler


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or an ``InputError`` that says the port is taken (checked before
    the model loads, so a busy port fails in a second rather than after the load)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror} (is another server running there? "
                         "choose another --port)") from None
    sock.set_inheritable(True)
    return sock


def head_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline on each request's headers: a client that sends part of a request
    head and then nothing is disconnected after ``timeout_s`` instead of holding a connection forever. (The
    body's deadline is the app's ``Guard``; idle keep-alive connections are closed by uvicorn.)"""

    class HeadTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                if self._head_timer is None:  # part of a head: it has timeout_s to complete
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._head_timer = self.loop.call_later(timeout_s, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeadTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """``uvicorn.Server`` whose exit signal drains the scheduler first (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, scheduler: Scheduler, grace_s: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.grace_s = grace_s
        self._drainer: threading.Thread | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drainer is not None:  # a second signal: stop now
            self.force_exit = True
            self.should_exit = True
            return
        self.begin_shutdown()

    def begin_shutdown(self) -> None:
        """Drain in a thread (the signal handler must return), then let uvicorn stop."""
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain, name="headwise-drain", daemon=True)
            self._drainer.start()

    def _drain(self) -> None:
        self.scheduler.drain(self.grace_s)
        self.should_exit = True


def make_server(app: Any, scheduler: Scheduler, sock: socket.socket | None = None, host: str = "127.0.0.1",
                port: int = 0, grace_s: float = 30.0, head_timeout_s: float = 30.0) -> DrainingServer:
    """The server for ``app``; run it with ``server.run(sockets=[sock])`` (or host/port when no socket)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on",
                            http=head_timeout_protocol(head_timeout_s),
                            # The drain has already ended every stream by the time uvicorn stops; this only
                            # bounds how long it waits for their last bytes to flush.
                            timeout_graceful_shutdown=5)
    server = DrainingServer(config, scheduler, grace_s)
    # uvicorn polls should_exit every 0.1 s, so setting it from the scheduler thread is safe.
    scheduler.on_death = lambda exc: setattr(server, "should_exit", True)
    return server
