"""``headwise bench serve``: an offered-load benchmark of the serving engine, in-process and over HTTP.

``N`` requests of ``prompt_len`` random token ids (a fixed seed), each generating exactly ``output_len`` tokens
(EOS ignored, as vLLM's ``benchmark_serving --ignore-eos``), arrive as a Poisson process of ``rate`` requests per
second (``inf``: all at once). Two drivers, same requests:

- ``in-process``: ``Engine.add`` at each arrival time and ``Engine.step`` in a loop (the engine alone);
- ``http``: ``headwise serve``'s app on a loopback port, one streaming client thread per request
  (``/v1/completions`` with the token ids as the prompt): the engine + scheduler + HTTP + SSE.

Reported per driver: output tokens/s and requests/s over the wall time from the first arrival to the last token,
time to first token (mean, p50, p99, from the request's arrival), time per output token after the first
(mean, p50, p99), peak concurrency (sequences live at once) and, in-process, the peak KV bytes held (under
``--kv-memory``: pages held x page bytes), the preemptions, and the steps that only decoded: how many, how many
were replayed from a CUDA graph, and their wall time (mean, p50, p99 in ms; ``--cuda-graphs off`` for the eager
batched step). ``--kv-memory GB|N%`` gives each driver a page pool
of that size (``pool.KVMemory``), the same one ``headwise serve --kv-memory`` builds.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from headwise.engine import Engine, SamplingParams
from headwise.errors import InputError


@dataclass
class Load:
    requests: int = 16
    prompt_len: int = 128
    output_len: int = 32
    rate: float = math.inf  # requests per second; inf: all at once
    seed: int = 0

    def prompts(self, vocab: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        # Ids from the ordinary vocabulary (the first ids of most tokenizers are specials).
        return torch.randint(256, vocab, (self.requests, self.prompt_len), generator=gen).tolist()

    def arrivals(self) -> list[float]:
        """Seconds from the start at which each request arrives (exponential gaps; all 0 at rate inf)."""
        if math.isinf(self.rate):
            return [0.0] * self.requests
        gen = torch.Generator().manual_seed(self.seed + 1)
        gaps = torch.empty(self.requests).exponential_(self.rate, generator=gen)
        return torch.cumsum(gaps, 0).sub(gaps[0]).tolist()


def _vocab(engine: Engine) -> int:
    return engine.lm.model.get_input_embeddings().num_embeddings


def _quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": round(float(t.mean()), 4), "p50": round(float(t.quantile(0.5)), 4),
            "p99": round(float(t.quantile(0.99)), 4)}


def _summary(load: Load, wall: float, ttft: list[float], tpot: list[float], tokens: int, peak: int) -> dict[str, Any]:
    return {"requests": load.requests, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 3), "requests_per_s": round(load.requests / wall, 4),
            "ttft_s": _quantiles(ttft), "tpot_s": _quantiles(tpot), "peak_concurrency": peak}


def run_in_process(engine: Engine, load: Load) -> dict[str, Any]:
    """Drive ``engine`` directly: add each request at its arrival time, step until every one has finished."""
    prompts, arrivals = load.prompts(_vocab(engine)), load.arrivals()
    params = SamplingParams(max_new_tokens=load.output_len, stop_token_ids=[])
    seqs: list[Any] = [None] * load.requests
    t0 = time.perf_counter()
    nxt, peak, peak_kv, preempted = 0, 0, 0, 0
    decode_ms: list[float] = []  # steps that only decoded
    graph_steps = 0
    while nxt < load.requests or engine.live:
        now = time.perf_counter() - t0
        while nxt < load.requests and arrivals[nxt] <= now:
            seqs[nxt] = engine.add(prompts[nxt], params)
            seqs[nxt].arrived = t0 + arrivals[nxt]
            nxt += 1
        if not engine.live:
            time.sleep(max(0.0, arrivals[nxt] - now))
            continue
        peak = max(peak, len(engine.live))
        info = engine.step()
        if info.decode_rows and not info.prefill_tokens:
            decode_ms.append(1e3 * info.seconds)
            graph_steps += info.graph
        preempted += info.preempted
        peak_kv = max(peak_kv, sum(s.kv_bytes for s in engine.live) + sum(s.stats.kv_bytes for s in info.finished))
    end = max(s.finished_at for s in seqs)
    bad = [s.id for s in seqs if s.error is not None or len(s.generated) != load.output_len]
    if bad:
        raise InputError(f"requests {bad} did not generate {load.output_len} tokens")
    ttft = [s.first_token_at - s.arrived for s in seqs]
    tpot = [(s.finished_at - s.first_token_at) / (load.output_len - 1) for s in seqs if load.output_len > 1]
    out = _summary(load, end - t0, ttft, tpot, sum(len(s.generated) for s in seqs), peak)
    out |= {"peak_kv_bytes": peak_kv, "preemptions": preempted, "decode_only_steps": len(decode_ms),
            "decode_only_graph_steps": graph_steps, "decode_only_step_ms": _quantiles(decode_ms)}
    return out


def run_http(engine: Engine, load: Load, max_batch: int, kv_budget_bytes: int, model_name: str) -> dict[str, Any]:
    """The same load over HTTP: ``headwise serve``'s app on a loopback port, one streaming client per request."""
    import httpx

    from headwise.server.app import create_app
    from headwise.server.background import serve_in_thread
    from headwise.server.scheduler import Scheduler

    prompts, arrivals = load.prompts(_vocab(engine)), load.arrivals()
    scheduler = Scheduler(engine, max_batch=max_batch, kv_budget_bytes=kv_budget_bytes, max_queue=load.requests)
    results: list[dict[str, Any] | None] = [None] * load.requests
    with serve_in_thread(create_app(scheduler, model_name)) as url:
        t0 = time.perf_counter()

        def client(i: int) -> None:
            time.sleep(max(0.0, t0 + arrivals[i] - time.perf_counter()))
            sent = time.perf_counter()
            body = {"model": model_name, "prompt": prompts[i], "max_tokens": load.output_len, "temperature": 0,
                    "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
            first, used = None, 0
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=3600) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = time.perf_counter()
                    if chunk.get("usage"):
                        used = chunk["usage"]["completion_tokens"]
            done = time.perf_counter()
            results[i] = {"sent": sent, "first": first if first is not None else done, "done": done, "tokens": used}

        threads = [threading.Thread(target=client, args=(i,)) for i in range(load.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        peak = scheduler.metrics.peak_running
    rs = [r for r in results if r is not None]
    if len(rs) != load.requests or any(r["tokens"] != load.output_len for r in rs):
        raise InputError(f"over HTTP, {sum(r['tokens'] == load.output_len for r in rs)} of {load.requests} requests "
                         f"generated {load.output_len} tokens")
    ttft = [r["first"] - r["sent"] for r in rs]
    tpot = [(r["done"] - r["first"]) / (load.output_len - 1) for r in rs if load.output_len > 1]
    return _summary(load, max(r["done"] for r in rs) - t0, ttft, tpot, sum(r["tokens"] for r in rs), peak)


def run(args: Any) -> dict[str, Any] | None:
    """``headwise bench serve``: load the model and plan, run the drivers asked for, return the results (None on
    a tensor-parallel rank other than 0: rank 0 drove it)."""
    from headwise import tp
    from headwise.plan import HeadPlan

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"in-process", "http"})
    if unknown:
        raise InputError(f"unknown --mode {', '.join(unknown)}; choose from in-process, http")
    given = HeadPlan.load(args.plan) if args.plan != "dense" else None
    with tp.loaded(args, given) as lm:
        if lm is None:
            return None
        return _run(args, lm, modes, given or HeadPlan.dense(lm.spec, lm.name))


