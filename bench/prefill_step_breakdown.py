"""Where one prompt-chunk step of the serving engine spends its time, against the floor of its pieces (issue 13).

``headwise bench serve`` (bench/offered_load.sh) measured ~88 ms per 2048-token chunk step for the dense plan and
~52 ms for ``duo25`` on 8 layers of Llama-3-8B shapes over a 128K prompt, against floors of ~55 ms and ~24 ms (the
layers' matmuls plus flash attention). This script builds the same engine (``random:MODEL``, a KV page pool as
``headwise bench serve --kv-memory`` builds it, the same chunk size), prefills one sequence to ``--prefix`` tokens
through ``Engine.step`` and then, for each plan and each number of decode rows beside the chunk:

- ``step_ms``: CUDA-event time (wall time on CPU) of ``--reps`` further ``Engine.step`` calls, each carrying one
  chunk (at prefix ``prefix``, ``prefix + chunk``, ...) and ``decode_rows`` one-token rows of short sequences
  decoding alongside (0: the plain batch-1 forward; more: the packed forward of a serving step);
- ``profile``: one more such step under ``torch.profiler``: the kernels by self device time (top ``--top``), the
  operators by device time (CPU time on CPU), the CUDA runtime calls that block the host (``cudaStreamSynchronize``,
  ``cudaMemcpyAsync``: one per host-to-device copy of a host tensor), and ``gpu_busy_ms`` (the kernels' summed time,
  each kernel once):
  ``step_ms - gpu_busy_ms`` is time the GPU waited for the host.

``floor`` times the pieces alone on the same shapes, per layer and for all layers: the layer's linear layers on the
chunk (its weights, ``F.linear``); ``causal_attention`` (the engine's SDPA path: flash on a GPU) of the chunk over
``prefix + chunk`` keys for all query heads and for the plan's full heads; the streaming heads' chunk as
``Streaming.attend`` computed it with kernels off (SDPA with a boolean sink + window mask over the sinks, the ring and
the chunk), as it computes it with kernels on (``kernels/sink_window.py``, on a GPU: ``streaming_kernel_ms``) and
``causal_attention`` on the same shapes (what a flash kernel would pay for all of them).

    PYTHONPATH=src python3 bench/prefill_step_breakdown.py OUT.json --model random:llama-3-8b,layers=8 \\
        --prefix 65536 --chunk 2048 --kv-gb 15 --plans dense,duo25 --decode-rows 0,8
    PYTHONPATH=src python3 bench/prefill_step_breakdown.py /tmp/x.json --model random:tiny-llama --device cpu \\
        --prefix 64 --chunk 32 --kv-gb 0.01 --reps 1      (CPU smoke test of the script; tests/test_bench_prefill_step.py)

Its last stdout line is the JSON document. A case that could not run as asked is refused before its prefill: a
sequence longer than the model's context (the message names the longest ``--prefix`` that fits), or decode rows the
pool cannot hold beside the chunk's sequence (it names how many fit), where the engine would otherwise hold rows
back and the first timed step be refused after minutes of prefill.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from headwise.bench.record import result_doc, write_result
from headwise.bench.serve import named_plan
from headwise.bench.timing import Timer, profile_call, timed_call
from headwise.engine import Engine, SamplingParams
from headwise.errors import InputError
from headwise.models import LoadedModel, load_model
from headwise.plan import HeadPlan
from headwise.policies.base import causal_attention, masked_attention
from headwise.policies.streaming import Streaming
from headwise.pool import KVMemory, PagePool, SequencePages

GPU_COMMAND = ("PYTHONPATH=src python3 bench/prefill_step_breakdown.py $OUT/prefill_step_breakdown_h200.json "
               "--model random:llama-3-8b,layers=8 --prefix 65536 --chunk 2048 --kv-gb 15 --plans dense,duo25 "
               "--decode-rows 0,8")


def _time_ms(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn``: CUDA events on a GPU (no L2 flush: these pieces stream far more than L2),
    wall time between synchronisations on CPU."""
    if device.type == "cuda":
        return Timer(flush=None).eager(fn, warmup=2, reps=reps)
    fn()
    return Timer.wall(fn, reps)


def make_plan(name: str, lm: LoadedModel) -> HeadPlan:
    return named_plan(name, lm.spec, lm.name)


