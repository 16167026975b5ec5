"""A ``headwise serve`` process on a free loopback port, for benchmarks that load a server from outside."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence


def spawn_server(model: str, args: Sequence[str] = (), who: str = "bench", timeout_s: float = 300.0,
                 capture_stderr: bool = False) -> tuple[subprocess.Popen, str]:
    """Start ``headwise serve MODEL --host 127.0.0.1 --port P ARGS`` in its own process group and wait until
    ``/health`` answers 200. Returns the process and its base URL; exits (naming ``who``) if the server dies
    or is not healthy within ``timeout_s``."""
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "headwise.cli", "serve", model, "--host", "127.0.0.1", "--port", str(port), *args]
    proc = subprocess.Popen(cmd, start_new_session=True, stderr=subprocess.PIPE if capture_stderr else None,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            detail = f": {proc.stderr.read()}" if capture_stderr and proc.stderr else ""
            sys.exit(f"{who}: the server exited with status {proc.returncode}{detail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    sys.exit(f"{who}: the server did not become healthy within {timeout_s:.0f} s")
