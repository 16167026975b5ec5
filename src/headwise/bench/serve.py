"""``headwise bench serve``: an offered-load benchmark of the serving engine, in-process and over HTTP.

``N`` requests of ``prompt_len`` random token ids (a fixed seed), or a ``mix`` of groups of several prompt lengths
(``--mix 64x32768,16x131072``: the groups arrive in that order), each generating exactly ``output_len`` tokens
(EOS ignored, as vLLM's ``benchmark_serving --ignore-eos``), arrive as a Poisson process of ``rate`` requests per
second (``inf``: all at once). Two drivers, same requests:

- ``in-process``: ``Engine.add`` at each arrival time and ``Engine.step`` in a loop (the engine alone);
- ``http``: ``headwise serve``'s app on a loopback port, one streaming client thread per request
  (``/v1/completions`` with the token ids as the prompt): the engine + scheduler + HTTP + SSE. It needs the
  model's tokenizer (the first token is seen as text), so models without one (``random:...``) skip it.

Reported per driver: output tokens/s and requests/s over the wall time from the first arrival to the last token,
time to first token (mean, p50, p99, from the request's arrival), time per output token after the first
(mean, p50, p99), peak concurrency (in-process: the sequences that ran in one step, holding a cache, not those
offered and waiting for pages; HTTP: the scheduler's running peak) and, in-process, the peak KV bytes held (under
``--kv-memory``: pages held x page bytes), the preemptions, and the steps that only decoded: how many, how many
were replayed from a CUDA graph, and their wall time per forward (mean, p50, p99 in ms; a ``--multi-step`` step's time
over its forwards; ``--cuda-graphs off`` for the eager batched step); on CUDA with a pool, the rate at which those steps read their bytes (the weights but the input
embedding table, plus the KV pages held: what a decode step reads, at most) against the copy bandwidth measured in the
same run; with a mix, per prompt length too (``by_prompt_len``: tokens/s over the time to the group's last
token). In-process, the steps that read prompt tokens are timed as well (their wall time and the decode rows each
carried), and ``--profile-steps N,...`` runs those steps under torch.profiler: their kernels land in the results
(``profiled_steps``), to see where a mix's prompt steps spend their time. ``--kv-memory GB|N%`` gives each driver a
page pool of that size (``pool.KVMemory``), the same one ``headwise serve --kv-memory`` builds.

``--max-seconds S`` stops the drivers S seconds after the command started (model building included): the
in-process results then cover what was measured (requests finished, tokens generated so far, TTFT of those that
got a first token, peaks) and say ``"partial": true``, so a run on a time-limited machine always leaves its JSON.
``--progress-s`` prints a progress line that often. ``--plan`` also takes the presets of ``PLAN_PRESETS``
(``duo25``, ``duo25-vs``, ``duo25-vst``), built for the model's shape with ``HeadPlan.split``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from headwise.engine import DENSE_PREFILL, Engine, SamplingParams, freeze_heap
from headwise.errors import InputError

# Streaming heads as DuoAttention's (sink 64 + window 256): in chunked prefill their pattern is DuoAttention's
# A-shape, token-exact (``policies/streaming.py``). The full heads keep every token; in ``duo25-vs`` their prefill
# is MInference's vertical-slash (``policies/vertical_slash.py``, default budgets), decoding ``full``; ``duo25-vst``
# attends the vertical columns one key at a time (``columns="tokens"``) instead of their whole blocks.
_STREAMING = {"policy": "streaming", "params": {"sink": 64, "window": 256}}
PLAN_PRESETS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "duo25": ("25% full (dense prefill) + 75% streaming (sink 64 + window 256, A-shape prefill)",
              {"policy": "full"}, _STREAMING),
    "duo25-vs": ("25% full (vertical-slash prefill) + 75% streaming (sink 64 + window 256, A-shape prefill)",
                 {"policy": "vertical_slash"}, _STREAMING),
    "duo25-vst": ("25% full (vertical-slash prefill, token columns as MInference's) + 75% streaming (sink 64 + "
                  "window 256, A-shape prefill)", {"policy": "vertical_slash", "params": {"columns": "tokens"}},
                  _STREAMING),
}


def preset_plan(name: str, spec: Any) -> Any:
    """The ``PLAN_PRESETS`` plan ``name`` for ``spec``: in every layer, a quarter of the KV heads the first policy."""
    from headwise.plan import HeadPlan

    what, first, rest = PLAN_PRESETS[name]
    return HeadPlan.split(spec, 0.25, first, rest, name, created_by=f"headwise bench serve --plan {name}: {what}")


def named_plan(name: str, spec: Any, model: str = "") -> Any:
    """``dense`` or a ``PLAN_PRESETS`` plan for ``spec`` (the breakdown scripts' ``--plans``)."""
    from headwise.plan import HeadPlan

    if name == "dense":
        return HeadPlan.dense(spec, model)
    if name in PLAN_PRESETS:
        return preset_plan(name, spec)
    raise InputError(f"a plan name is dense or a preset ({', '.join(PLAN_PRESETS)}), got {name!r}")


def parse_mix(text: str) -> tuple[tuple[int, int], ...]:
    """``"64x32768,16x131072"`` -> ``((64, 32768), (16, 131072))``: (requests, prompt tokens) per group."""
    groups = []
    for item in text.split(","):
        count, _, length = item.strip().lower().partition("x")
        if not (count.isdigit() and length.isdigit() and int(count) > 0 and int(length) > 0):
            raise InputError(f"--mix takes COUNTxPROMPT_LEN[,COUNTxPROMPT_LEN...], e.g. 64x32768,16x131072; "
                             f"got {item.strip()!r}")
        groups.append((int(count), int(length)))
    return tuple(groups)


@dataclass
class Load:
    requests: int = 16
    prompt_len: int = 128
    output_len: int = 32
    rate: float = math.inf  # requests per second; inf: all at once
    seed: int = 0
    mix: tuple[tuple[int, int], ...] = ()
    """(requests, prompt tokens) per group, arriving in this order; empty: ``requests`` x ``prompt_len``. Given,
    it sets ``requests`` to the total."""

    def __post_init__(self) -> None:
        if self.mix:
            self.requests = sum(n for n, _ in self.mix)

    def groups(self) -> tuple[tuple[int, int], ...]:
        return self.mix or ((self.requests, self.prompt_len),)

    def prompt_lens(self) -> list[int]:
        return [length for n, length in self.groups() for _ in range(n)]

    def prompts(self, vocab: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed)
        # Ids from the ordinary vocabulary (the first ids of most tokenizers are specials).
        return [p for n, length in self.groups() for p in torch.randint(256, vocab, (n, length), generator=gen).tolist()]

    def arrivals(self) -> list[float]:
        """Seconds from the start at which each request arrives (exponential gaps; all 0 at rate inf)."""
        if math.isinf(self.rate):
            return [0.0] * self.requests
        gen = torch.Generator().manual_seed(self.seed + 1)
        gaps = torch.empty(self.requests).exponential_(self.rate, generator=gen)
        return torch.cumsum(gaps, 0).sub(gaps[0]).tolist()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"requests": self.requests, "output_len": self.output_len,
                               "rate": "inf" if math.isinf(self.rate) else self.rate, "seed": self.seed}
        if self.mix:
            return {"mix": [{"requests": n, "prompt_len": length} for n, length in self.mix]} | out
        return {"prompt_len": self.prompt_len} | out