def _run(args: Any, lm: Any, modes: list[str], plan: Any) -> dict[str, Any]:
    from headwise.pool import KVMemory

    load = Load(args.requests, args.prompt_len, args.output_len, args.rate, args.seed)
    results: dict[str, Any] = {"model": args.model, "plan": plan.digest(), "load": {
        "requests": load.requests, "prompt_len": load.prompt_len, "output_len": load.output_len,
        "rate": "inf" if math.isinf(load.rate) else load.rate, "seed": load.seed},
        "chunk_size": args.chunk_size, "max_batch": args.max_batch, "cuda_graphs": args.cuda_graphs, "torch_threads": torch.get_num_threads(),
        "tp": args.tp, "placement": None if lm.tp is None else ("naive" if lm.tp.order is None else lm.tp.order)}
    kv_memory = KVMemory.parse(args.kv_memory) if args.kv_memory else None
    for mode in modes:
        # Each driver gets a fresh pool of the same size: the same memory, in-process and over HTTP.
        pool = kv_memory.pool(lm.spec, lm.device, lm.dtype.itemsize) if kv_memory is not None else None
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
        engine = Engine(lm, plan, chunk_size=args.chunk_size, pool=pool, cuda_graphs=graphs)
        if mode == "in-process":
            results[mode] = run_in_process(engine, load)
        else:
            budget = pool.num_pages * pool.page_bytes if pool is not None else 8 << 30
            results[mode] = run_http(engine, load, args.max_batch, budget, args.model)
        if pool is not None:
            results[mode] |= {"pool_pages": pool.num_pages, "page_bytes": pool.page_bytes}
        print(f"{mode}: {json.dumps(results[mode])}", flush=True)
    results["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # a shared machine is noisy: say how busy
    return results


def add_arguments(p: Any) -> None:
    g = p.add_argument_group("serve (headwise bench serve MODEL)")
    g.add_argument("--model", default="smollm2-135m", help="model to serve (default smollm2-135m)")
    g.add_argument("--plan", default="dense", help="plan JSON file, or 'dense' (default)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16, float16")
    g.add_argument("--requests", type=int, default=16)
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--output-len", type=int, default=32)
    g.add_argument("--rate", type=float, default=math.inf, help="arrivals per second (default inf: all at once)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mode", default="in-process,http", help="in-process,http (default both)")
    g.add_argument("--chunk-size", type=int, default=512)
    g.add_argument("--max-batch", type=int, default=32, help="HTTP: the scheduler's batch bound")
    g.add_argument("--kv-memory", default=None, metavar="GB|N%",
                   help="a KV page pool of this many GB (or share of free device memory, e.g. 90%%) for each driver; "
                        "default: no pool (in-process), an 8 GB byte budget (HTTP)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    g.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="decode steps from CUDA graphs: a lone request's, and under --kv-memory the batch's at padded "
                        "sizes (auto: where allowed; off: eager batched steps, to compare)")
