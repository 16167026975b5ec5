"""Hostile load on ``headwise serve`` over loopback: good streams must complete unmixed while bad clients hit it.

    python bench/serve_hostile.py --spawn smollm2-135m --plan plans/smollm2-135m.json --streams 64 --seconds 300

Regime: ``--streams`` closed-loop workers each stream greedy ``/v1/completions`` (``ignore_eos``, exactly
``--max-tokens`` tokens) over a pool of distinct real-text prompts; every answer is compared with the offline
``Engine.generate`` output for its prompt (computed here before the server starts), so a token from another
request ("mixed") or a lost token shows as a mismatch. Alongside, one hostile request is sent for every nine
good ones that finish (10% of all requests): malformed JSON, NaN/Infinity/1e-300 temperature, NaN top_p,
lone surrogates, 5000-digit integers, JSON nested 50,000 deep, seed 2^64, an unknown model, a cross-origin
text/plain POST, a foreign Host header, a stream dropped after its first token, a non-streaming request
dropped while it waits, headers never finished. Once, halfway, a 20 MB body. Meanwhile ``/health`` is timed
every 0.5 s and the server's RSS is read every 5 s from /proc.

Bounded: ``--seconds`` of load (at most 900), loopback only, the spawned server is stopped with SIGTERM at the
end (its exit status is recorded). Writes ``bench/results/serve_hostile_<date>.json`` with the command,
commit, date and machine; the last stdout line is that JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any

import httpx
from loadtest import make_prompts, percentiles

from headwise.bench.record import result_doc, result_path, write_result
from headwise.bench.server_proc import spawn_server

HOSTILE = [
    ("bad_json", "/v1/completions", b'{"model": "M", "prompt": '),
    ("nan_temperature", "/v1/completions", b'{"model": "M", "prompt": "hi", "temperature": NaN}'),
    ("inf_temperature", "/v1/completions", b'{"model": "M", "prompt": "hi", "temperature": Infinity}'),
    ("tiny_temperature", "/v1/completions", b'{"model": "M", "prompt": "hi", "max_tokens": 2, "temperature": 1e-300}'),
    ("nan_top_p", "/v1/completions", b'{"model": "M", "prompt": "hi", "top_p": NaN}'),
    ("lone_surrogate", "/v1/chat/completions",
     b'{"model": "M", "messages": [{"role": "user", "content": "\\ud800"}]}'),
    ("huge_int", "/v1/completions", b'{"model": "M", "prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}"),
    ("deep_nesting", "/v1/completions", b'{"model": "M", "prompt": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
    ("seed_2_64", "/v1/completions", b'{"model": "M", "prompt": "hi", "seed": 18446744073709551616}'),
    ("unknown_model", "/v1/completions", b'{"model": "gpt-4o", "prompt": "hi"}'),
    ("cross_origin", "/v1/completions", b'{"model": "M", "prompt": "hi", "max_tokens": 1}'),
    ("foreign_host", "/v1/completions", b'{"model": "M", "prompt": "hi", "max_tokens": 1}'),
    ("stream_disconnect", "/v1/completions", b""),
    ("plain_disconnect", "/v1/completions", b""),
    ("half_sent_head", "", b""),
]


def offline_references(args: argparse.Namespace, prompts: list[str]) -> list[str]:
    """Greedy ``Engine.generate`` text of each prompt, EOS ignored as the server's ``ignore_eos`` does."""
    import torch

    from headwise.engine import Engine, SamplingParams
    from headwise.models import load_model
    from headwise.plan import HeadPlan

    torch.set_num_threads(1)
    engine = Engine(load_model(args.spawn, device="cpu"), HeadPlan.load(args.plan) if args.plan else None)
    params = SamplingParams(max_new_tokens=args.max_tokens, stop_token_ids=())
    return ["".join(e.text for e in engine.generate(p, params)) for p in prompts]