def _vocab(engine: Engine) -> int:
    return engine.lm.model.get_input_embeddings().num_embeddings


def _quantiles(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"mean": 0.0, "p50": 0.0, "p99": 0.0}
    t = torch.tensor(xs, dtype=torch.float64)
    return {"mean": round(float(t.mean()), 4), "p50": round(float(t.quantile(0.5)), 4),
            "p99": round(float(t.quantile(0.99)), 4)}


def _summary(requests: int, finished: int, wall: float, ttft: list[float], tpot: list[float],
             tokens: int) -> dict[str, Any]:
    """The figures both drivers report: output tokens and tokens/s, finished requests/s over ``wall``, TTFT, TPOT."""
    return {"requests": requests, "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tokens_per_s": round(tokens / wall, 3) if wall > 0 else 0.0,
            "requests_per_s": round(finished / wall, 4) if wall > 0 else 0.0,
            "ttft_s": _quantiles(ttft), "tpot_s": _quantiles(tpot)}


def _figures(seqs: list[Any], load: Load, t0: float, stop: float, partial: bool) -> dict[str, Any]:
    """Requests, finished, output tokens and tokens/s, TTFT and TPOT of ``seqs`` (unfinished ones included: their
    tokens so far, their TTFT if they got a first token). Tokens/s over the time from ``t0`` to their last token
    (to ``stop`` in a partial run)."""
    done = [s for s in seqs if s.finished and s.error is None and s.finish_reason != "abort"]  # abort: --max-seconds
    ttft = [s.first_token_at - s.arrived for s in seqs if s.first_token_at is not None]
    tpot = [(s.finished_at - s.first_token_at) / (load.output_len - 1) for s in done if load.output_len > 1]
    tokens = sum(len(s.generated) for s in seqs)
    wall = (stop if partial or not done else max(s.finished_at for s in done)) - t0
    return _summary(len(seqs), len(done), wall, ttft, tpot, tokens) | {"finished": len(done), "first_tokens": len(ttft)}


