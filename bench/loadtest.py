"""Load test of ``headwise serve`` on loopback: latency percentiles (TTFT, end to end) and throughput.

    python bench/loadtest.py --spawn smollm2-135m [--plan PLAN] --requests 32 --concurrency 8 --max-tokens 32
    python bench/loadtest.py --url http://127.0.0.1:8000 --model smollm2-135m ...   # a server already running

Regime: streaming ``/v1/completions`` with ``ignore_eos`` (every request generates exactly ``--max-tokens``),
prompts cut from real text (Shakespeare) at ``--prompt-words`` words, at most ``--concurrency`` requests in
flight (a closed loop: a new request starts when one ends). First one request runs alone (the single-stream
baseline), then ``--requests`` requests under load. Reported: TTFT (request sent → first text chunk), end-to-end
latency, and time per output token after the first, each at p50/p90/p99; aggregate output tokens/s vs the
single request's; the server's peak batch from ``/metrics``.

Bounded: a fixed request count, a wall-clock limit (``--max-seconds``), and the target must be a loopback
address. With ``--spawn`` the server is started as a subprocess (``headwise serve``) on a free loopback port
and stopped at the end. Writes ``bench/results/serve_loadtest_<date>.json`` ({command, ..., results}); the last
stdout line is that JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any
from urllib.parse import urlparse

import httpx

from headwise.bench.record import result_doc, result_path, write_result
from headwise.bench.server_proc import spawn_server


def percentiles(xs: list[float]) -> dict[str, float]:
    """p50/p90/p99 (nearest rank on sorted data) and mean, in seconds rounded to ms."""
    if not xs:
        return {}
    s = sorted(xs)

    def p(q: float) -> float:
        return s[min(len(s), max(1, math.ceil(q / 100 * len(s)))) - 1]

    return {"p50": round(p(50), 4), "p90": round(p(90), 4), "p99": round(p(99), 4),
            "mean": round(sum(s) / len(s), 4), "n": len(s)}


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    sys.exit(f"loadtest: refusing {url}: only loopback targets (127.0.0.1, ::1, localhost) are allowed")


def make_prompts(n: int, words: int) -> list[str]:
    """``n`` distinct prompts of ``words`` words each, from consecutive passages of real text."""
    from headwise.data import shakespeare

    text = shakespeare(max(10_000, n * words * 8)).split()
    return [" ".join(text[i * words : (i + 1) * words]) for i in range(n)]


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    status = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        status = r.status_code
        if status != 200:
            await r.aread()
            return {"status": status, "error": r.text[:200], "e2e_s": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return {"status": 500, "error": chunk["error"]["message"], "e2e_s": time.perf_counter() - t0}
            if ttft is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    e2e = time.perf_counter() - t0
    tpot = (e2e - ttft) / (tokens - 1) if ttft is not None and tokens > 1 else None
    return {"status": status, "ttft_s": ttft, "e2e_s": e2e, "tokens": tokens, "tpot_s": tpot}


async def run_load(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                   max_seconds: float) -> tuple[list[dict[str, Any]], float]:
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds), limits=limits) as client:
        sem = asyncio.Semaphore(concurrency)

        async def guarded(p: str) -> dict[str, Any]:
            async with sem:
                return await one_request(client, url, model, p, max_tokens)

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(guarded(p) for p in prompts)), max_seconds)
        return results, time.perf_counter() - t0


def scrape(url: str) -> dict[str, float]:
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def spawn(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = ["--max-batch", str(args.max_batch), "--max-queue", str(max(args.requests, 1))]
    if args.plan:
        cmd += ["--plan", args.plan]
    if args.server_threads:
        cmd += ["--threads", str(args.server_threads)]
    return spawn_server(args.spawn, cmd, "loadtest")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    target = ap.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="base URL of a running server (loopback only)")
    target.add_argument("--spawn", metavar="MODEL", help="start `headwise serve MODEL` on a free loopback port")
    ap.add_argument("--model", help="model id to request (default: the server's only model)")
    ap.add_argument("--plan", help="plan file for --spawn (default dense)")
    ap.add_argument("--max-batch", type=int, default=32, help="--max-batch for --spawn")
    ap.add_argument("--server-threads", type=int, default=None, help="--threads for --spawn")
    ap.add_argument("--requests", type=int, default=32, help="requests under load (at most 1000)")
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--max-seconds", type=float, default=600, help="wall-clock limit of the loaded phase")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--tag", default="", help="suffix of the results file name (serve_loadtest_<date>_<tag>.json)")
    args = ap.parse_args()
    if not 1 <= args.requests <= 1000 or not 1 <= args.concurrency <= 256:
        sys.exit("loadtest: --requests must be in 1..1000 and --concurrency in 1..256")
    proc = None
    if args.spawn:
        proc, url = spawn(args)
    else:
        url = args.url.rstrip("/")
        check_loopback(url)
    try:
        model = args.model or httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        health = httpx.get(url + "/health", timeout=30).json()
        prompts = make_prompts(args.requests + 1, args.prompt_words)
        alone, alone_s = asyncio.run(run_load(url, model, prompts[:1], 1, args.max_tokens, args.max_seconds))
        before = scrape(url)
        results, wall_s = asyncio.run(run_load(url, model, prompts[1:], args.concurrency, args.max_tokens,
                                               args.max_seconds))
        after = scrape(url)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)
    ok = [r for r in results if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    summary = {
        "requests": len(results),
        "ok": len(ok),
        "errors": {str(s): sum(r["status"] == s for r in results) for s in {r["status"] for r in results} if s != 200},
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "prompt_words": args.prompt_words,
        "wall_s": round(wall_s, 3),
        "output_tokens": tokens,
        "aggregate_tokens_per_s": round(tokens / wall_s, 2),
        "requests_per_s": round(len(ok) / wall_s, 3),
        "single_request_tokens_per_s": round(alone[0]["tokens"] / alone_s, 2) if alone[0]["status"] == 200 else None,
        "single_request_ttft_s": round(alone[0]["ttft_s"], 4) if alone[0].get("ttft_s") else None,
        "ttft_s": percentiles([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "e2e_s": percentiles([r["e2e_s"] for r in ok]),
        "tpot_s": percentiles([r["tpot_s"] for r in ok if r["tpot_s"] is not None]),
        "server_peak_batch": after.get("headwise_running_requests_peak"),
        "server_decode_steps": after.get("headwise_decode_steps_total", 0) - before.get("headwise_decode_steps_total", 0),
        "server_kv_budget_bytes": after.get("headwise_kv_budget_bytes"),
    }
    if summary["single_request_tokens_per_s"]:
        summary["speedup_over_single"] = round(summary["aggregate_tokens_per_s"] / summary["single_request_tokens_per_s"], 2)
    doc = result_doc("python " + " ".join(sys.argv), summary) | {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]},
        "server": {"model": model, "plan": health.get("plan")},
    }
    path = write_result(doc, result_path(args.out, "serve_loadtest" + (f"_{args.tag}" if args.tag else "")))
    print(f"{summary['ok']}/{summary['requests']} ok, {summary['aggregate_tokens_per_s']} tok/s aggregate vs "
          f"{summary['single_request_tokens_per_s']} tok/s alone; TTFT p50/p90/p99 {summary['ttft_s']}; "
          f"e2e {summary['e2e_s']}; written to {path}", file=sys.stderr)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