def _random_ids(n: int, vocab: int, gen: torch.Generator) -> list[int]:
    return torch.randint(256, vocab, (n,), generator=gen).tolist()


def _long_len(args: argparse.Namespace) -> int:
    """The chunk's sequence: ``--prefix``, the ``--reps`` timed chunks, the profiled one and one more."""
    return args.prefix + args.chunk * (args.reps + 2)


def _row_new_tokens(args: argparse.Namespace, decode_rows: int) -> int:
    """New tokens each decode row may take: one a step through the prefix and the timed and profiled steps, and room."""
    return args.prefix // args.chunk + args.reps + 4 + decode_rows + 16


def check_fits(pool: PagePool, plan: HeadPlan, args: argparse.Namespace, decode_rows: int) -> None:
    """Refuse, before any prefill, a case whose timed steps could not carry one chunk and every decode row: the
    sequences' pages at their longest (the decode rows' prompts and tokens, the chunk's sequence through its profiled
    step) must fit the pool, or the engine would hold rows back (or preempt them) and the step would be refused only
    after the prefill. Says how many rows would fit."""
    pages = SequencePages(pool, plan)
    long = pages.pages_at(_long_len(args) - args.chunk)  # what it holds through its profiled step
    row = pages.pages_at(args.decode_len + _row_new_tokens(args, decode_rows))
    if long + decode_rows * row <= pool.num_pages:
        return
    fit = max(0, (pool.num_pages - long) // row) if long <= pool.num_pages else 0
    raise InputError(f"--kv-gb {args.kv_gb} holds {pool.num_pages} pages under plan {plan.digest()}: the chunk's sequence "
                     f"needs {long} at its profiled step and each of {decode_rows} decode rows of --decode-len "
                     f"{args.decode_len} needs {row}; at most {fit} rows fit (fewer --decode-rows, a shorter "
                     "--decode-len or a larger --kv-gb)")


def step_case(lm: LoadedModel, plan_name: str, args: argparse.Namespace, decode_rows: int) -> dict[str, Any]:
    """Prefill one sequence to ``args.prefix`` beside ``decode_rows`` short decoding sequences, then time and
    profile chunk steps (module docstring)."""
    device, chunk = lm.device, args.chunk
    pool = KVMemory.parse(str(args.kv_gb)).pool(lm.spec, device, lm.dtype.itemsize)
    plan = make_plan(plan_name, lm)
    check_context(lm, plan, args)
    check_fits(pool, plan, args, decode_rows)
    engine = Engine(lm, plan, chunk_size=chunk, pool=pool, compile_layers=args.compile_layers)
    vocab = lm.model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(args.seed)
    decoders = [engine.add(_random_ids(args.decode_len, vocab, gen),
                           SamplingParams(max_new_tokens=_row_new_tokens(args, decode_rows), stop_token_ids=[]))
                for _ in range(decode_rows)]
    t0 = time.perf_counter()
    while any(s.prefilled < len(s.prompt_ids) for s in decoders):
        engine.step()
    long = engine.add(_random_ids(_long_len(args), vocab, gen),
                      SamplingParams(max_new_tokens=1, stop_token_ids=[]))
    while long.prefilled < args.prefix:
        engine.step()
    prefill_s = time.perf_counter() - t0
    if long.prefilled != args.prefix or long.error is not None:
        raise InputError(f"the sequence stopped at {long.prefilled} prompt tokens, not {args.prefix} ({long.error})")

    def step() -> None:
        info = engine.step()
        if info.prefill_tokens != chunk or info.decode_rows != decode_rows:
            raise InputError(f"a timed step carried {info.prefill_tokens} prompt tokens and {info.decode_rows} "
                             f"decode rows, not {chunk} and {decode_rows}")

    step_ms, wall_ms, prefixes = [], [], []
    for _ in range(args.reps):
        prefixes.append(long.prefilled)
        ms, wall, _ = timed_call(step, device)
        step_ms.append(round(ms, 3))
        wall_ms.append(round(wall, 3))
    profiled_at = long.prefilled
    t1 = time.perf_counter()
    prof = profile_call(step, device, args.top)
    prof["profiled_step_wall_ms"] = round(1e3 * (time.perf_counter() - t1), 3)
    prof["prefix"] = profiled_at
    for s in list(engine.live):
        engine.abort(s)
    if any(s.error is not None for s in decoders):
        raise InputError(f"a decoding sequence failed: {[str(s.error) for s in decoders if s.error is not None]}")
    return {"plan": plan_name, "decode_rows": decode_rows, "decode_len": args.decode_len, "prefill_s": round(prefill_s, 3),
            "prefixes": prefixes, "step_ms": step_ms, "step_wall_ms": wall_ms,
            "step_ms_median": round(statistics.median(step_ms), 3),
            "step_ms_per_layer": round(statistics.median(step_ms) / lm.spec.num_layers, 3),
            "profile": prof}


def floor(lm: LoadedModel, plans: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """The pieces alone, one layer's worth, on the chunk's shapes (module docstring); ``*_all_layers_ms`` x layers."""
    device, dtype, spec, L, S = lm.device, lm.dtype, lm.spec, args.chunk, args.prefix + args.chunk
    layers, D, Hq, Hkv = spec.num_layers, spec.head_dim, spec.num_q_heads, spec.num_kv_heads
    scale = D**-0.5
    reps = args.floor_reps
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=dtype)

    out: dict[str, Any] = {"layers": layers, "keys": S}
    layer = lm.model.model.layers[0]
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    per = {}
    for name, m in linears.items():
        x = rand(L, m.in_features)
        per[name] = round(_time_ms(lambda m=m, x=x: F.linear(x, m.weight, m.bias), device, reps), 4)
    out["linear_ms"] = per
    out["linear_layer_ms"] = round(sum(per.values()), 4)
    out["linear_all_layers_ms"] = round(layers * sum(per.values()), 3)

    def streaming_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
                        reps: int) -> tuple[float, float, float]:
        """The streaming heads' masked SDPA (``masked_attention``: K/V repeated to the query heads on a GPU), the
        same with SDPA's own GQA (what it was before: its math path on a GPU), and a causal call of the same shapes."""
        held = k.shape[2] - q.shape[2]
        gqa = q.shape[1] != k.shape[1]
        return (_time_ms(lambda: masked_attention(q, k, v, mask, scale), device, reps),
                _time_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                                enable_gqa=gqa), device, reps),
                _time_ms(lambda: causal_attention(q, k, v, held, scale), device, reps))

    def attention(hq: int, hkv: int) -> float:
        q, k, v = rand(1, hq, L, D), rand(1, hkv, S, D), rand(1, hkv, S, D)
        return _time_ms(lambda: causal_attention(q, k, v, S - L, scale), device, reps)

    dense = attention(Hq, Hkv)
    out["causal_attention_all_heads_ms"] = round(dense, 4)
    out["causal_attention_all_heads_all_layers_ms"] = round(layers * dense, 3)
    for name in plans:
        if name == "dense":
            continue
        row = make_plan(name, lm).policies()[0]
        full = sum(p.name == "full" for p in row)
        streaming = [p for p in row if isinstance(p, Streaming)]
        group = Hq // Hkv
        entry: dict[str, Any] = {"full_kv_heads": full, "streaming_kv_heads": len(streaming)}
        if full:
            ms = attention(full * group, full)
            entry |= {"full_causal_ms": round(ms, 4), "full_causal_all_layers_ms": round(layers * ms, 3)}
        if streaming:
            p, n = streaming[0], len(streaming)
            held = min(args.prefix, p.sink + p.window)
            last = args.prefix - 1
            slots = torch.arange(held, device=device)
            old_pos = torch.where(slots < p.sink, slots, last - (last - slots) % p.window)
            new_pos = torch.arange(args.prefix, args.prefix + L, device=device)
            mask = p.allowed(new_pos[:, None], torch.cat([old_pos, new_pos])[None, :])
            q, k, v = rand(1, n * group, L, D), rand(1, n, held + L, D), rand(1, n, held + L, D)
            masked, sdpa_gqa, flash = streaming_chunk(q, k, v, mask, scale, reps)
            entry |= {"streaming_masked_sdpa_ms": round(masked, 4), "streaming_masked_sdpa_all_layers_ms":
                      round(layers * masked, 3), "streaming_masked_sdpa_gqa_ms": round(sdpa_gqa, 4),
                      "streaming_same_shape_causal_ms": round(flash, 4),
                      "streaming_same_shape_causal_all_layers_ms": round(layers * flash, 3)}
            if device.type == "cuda":  # the Triton kernel the policy runs with kernels on, over the same ring and chunk
                from headwise.kernels.sink_window import sink_window_attention

                call = (q, k[:, :, held:], v[:, :, held:], k[:, :, :held], v[:, :, :held], old_pos, args.prefix,
                        p.sink, p.window, scale)
                ms = _time_ms(lambda call=call: sink_window_attention(*call), device, reps)
                entry |= {"streaming_kernel_ms": round(ms, 4), "streaming_kernel_all_layers_ms": round(layers * ms, 3)}
        out[name] = entry
    return out


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--model", default="random:llama-3-8b,layers=8")
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--prefix", type=int, default=65536, help="prompt tokens before the timed chunks (a multiple of "
                   "--chunk)")
    p.add_argument("--chunk", type=int, default=2048)
    p.add_argument("--kv-gb", type=float, default=15.0, help="the page pool (GB), as --kv-memory")
    p.add_argument("--plans", default="dense,duo25")
    p.add_argument("--decode-rows", default="0", help="comma-separated: decoding sequences beside the chunk")
    p.add_argument("--decode-len", type=int, default=None, help="their prompt tokens (default: --chunk)")
    p.add_argument("--reps", type=int, default=3, help="timed chunk steps per case")
    p.add_argument("--floor-reps", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-layers", action="store_true",
                   help="Engine(compile_layers): the decoder layers compiled around attention (their fused kernels "
                        "are timed)")
    args = p.parse_args(argv)
    if args.prefix < args.chunk or args.prefix % args.chunk:
        raise InputError(f"--prefix must be a positive multiple of --chunk ({args.chunk}), got {args.prefix} (the "
                         "prefill steps before it also warm the kernels up)")
    args.decode_len = args.decode_len or args.chunk
    return args