def weight_bytes_read(model: torch.nn.Module) -> int:
    """Bytes of the weights one forward reads: every parameter, but the input embedding table (a step reads only its
    tokens' rows) unless the output layer shares it."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if emb is not None and (out is None or out.weight is not emb.weight):
        total -= emb.weight.numel() * emb.weight.element_size()
    return total


SLOWEST = 8
"""Prompt steps and decode-only steps ``run_in_process`` keeps the composition of (the slowest of each): what they
carried and what was compiled, loaded and allocated during them."""


def _keep_slowest(kept: list[dict[str, Any]], step: dict[str, Any]) -> list[dict[str, Any]]:
    """``kept`` with ``step`` added, the ``SLOWEST`` slowest by ``"ms"``, slowest first."""
    return sorted([*kept, step], key=lambda x: -x["ms"])[:SLOWEST]


class _GcClock:
    """Seconds Python's garbage collector spends while installed (a ``with`` block), through ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._t0

    def __enter__(self) -> _GcClock:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


class _StepCounters:
    """What a step's one-off costs grow, read before and after it (``delta``): graphs torch.compile made (dynamo's
    ``unique_graphs``; a recompile shows there), Triton kernels of headwise's modules loaded (each kernel's
    specializations in its per-device cache: compiled, or read from Triton's disk cache; a launch with new integer
    properties, e.g. a length now divisible by 16, makes one), and on CUDA the allocator's cudaMalloc calls and retries
    (a retry frees every cached block and synchronizes: a pool that leaves the activations too little room shows
    there). Counters that cannot be read (no dynamo loaded, no Triton, another Triton's internals) stay 0. ``delta``
    also names the specializations loaded (``triton_loaded``: the kernel and its cache key, which holds the integer
    arguments' properties), so a slow step says which launch made a new one."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._modules = -1
        self._kernels: list[Any] = []
        self._keys = self._kernel_keys()
        self.last = self.read(self._keys)

    def _jit_functions(self) -> list[Any]:
        """headwise's Triton kernels (JITFunctions, also behind an autotuner or heuristics), found again only when a
        module was imported since the last look."""
        if len(sys.modules) == self._modules:
            return self._kernels
        self._modules = len(sys.modules)
        try:
            from triton.runtime.jit import JITFunction
        except Exception:  # no Triton (or none that imports): no kernels to count
            return self._kernels
        found: dict[int, Any] = {}
        for name, module in list(sys.modules.items()):
            if not name.startswith("headwise.") or module is None:
                continue
            for obj in list(vars(module).values()):
                for _ in range(3):  # Autotuner(Heuristics(JITFunction)): each wrapper keeps the next in ``fn``
                    if isinstance(obj, JITFunction) or obj is None:
                        break
                    obj = getattr(obj, "fn", None)
                if isinstance(obj, JITFunction):
                    found[id(obj)] = obj
        self._kernels = list(found.values())
        return self._kernels

    def read(self, keys: set[str]) -> dict[str, int]:
        """The counters now, ``keys`` being ``_kernel_keys()`` just taken."""
        utils = sys.modules.get("torch._dynamo.utils")
        out = {"compiled_graphs": int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0,
               "triton_kernels": len(keys), "alloc_retries": 0, "cuda_mallocs": 0}
        if self.cuda:
            stats = torch.cuda.memory_stats()
            out["alloc_retries"] = int(stats.get("num_alloc_retries", 0))
            out["cuda_mallocs"] = int(stats.get("num_device_alloc", 0))
        return out

    def _kernel_keys(self) -> set[str]:
        """Every specialization in headwise's kernels' per-device caches, as ``module.name device key``."""
        keys: set[str] = set()
        for fn in self._jit_functions():
            with contextlib.suppress(Exception):  # another Triton's cache layout: not counted
                name = f"{fn.fn.__module__}.{fn.fn.__name__}"
                for device, caches in fn.device_caches.items():
                    keys.update(f"{name} {device} {key}" for key in caches[0])
        return keys

    def delta(self) -> dict[str, Any]:
        """What grew since the last ``delta`` (or since made): the counters, and ``triton_loaded``, the new
        specializations (``_kernel_keys``' strings: the key holds each argument's specialization), sorted."""
        keys = self._kernel_keys()
        now = self.read(keys)
        grown: dict[str, Any] = {k: now[k] - self.last[k] for k in now}
        grown["triton_loaded"] = sorted(keys - self._keys)
        self.last, self._keys = now, keys
        return grown


def run_in_process(engine: Engine, load: Load, deadline: float | None = None, progress_s: float = 0.0,
                   log: Callable[[str], None] = print, weights: int | None = None,
                   profile_steps: Collection[int] = (), profile_top: int = 30) -> dict[str, Any]:
    """Drive ``engine`` directly: add each request at its arrival time, step until every one has finished, or until
    ``time.perf_counter()`` passes ``deadline``: then the live sequences are aborted and the results, marked
    ``partial``, cover what was measured. Every ``progress_s`` seconds (0: never) a progress line goes to ``log``.
    ``weights`` (bytes a forward reads, ``weight_bytes_read``) with a pool: each decode-only step's read rate, its
    weights plus the KV pages held, in GB/s (``decode_only_read_gb_per_s``).

    Steps that read prompt tokens are timed too (``prompt_step_ms``, with the decode rows they carried,
    ``prompt_step_decode_rows``, and their summed seconds, ``prompt_steps_s``): where a mix's time goes. The steps
    numbered in ``profile_steps`` (1 = the first) run under torch.profiler (``bench.timing.profile_call``, its
    ``profile_top`` kernels); each lands in ``profiled_steps`` with what it carried. A profiled step is slower than
    the others (the profiler's own cost), so its time is left out of the quantiles and totals above. The ``SLOWEST``
    slowest prompt steps are kept in ``slowest_prompt_steps``: their step number, milliseconds, decode rows, the
    prompt positions their chunks started at, the live sequences, preemptions, what ``_StepCounters`` saw grow
    during them (graphs torch.compile made, Triton kernels loaded, cudaMalloc calls and allocator retries; the whole
    run's in ``during_run``) and the milliseconds Python's garbage collector took in them (``gc_ms``; the whole run's
    in ``gc_s``). The ``SLOWEST`` slowest decode-only steps are kept likewise (``slowest_decode_only_steps``: ms a
    forward, forwards, rows, the padded size, whether the step replayed a graph, the live sequences and what the
    counters saw grow): a step that captured a graph (the first at a padded size after the batch's buffers grew)
    shows there with ``graph`` false."""
    prompts, arrivals, lens = load.prompts(_vocab(engine)), load.arrivals(), load.prompt_lens()
    params = SamplingParams(max_new_tokens=load.output_len, stop_token_ids=[])
    pool = engine.pool
    seqs: list[Any] = []
    t0 = time.perf_counter()
    peak, peak_kv, preempted, prefilled, steps, graph_steps = 0, 0, 0, 0, 0, 0
    decode_ms: list[float] = []  # steps that only decoded
    prompt_ms: list[float] = []  # steps that read prompt tokens
    prompt_rows: list[float] = []  # the decode rows those carried
    slowest: list[dict[str, Any]] = []  # the SLOWEST slowest prompt steps, with what they carried
    slowest_decode: list[dict[str, Any]] = []  # the SLOWEST slowest decode-only steps (ms a forward)
    counters = _StepCounters(engine.lm.device)
    before = counters.last  # the run's totals: the last reading less this one
    profiled: list[dict[str, Any]] = []
    wanted = set(profile_steps)
    read_rate: list[float] = []  # their bytes read per second, GB/s (with ``weights`` and a pool)
    partial = False
    next_log = t0 + progress_s

    def progress(clock: float) -> str:
        tokens = sum(len(s.generated) for s in seqs)
        return (f"[{clock - t0:8.1f} s] {sum(s.finished for s in seqs)}/{load.requests} finished, "
                f"{len(engine.live)} live, {steps} steps, {prefilled} prompt tokens read, {tokens} output tokens "
                f"({tokens / max(clock - t0, 1e-9):.1f}/s), peak concurrency {peak}, peak KV {peak_kv / 1e9:.2f} GB, "
                f"{preempted} preemptions")

    with _GcClock() as gc_clock:
        while len(seqs) < load.requests or engine.live:
            clock = time.perf_counter()
            if deadline is not None and clock >= deadline:
                partial = True
                break
            if progress_s > 0 and clock >= next_log:
                log(progress(clock))
                next_log = clock + progress_s
            while len(seqs) < load.requests and arrivals[len(seqs)] <= clock - t0:
                seq = engine.add(prompts[len(seqs)], params)
                seq.arrived = t0 + arrivals[len(seqs)]
                seqs.append(seq)
            if not engine.live:
                wake = t0 + arrivals[len(seqs)]
                time.sleep(max(0.0, min(wake, deadline if deadline is not None else wake) - clock))
                continue
            steps += 1
            profiling = steps in wanted
            gc_before = gc_clock.seconds
            if profiling:
                from headwise.bench.timing import profile_call

                ran: list[Any] = []
                prof = profile_call(lambda ran=ran: ran.append(engine.step()), engine.lm.device, profile_top)
                info = ran[0]
                profiled.append({"step": steps, "seconds": round(info.seconds, 4), "prefill_tokens": info.prefill_tokens,
                                 "decode_rows": info.decode_rows, "live": len(engine.live), **prof})
            else:
                info = engine.step()
            # what this step compiled, loaded and allocated (a profiled step's too: counted here, not in the next's)
            grown = counters.delta()
            if not profiling and info.prefill_tokens:
                prompt_ms.append(1e3 * info.seconds)
                prompt_rows.append(info.decode_rows)
                slowest = _keep_slowest(slowest, {
                    "step": steps, "ms": round(1e3 * info.seconds, 1), "decode_rows": info.decode_rows,
                    "chunk_starts": info.chunk_starts, "live": len(engine.live), "preempted": info.preempted, **grown,
                    "gc_ms": round(1e3 * (gc_clock.seconds - gc_before), 1)})
            prefilled += info.prefill_tokens
            # Ran in this step: the live sequences holding a cache, and those that finished in it.
            peak = max(peak, sum(s.cache is not None for s in engine.live) + len(info.finished))
            preempted += info.preempted
            # What the live sequences hold, plus what those that finished in the step held. Under a pool, the pages
            # taken (only sequences hold pages): O(1) rather than a walk over every sequence's page lists each step.
            held = ((pool.num_pages - pool.free_pages) * pool.page_bytes if pool is not None
                    else sum(s.kv_bytes for s in engine.live))
            held += sum(s.stats.kv_bytes for s in info.finished)
            peak_kv = max(peak_kv, held)
            if info.decode_rows and not info.prefill_tokens and not profiling:
                per_forward = info.seconds / max(1, info.decode_steps)  # a multi-step ran several forwards
                decode_ms.append(1e3 * per_forward)
                graph_steps += info.graph
                slowest_decode = _keep_slowest(slowest_decode, {
                    "step": steps, "ms": round(1e3 * per_forward, 2), "forwards": info.decode_steps,
                    "rows": info.decode_rows, "padded": info.padded, "graph": info.graph, "live": len(engine.live),
                    **grown})
                if weights is not None and pool is not None and per_forward > 0:
                    read_rate.append((weights + held) / per_forward / 1e9)
    stop = time.perf_counter()
    if partial:
        line = progress(stop)
        for s in list(engine.live):
            engine.abort(s)
        log(line + "; stopped at --max-seconds")
    else:
        bad = [s.id for s in seqs if s.error is not None or len(s.generated) != load.output_len]
        if bad:
            raise InputError(f"requests {bad} did not generate {load.output_len} tokens")
    out = {"requests": load.requests} | _figures(seqs, load, t0, stop, partial)
    out |= {"partial": partial, "added": len(seqs), "peak_concurrency": peak, "steps": steps,
            "prompt_tokens_read": prefilled, "peak_kv_bytes": peak_kv, "preemptions": preempted,
            "decode_only_steps": len(decode_ms), "decode_only_graph_steps": graph_steps,
            "decode_only_step_ms": _quantiles(decode_ms), "prompt_steps": len(prompt_ms),
            "prompt_steps_s": round(sum(prompt_ms) / 1e3, 3), "prompt_step_ms": _quantiles(prompt_ms),
            "prompt_step_decode_rows": _quantiles(prompt_rows), "slowest_prompt_steps": slowest,
            "slowest_decode_only_steps": slowest_decode,
            "gc_s": round(gc_clock.seconds, 3), "during_run": {k: counters.last[k] - before[k] for k in before}}
    if profiled:
        out["profiled_steps"] = profiled
    if read_rate:
        out["decode_only_read_gb_per_s"] = _quantiles(read_rate)
    if len(load.groups()) > 1:
        out["by_prompt_len"] = {str(length): _figures([s for s, n in zip(seqs, lens, strict=False) if n == length],
                                                      load, t0, stop, partial)
                                for length in dict.fromkeys(n for _, n in load.groups())}
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
    return _summary(load.requests, load.requests, max(r["done"] for r in rs) - t0, ttft, tpot,
                    sum(r["tokens"] for r in rs)) | {"peak_concurrency": peak}


def run(args: Any) -> dict[str, Any] | None:
    """``headwise bench serve``: load the model and plan, run the drivers asked for, return the results (None on
    a tensor-parallel rank other than 0: rank 0 drove it)."""
    from headwise import tp
    from headwise.plan import HeadPlan

    started = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    unknown = sorted(set(modes) - {"in-process", "http"})
    if unknown:
        raise InputError(f"unknown --mode {', '.join(unknown)}; choose from in-process, http")
    if args.multi_step < 1:
        raise InputError(f"--multi-step must be at least 1, got {args.multi_step}")
    if args.plan not in ("dense", *PLAN_PRESETS) and not Path(args.plan).is_file():
        raise InputError(f"--plan {args.plan}: no such file; give dense, a preset ({', '.join(PLAN_PRESETS)}) or a "
                         "plan JSON")
    given = HeadPlan.load(args.plan) if args.plan not in ("dense", *PLAN_PRESETS) else None
    with tp.loaded(args, given) as lm:
        if lm is None:
            return None
        if args.plan in PLAN_PRESETS:
            given = preset_plan(args.plan, lm.spec)
        deadline = started + args.max_seconds if args.max_seconds is not None else None
        return _run(args, lm, modes, given or HeadPlan.dense(lm.spec, lm.name), deadline)


def _warm_up(engine: Engine, load: Load) -> float:
    """Two requests through ``engine`` before the measurement (kernels compiled, CUDA graphs of batches 1 and 2
    captured, the allocator grown): prompts of two chunks and a bit, as long as the load's shortest, added together,
    so that steps with one sequence, with two sequences' chunks, and with a chunk beside a decoding row all run once
    (with ``compile_layers`` each of these shapes compiles its graphs here, not in the measured run's first mixed
    step: 3.7 s of run 18's). Returns its seconds."""
    t0 = time.perf_counter()
    n = min(2 * engine.chunk_size + 1, min(length for _, length in load.groups()))
    gen = torch.Generator().manual_seed(load.seed + 2)
    params = SamplingParams(max_new_tokens=min(load.output_len, 4), stop_token_ids=[])
    seqs = [engine.add(torch.randint(256, _vocab(engine), (n,), generator=gen).tolist(), params) for _ in range(2)]
    while any(not s.finished for s in seqs):
        engine.step()
    return time.perf_counter() - t0


def _run(args: Any, lm: Any, modes: list[str], plan: Any, deadline: float | None = None) -> dict[str, Any]:
    from headwise.pool import KVMemory

    mix = parse_mix(args.mix) if args.mix else ()
    load = Load(args.requests, args.prompt_len, args.output_len, args.rate, args.seed, mix)
    if "http" in modes and lm.tokenizer is None:
        print(f"skipping --mode http: {args.model} has no tokenizer (the HTTP driver sees the first token as text); "
              "the in-process driver runs alone", flush=True)
        modes = [m for m in modes if m != "http"]
    results: dict[str, Any] = {"model": args.model, "plan": plan.digest(), "plan_name": args.plan,
                               "plan_summary": plan.summary(lm.spec, max(n for _, n in load.groups())),
                               "load": load.describe(), "chunk_size": args.chunk_size, "max_batch": args.max_batch,
                               "cuda_graphs": args.cuda_graphs, "multi_step": args.multi_step,
                               "dense_prefill": args.dense_prefill, "compile_layers": args.compile_layers,
                               "torch_threads": torch.get_num_threads(),
                               "tp": args.tp,
                               "placement": None if lm.tp is None else ("naive" if lm.tp.order is None else lm.tp.order),
                               "max_seconds": args.max_seconds}
    kv_memory = KVMemory.parse(args.kv_memory) if args.kv_memory else None
    weights = None
    if lm.device.type == "cuda":  # the bandwidth a decode step's reads are held against, measured here
        from headwise.bench.timing import copy_bandwidth

        results["copy_gb_per_s"] = round(copy_bandwidth(lm.device) / 1e9, 1)
        weights = weight_bytes_read(lm.model)
        results["weight_bytes_read"] = weights
    for mode in modes:
        # Each driver gets a fresh pool of the same size: the same memory, in-process and over HTTP.
        pool = kv_memory.pool(lm.spec, lm.device, lm.dtype.itemsize) if kv_memory is not None else None
        graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
        engine = Engine(lm, plan, chunk_size=args.chunk_size, pool=pool, cuda_graphs=graphs,
                        multi_step=args.multi_step, dense_prefill=args.dense_prefill,
                        compile_layers=args.compile_layers)
        warm = _warm_up(engine, load) if args.warmup else None
        frozen = freeze_heap()  # what lives now is not walked by a collection during a step (run 20's 465 ms)
        if mode == "in-process":
            results[mode] = run_in_process(engine, load, deadline, args.progress_s,
                                           lambda line: print(line, flush=True), weights, args.profile_steps)
            rate = results[mode].get("decode_only_read_gb_per_s")
            if rate is not None:
                results[mode]["decode_only_read_of_copy_p50"] = round(rate["p50"] / results["copy_gb_per_s"], 3)
        else:
            budget = pool.num_pages * pool.page_bytes if pool is not None else 8 << 30
            results[mode] = run_http(engine, load, args.max_batch, budget, args.model)
        if warm is not None:
            results[mode]["warmup_s"] = round(warm, 3)
        if pool is not None:
            results[mode] |= {"pool_pages": pool.num_pages, "page_bytes": pool.page_bytes}
        results[mode]["gc_frozen_objects"] = frozen
        print(f"{mode}: {json.dumps(results[mode])}", flush=True)
        del engine, pool
        gc.unfreeze()  # the next mode's engine replaces this one's objects
        if lm.device.type == "cuda":
            torch.cuda.empty_cache()
    results["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]  # a shared machine is noisy: say how busy
    return results


def _step_numbers(text: str) -> tuple[int, ...]:
    """``--profile-steps``: step numbers, each at least 1."""
    try:
        steps = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"step numbers separated by commas, e.g. 40,120; got {text!r}") from None
    if any(n < 1 for n in steps):
        raise argparse.ArgumentTypeError(f"steps are numbered from 1, got {text!r}")
    return steps


def add_arguments(p: Any) -> None:
    g = p.add_argument_group("serve (headwise bench serve MODEL)")
    g.add_argument("--model", default="smollm2-135m",
                   help="model to serve (default smollm2-135m); random:llama-3-8b[,layers=N] builds one from a config "
                        "with random weights (random_model.py)")
    g.add_argument("--plan", default="dense",
                   help=f"plan JSON file, 'dense' (default) or a preset: {', '.join(PLAN_PRESETS)} "
                        "(25%% of each layer's KV heads full, the rest streaming)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16, float16")
    g.add_argument("--requests", type=int, default=16)
    g.add_argument("--prompt-len", type=int, default=128)
    g.add_argument("--mix", default=None, metavar="NxLEN[,NxLEN...]",
                   help="groups of requests of several prompt lengths, arriving in this order (e.g. "
                        "64x32768,16x131072); replaces --requests and --prompt-len")
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
    g.add_argument("--multi-step", type=int, default=1, metavar="N",
                   help="under --kv-memory, greedy decode-only steps run up to N forwards in a row (Engine(multi_step)); "
                        "decode-only step times and read rates are then per forward (default 1)")
    g.add_argument("--dense-prefill", choices=DENSE_PREFILL, default="paged",
                   help="under --kv-memory with the kernels on, how the prompt chunks of full (and page_topk) heads "
                        "attend their pages: paged, the Triton kernel reading them in place (default); gather, a "
                        "contiguous copy then SDPA (flash on a GPU): the dense baseline on the field's prefill kernel")
    g.add_argument("--compile-layers", action="store_true",
                   help="compile the model's decoder layers with torch.compile (Engine(compile_layers)): their "
                        "elementwise work fused, headwise's attention left out; the first steps at new shapes compile "
                        "(use --warmup)")
    g.add_argument("--max-seconds", type=float, default=None,
                   help="stop the in-process driver this many seconds after the command started and record what was "
                        "measured, marked partial (default: run to the end)")
    g.add_argument("--progress-s", type=float, default=0.0,
                   help="print an in-process progress line every this many seconds (default 0: none)")
    g.add_argument("--profile-steps", type=_step_numbers, default=(), metavar="N[,N...]",
                   help="in-process: run these steps (1 = the first) under torch.profiler and record their kernels and "
                        "what they carried in the results (profiled_steps); they are left out of the step timings, "
                        "but the profiler's cost is in the run's wall time: take tokens/s from a run without it")
    g.add_argument("--warmup", action="store_true",
                   help="run two short requests through each driver's engine before measuring (kernels and graphs "
                        "compiled)")
