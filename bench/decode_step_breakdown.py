"""Where a decode-only step of the serving engine spends its time, against the bytes it must read (issue 13).

``headwise bench serve`` (bench/offered_load.sh) measured decode-only steps over 3-5 sequences of 128K on 8 layers of
Llama-3-8B shapes reading their weights and KV at 0.47-0.63 of the copy bandwidth measured in the same run; the
issue asks 0.80. Alone, our dense paged decode kernel reads 16 x 128K of KV faster than the copy bandwidth
(bench/results/batch_decode_flashinfer_h200_128k_2026-12-03.json), so which part of the step falls short is the
question. This script builds the same engine (``random:MODEL``, a KV page pool as ``--kv-memory`` builds it,
padded decode steps replayed from CUDA graphs), prefills ``B`` sequences of ``--context`` random tokens and then,
for each plan and batch size:

- ``step_ms``: CUDA-event time (wall time on CPU) of ``--steps`` decode-only ``Engine.step`` calls (median, after
  ``--warmup`` untimed ones: capture, compile), per forward (``--multi-step N`` runs up to N forwards per step:
  ``forwards_per_step``), whether they replayed a graph, and the padded size;
- ``read_gb_per_s`` and ``read_over_copy``: the weights a forward reads (``weight_bytes_read``) plus the KV pages the
  sequences hold, over the median step, as ``headwise bench serve`` counts them, against ``copy_gb_per_s``
  (``copy_bandwidth``, read and write counted, measured in the same run);
- ``graph_profile``: one more step (a graph replay) under torch.profiler (``profile_call``): ``gpu_busy_ms`` and the
  kernels' time by family (attention, matrix multiplications, the rest); ``kernels_per_forward_ms`` and
  ``gap_per_forward_ms``, the step's time per forward beyond its kernels (launch gaps inside the graph, and the host
  where it stands between forwards: ``--multi-step`` takes it out); ``eager_profile``: the same padded step
  run eagerly on the same buffers (``Engine.forward_padded``: it writes the same token's KV again), whose kernels
  the profiler sees one by one, with their host time;
- ``attention_gb_per_s`` / ``gemm_gb_per_s``: the KV held over the attention kernels' time and the weights over the
  matrix multiplications' time (from the eager profile), so each family's rate can be set beside the copy bandwidth.

    PYTHONPATH=src python3 bench/decode_step_breakdown.py OUT.json --model random:llama-3-8b,layers=8 \\
        --context 131072 --batch 4 --kv-gb 30 --plans dense,duo25
    PYTHONPATH=src python3 bench/decode_step_breakdown.py /tmp/x.json --model random:tiny-llama --device cpu \\
        --context 40 --chunk 16 --batch 1,3 --kv-gb 0.01 --steps 2   (CPU smoke test of the script;
        tests/test_bench_decode_step.py)

Its last stdout line is the JSON document.
"""

from __future__ import annotations

import argparse
import gc
import json
import shlex
import statistics
import sys
import time
from typing import Any

import torch

from headwise.bench.record import result_doc, write_result
from headwise.bench.serve import named_plan, weight_bytes_read
from headwise.bench.timing import copy_bandwidth, profile_call, timed_call
from headwise.engine import Engine, SamplingParams
from headwise.errors import InputError
from headwise.models import LoadedModel, load_model
from headwise.plan import HeadPlan
from headwise.pool import KVMemory

GPU_COMMAND = ("PYTHONPATH=src python3 bench/decode_step_breakdown.py $OUT/decode_step_breakdown_h200.json "
               "--model random:llama-3-8b,layers=8 --context 131072 --batch 4 --kv-gb 30 --plans dense,duo25")


def make_plan(name: str, lm: LoadedModel) -> HeadPlan:
    return named_plan(name, lm.spec, lm.name)


def _timed_step(engine: Engine, device: torch.device, batch: int) -> tuple[float, Any]:
    """One decode-only ``Engine.step``: its milliseconds per forward (``timed_call``, over the forwards of a
    multi-step) and its info."""
    ms, _, info = timed_call(engine.step, device)
    if info.prefill_tokens or info.decode_rows != batch:
        raise InputError(f"a timed step carried {info.prefill_tokens} prompt tokens and {info.decode_rows} decode "
                         f"rows, not 0 and {batch}")
    return ms / max(1, info.decode_steps), info


def _rate(nbytes: int, ms: float) -> float | None:
    return round(nbytes / (ms / 1e3) / 1e9, 3) if ms > 0 else None