def spawn(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = ["--max-batch", str(args.streams), "--max-queue", str(2 * args.streams), "--threads", "1",
           "--shutdown-grace", "10"]
    if args.plan:
        cmd += ["--plan", args.plan]
    return spawn_server(args.spawn, cmd, "serve_hostile", capture_stderr=True)


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Run:
    """Shared state of one load run."""

    def __init__(self, url: str, model: str, prompts: list[str], want: list[str], max_tokens: int, pid: int):
        self.url, self.model, self.prompts, self.want, self.max_tokens, self.pid = url, model, prompts, want, \
            max_tokens, pid
        self.good: list[dict[str, Any]] = []
        self.hostile: list[dict[str, Any]] = []
        self.health_s: list[float] = []
        self.health_bad = 0
        self.rss: list[tuple[float, int]] = []
        self.big: dict[str, Any] = {}
        self.t0 = time.monotonic()
        self.stop_at = 0.0

    def running(self) -> bool:
        return time.monotonic() < self.stop_at


async def good_worker(run: Run, client: httpx.AsyncClient, k: int) -> None:
    i = k
    while run.running():
        idx = i % len(run.prompts)
        i += 7  # workers walk the pool with different strides, so every prompt runs beside different others
        body = {"model": run.model, "prompt": run.prompts[idx], "max_tokens": run.max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        t0 = time.monotonic()
        text, tokens, status, error = "", 0, 0, None
        try:
            async with client.stream("POST", run.url + "/v1/completions", json=body) as r:
                status = r.status_code
                if status != 200:
                    error = (await r.aread())[:200].decode(errors="replace")
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            error = chunk["error"]["message"]
                        elif chunk.get("choices"):
                            text += chunk["choices"][0]["text"]
                        elif chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"
        run.good.append({"prompt": idx, "status": status, "ok": status == 200 and error is None,
                         "unmixed": text == run.want[idx], "tokens": tokens, "error": error,
                         "e2e_s": time.monotonic() - t0})
        if status == 429:
            await asyncio.sleep(1)


async def hostile_request(run: Run, client: httpx.AsyncClient, kind: str, path: str, raw: bytes) -> dict[str, Any]:
    raw = raw.replace(b'"M"', json.dumps(run.model).encode())
    headers = {"content-type": "application/json"}
    t0 = time.monotonic()
    out: dict[str, Any] = {"kind": kind}
    try:
        if kind == "half_sent_head":
            host, port = run.url.removeprefix("http://").split(":")
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(100), 60)
            out["closed_by_server_after_s"] = round(time.monotonic() - t0, 2)
            out["status"] = "closed" if got == b"" else got[:20].decode(errors="replace")
            writer.close()
            return out
        if kind == "stream_disconnect":
            body = {"model": run.model, "prompt": run.prompts[0], "max_tokens": 500, "stream": True,
                    "ignore_eos": True}
            async with client.stream("POST", run.url + path, json=body) as r:
                out["status"] = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break  # drop the stream after its first token
            return out
        if kind == "plain_disconnect":
            body = {"model": run.model, "prompt": run.prompts[0], "max_tokens": 500, "ignore_eos": True}
            try:
                await client.post(run.url + path, json=body, timeout=2.0)
            except httpx.TimeoutException:
                out["status"] = "client gave up"
            return out
        if kind == "cross_origin":
            headers = {"content-type": "text/plain", "origin": "http://evil.example"}
        if kind == "foreign_host":
            headers["host"] = "evil.example"
        r = await client.post(run.url + path, content=raw, headers=headers)
        out["status"] = r.status_code
        if kind == "tiny_temperature" and r.status_code == 200:
            out["completion_tokens"] = r.json()["usage"]["completion_tokens"]
    except (httpx.HTTPError, OSError, TimeoutError) as exc:
        out["status"] = f"{type(exc).__name__}"
    out["s"] = round(time.monotonic() - t0, 3)
    return out


async def hostile_driver(run: Run, client: httpx.AsyncClient) -> None:
    """One hostile request per nine good ones finished: 10% of all requests."""
    n = 0
    pending: set[asyncio.Task] = set()
    while run.running():
        if len(run.good) >= 9 * (n + 1):
            kind, path, raw = HOSTILE[n % len(HOSTILE)]
            task = asyncio.create_task(hostile_request(run, client, kind, path, raw))
            pending.add(task)
            task.add_done_callback(lambda t: (pending.discard(t), run.hostile.append(t.result())))
            n += 1
        else:
            await asyncio.sleep(0.2)
        if n and not run.big and time.monotonic() - run.t0 > (run.stop_at - run.t0) / 2:
            run.big["sent_at_s"] = round(time.monotonic() - run.t0, 1)
            task = asyncio.create_task(big_body(run, client))
            pending.add(task)
            task.add_done_callback(pending.discard)
    await asyncio.gather(*pending, return_exceptions=True)


async def big_body(run: Run, client: httpx.AsyncClient) -> None:
    raw = json.dumps({"model": run.model, "prompt": "lorem ipsum " * 1_750_000, "max_tokens": 4}).encode()
    t0 = time.monotonic()
    try:
        r = await client.post(run.url + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        run.big.update(status=r.status_code, code=r.json()["error"]["code"])
    except httpx.HTTPError as exc:
        run.big["status"] = type(exc).__name__
    run.big.update(bytes=len(raw), answered_after_s=round(time.monotonic() - t0, 3))


async def health_probe(run: Run) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        while run.running():
            t0 = time.perf_counter()
            try:
                ok = (await client.get(run.url + "/health")).status_code == 200
            except httpx.HTTPError:
                ok = False
            run.health_s.append(time.perf_counter() - t0)
            run.health_bad += not ok
            await asyncio.sleep(0.5)


async def rss_probe(run: Run) -> None:
    while run.running():
        run.rss.append((round(time.monotonic() - run.t0, 1), rss_bytes(run.pid)))
        await asyncio.sleep(5)


async def load(run: Run, streams: int, seconds: float) -> None:
    run.t0 = time.monotonic()
    run.stop_at = run.t0 + seconds
    limits = httpx.Limits(max_connections=streams + 32, max_keepalive_connections=streams + 32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 120), limits=limits) as client:
        await asyncio.gather(*(good_worker(run, client, k) for k in range(streams)), hostile_driver(run, client),
                             health_probe(run), rss_probe(run))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spawn", metavar="MODEL", required=True, help="start `headwise serve MODEL` on loopback")
    ap.add_argument("--plan", help="plan file (default dense)")
    ap.add_argument("--streams", type=int, default=64, help="concurrent good streams")
    ap.add_argument("--seconds", type=float, default=300, help="duration of the load (at most 900)")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts in the pool")
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--note", default="", help="free text stored in the JSON (e.g. what else the machine ran)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if not 0 < args.seconds <= 900 or not 1 <= args.streams <= 256:
        sys.exit("serve_hostile: --seconds must be in (0, 900] and --streams in 1..256")
    prompts = make_prompts(args.prompts, args.prompt_words)
    t_ref = time.monotonic()
    want = offline_references(args, prompts)
    ref_s = time.monotonic() - t_ref
    if len(set(want)) < len(want):
        sys.exit("serve_hostile: prompts must give distinct outputs for the mix-up check to mean anything")
    proc, url = spawn(args)
    exit_status = None
    try:
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        health = httpx.get(url + "/health", timeout=30).json()
        run = Run(url, model, prompts, want, args.max_tokens, proc.pid)
        asyncio.run(load(run, args.streams, args.seconds))
        after_health = httpx.get(url + "/health", timeout=30).json()
        metrics = httpx.get(url + "/metrics", timeout=30).text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            exit_status = proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        stderr = proc.stderr.read()
    good = run.good
    ok = [g for g in good if g["ok"]]
    warm = [b for t, b in run.rss if t >= 30] or [b for _, b in run.rss]
    hostile_by_kind: dict[str, dict[str, int]] = {}
    for h in run.hostile:
        d = hostile_by_kind.setdefault(h["kind"], {})
        d[str(h.get("status"))] = d.get(str(h.get("status")), 0) + 1
    statuses = [str(h.get("status")) for h in run.hostile]
    summary = {
        "good_requests": len(good),
        "good_completed": len(ok),
        "good_unmixed": sum(g["ok"] and g["unmixed"] for g in good),
        "good_mismatched": [g["prompt"] for g in ok if not g["unmixed"]][:20],
        "good_failed": [{"status": g["status"], "error": g["error"]} for g in good if not g["ok"]][:20],
        "good_tokens": sum(g["tokens"] for g in ok),
        "good_e2e_s": percentiles([g["e2e_s"] for g in ok]),
        "hostile_requests": len(run.hostile),
        "hostile_share": round(len(run.hostile) / max(1, len(run.hostile) + len(good)), 3),
        "hostile_by_kind": hostile_by_kind,
        "hostile_5xx": sum(s.isdigit() and int(s) >= 500 for s in statuses),
        "big_body": run.big,
        "health_s": percentiles(run.health_s) | {"max": round(max(run.health_s), 4)},
        "health_not_200": run.health_bad,
        "rss_mib": {"first_after_30s": round(warm[0] / 2**20, 1), "last": round(warm[-1] / 2**20, 1),
                    "max": round(max(warm) / 2**20, 1), "min": round(min(warm) / 2**20, 1),
                    "series": [(t, round(b / 2**20, 1)) for t, b in run.rss]},
        "server_after": after_health,
        "server_exit_status_after_sigterm": exit_status,
        "server_stderr_tracebacks": stderr.count("Traceback"),
        "server_metrics": {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines()
                           if line.startswith(("headwise_requests_total", "headwise_requests_cancelled_total",
                                               "headwise_running_requests_peak", "headwise_generated_tokens_total"))},
        "offline_reference_s": round(ref_s, 1),
    }
    doc = result_doc("python " + " ".join(sys.argv), summary) | {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m_at_end": os.getloadavg()[0],
                    "note": args.note},
        "server": {"model": model, "plan": health.get("plan"), "streams": args.streams,
                   "max_tokens": args.max_tokens, "seconds": args.seconds},
    }
    path = write_result(doc, result_path(args.out, "serve_hostile"))
    print(f"{summary['good_unmixed']}/{summary['good_requests']} good requests complete and unmixed; "
          f"{summary['hostile_requests']} hostile ({summary['hostile_5xx']} 5xx); /health p99 "
          f"{summary['health_s'].get('p99')} s; RSS {summary['rss_mib']['first_after_30s']} -> "
          f"{summary['rss_mib']['last']} MiB; written to {path}", file=sys.stderr)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