def check_context(lm: LoadedModel, plan: HeadPlan, args: argparse.Namespace) -> None:
    """The chunk's sequence (``--prefix`` plus ``--reps`` + 2 chunks: the timed steps, the profiled one and one more)
    must fit the context ``plan`` may run in (``HeadPlan.max_context``, as ``Engine.check_length`` asks): refused
    before any prefill, with the longest prefix that fits."""
    limit = plan.max_context(lm.spec)
    if limit and _long_len(args) + 1 > limit:
        most = (limit - 1 - (_long_len(args) - args.prefix)) // args.chunk * args.chunk
        hint = f"--prefix {most} at most" if most >= args.chunk else "a smaller --chunk or fewer --reps"
        raise InputError(f"--prefix {args.prefix} + {args.reps + 2} chunks of {args.chunk} tokens + 1 exceeds "
                         f"{args.model}'s context of {limit} tokens: {hint}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    lm = load_model(args.model, args.device, args.dtype)
    plans = [s.strip() for s in args.plans.split(",") if s.strip()]
    rows = [int(x) for x in args.decode_rows.split(",") if x.strip()]
    torch.manual_seed(args.seed)
    cases = []
    for name in plans:
        for n in rows:
            case = step_case(lm, name, args, n)
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()  # the case's pool
            print(f"{name:8s} decode_rows={n:3d}: step {case['step_ms_median']:9.3f} ms "
                  f"({case['step_ms_per_layer']:.3f} ms/layer), GPU busy {case['profile']['gpu_busy_ms']} ms, "
                  f"blocking calls {case['profile']['blocking_runtime_calls']}", flush=True)
            cases.append(case)
    with torch.inference_mode():
        fl = floor(lm, plans, args)
    results = {"model": args.model, "device": str(lm.device), "dtype": str(lm.dtype), "prefix": args.prefix,
               "chunk": args.chunk, "kv_gb": args.kv_gb, "compile_layers": args.compile_layers,
               "layers": lm.spec.num_layers, "cases": cases, "floor": fl}
    command = "python3 bench/prefill_step_breakdown.py " + " ".join(shlex.quote(a) for a in argv)
    doc = result_doc(command, results, lm.device)
    write_result(doc, args.out)
    print(f"GPU command (one H200, a few minutes): {GPU_COMMAND}", flush=True)
    print(json.dumps(doc), flush=True)
    return doc


if __name__ == "__main__":
    main()