def case(lm: LoadedModel, plan_name: str, batch: int, args: argparse.Namespace, weights: int,
         copy_gb_per_s: float | None) -> dict[str, Any]:
    """Prefill ``batch`` sequences, then time and profile decode-only steps (module docstring)."""
    device = lm.device
    pool = KVMemory.parse(str(args.kv_gb)).pool(lm.spec, device, lm.dtype.itemsize)
    engine = Engine(lm, make_plan(plan_name, lm), chunk_size=args.chunk, pool=pool, padded_decode=True,
                    multi_step=args.multi_step)
    vocab = lm.model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed)
    # The first sequences decode while the later ones prefill: room for those steps too.
    prefill_steps = batch * (-(-args.context // args.chunk) + 1)
    params = SamplingParams(max_new_tokens=prefill_steps + (args.warmup + args.steps + 4) * args.multi_step,
                            stop_token_ids=[])
    seqs = [engine.add(torch.randint(256, vocab, (args.context,), generator=gen).tolist(), params)
            for _ in range(batch)]
    t0 = time.perf_counter()
    while any(not s.generated for s in seqs) and engine.live:
        engine.step()
    prefill_s = time.perf_counter() - t0
    if any(s.error is not None or s.finished for s in seqs):
        raise InputError(f"a sequence stopped while prefilling: {[str(s.error) for s in seqs if s.error]} (is "
                         f"--kv-gb {args.kv_gb} enough for {batch} x {args.context} tokens?)")
    for _ in range(args.warmup):
        _timed_step(engine, device, batch)
    times, graph_steps, padded, forwards = [], 0, 0, []
    for _ in range(args.steps):
        ms, info = _timed_step(engine, device, batch)
        times.append(round(ms, 4))
        graph_steps += info.graph
        padded = info.padded
        forwards.append(info.decode_steps)
    held = (pool.num_pages - pool.free_pages) * pool.page_bytes
    step_ms = statistics.median(times)
    graphs = engine.batch_graphs(engine.live)
    graph_profile = profile_call(lambda: _timed_step(engine, device, batch), device, args.top)
    eager_profile = None
    if graphs is not None and graphs.batch is not None:
        size = padded

        def eager() -> None:
            with torch.inference_mode():
                engine.forward_padded(graphs.batch, size)

        eager()  # the eager path's own first call (kernels already compiled by the capture's warm-up)
        eager_profile = profile_call(eager, device, args.top)
    for s in list(engine.live):
        engine.abort(s)
    groups = (eager_profile or graph_profile)["kernel_groups_ms"]
    out = {"plan": plan_name, "batch": batch, "context": args.context, "prefill_s": round(prefill_s, 2),
           "step_ms": times, "step_ms_median": round(step_ms, 4), "graph_steps": graph_steps, "padded_size": padded,
           "multi_step": args.multi_step, "forwards_per_step": forwards,
           # the replay's kernels per forward (the profiled step ran as many forwards as the timed ones) and what the
           # step takes beyond them: launch gaps inside the graph, and the host where it stands between forwards
           "kernels_per_forward_ms": round(graph_profile["gpu_busy_ms"] / max(1, forwards[-1]), 4),
           "gap_per_forward_ms": round(step_ms - graph_profile["gpu_busy_ms"] / max(1, forwards[-1]), 4),
           "weights_bytes": weights, "kv_bytes_held": held, "read_gb_per_s": _rate(weights + held, step_ms),
           "read_over_copy": (round((weights + held) / (step_ms / 1e3) / 1e9 / copy_gb_per_s, 3)
                              if copy_gb_per_s else None),
           "attention_gb_per_s": _rate(held, groups.get("attention", 0.0)),
           "gemm_gb_per_s": _rate(weights, groups.get("gemm", 0.0)),
           "graph_profile": graph_profile, "eager_profile": eager_profile}
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--model", default="random:llama-3-8b,layers=8")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--context", type=int, default=131072, help="prompt tokens of each sequence")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk")
    p.add_argument("--batch", default="4", help="comma-separated batch sizes")
    p.add_argument("--kv-gb", type=float, default=30.0, help="the page pool (GB), as --kv-memory")
    p.add_argument("--plans", default="dense,duo25")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--multi-step", type=int, default=1,
                   help="Engine(multi_step): forwards per decode-only step; step_ms is then per forward, and the "
                        "graph profile covers one step's forwards (forwards_per_step)")
    args = p.parse_args(argv)
    if args.context < 1 or args.steps < 1:
        raise InputError("--context and --steps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    lm = load_model(args.model, args.device, args.dtype)
    plans = [s.strip() for s in args.plans.split(",") if s.strip()]
    batches = [int(x) for x in args.batch.split(",") if x.strip()]
    torch.manual_seed(args.seed)
    copy_gb = round(copy_bandwidth(lm.device) / 1e9, 1) if lm.device.type == "cuda" else None
    weights = weight_bytes_read(lm.model)
    cases = []
    for name in plans:
        for b in batches:
            row = case(lm, name, b, args, weights, copy_gb)
            gc.collect()  # the case's engine and its graphs refer to each other: free its pool before the next
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()
            print(f"{name:8s} batch {b:3d}: step {row['step_ms_median']:8.3f} ms (kernels {row['kernels_per_forward_ms']} "
                  f"+ gap {row['gap_per_forward_ms']} ms per forward), read {row['read_gb_per_s']} GB/s "
                  f"({row['read_over_copy']} of copy), attention {row['attention_gb_per_s']} GB/s, gemm "
                  f"{row['gemm_gb_per_s']} GB/s, kernels {(row['eager_profile'] or row['graph_profile'])['kernel_groups_ms']}",
                  flush=True)
            cases.append(row)
    results = {"model": args.model, "device": str(lm.device), "dtype": str(lm.dtype), "context": args.context,
               "kv_gb": args.kv_gb, "layers": lm.spec.num_layers, "copy_gb_per_s": copy_gb, "cases": cases}
    command = "python3 bench/decode_step_breakdown.py " + " ".join(shlex.quote(a) for a in argv)
    doc = result_doc(command, results, lm.device)
    write_result(doc, args.out)
    print(f"GPU command (one H200, a few minutes): {GPU_COMMAND}", flush=True)
    print(json.dumps(doc), flush=True)
    return doc


if __name__ == "__main__":
    main()
