"""Decode steps over tensor-parallel ranks: a 32-layer Llama-3-8B-shaped model (random bf16 weights) at a 128K-token
context, batch 8, under the dense plan and a 25% plan, with the naive split and the balanced placement.

Every rank runs this script (``torchrun``; without it, one process is TP 1). It loads its share of the model with
transformers' tensor parallelism (``tp.load_share``: ``DistributedConfig(tp_size=N)``, NCCL), then for each plan and
placement: re-indexes the weights (``tp.permute_kv_heads``; back again afterwards), builds its batch-8
``HeadwiseCache`` (its own heads' stores, ``Engine.new_cache``), fills the stores with random keys and values for
the context (what a prefill would leave, minus the prefill: 8 x 128K tokens through the model would cost more than
the measurement, and a decode step reads the same bytes whatever the keys say), and times decode steps through
``Engine.forward`` on the kernels: the median of CUDA-synchronised steps, taken as the slowest rank's (every step
ends in collectives, so the ranks step together). A layout that does not fit the GPU is recorded as such (the
dense plan at TP 1: 137 GB of KV plus 16 GB of weights).

The 25% plan is the solver's (``profile.solver.solve``, budget 0.25 of dense at the context) on seeded uniform
random head scores (seed 0; 63 full KV heads of 256, the rest streaming), as bench/tp_balance.py's first row.

    # on the 2-GPU machine (weights written once to --weights, 16 GB; about 2 min each with the weights there):
    python bench/tp_decode.py --weights /tmp/llama3-8b-random --out bench/results
    torchrun --standalone --nproc-per-node 2 bench/tp_decode.py --weights /tmp/llama3-8b-random --out bench/results
    python bench/tp_decode.py --summary bench/results/tp_decode_tp1_<date>.json bench/results/tp_decode_tp2_<date>.json
    # CPU dry run of the script itself (tiny shapes, gloo; add --kernels with TRITON_INTERPRET=1 for the GPU's path):
    torchrun --standalone --nproc-per-node 2 bench/tp_decode.py --tiny --weights /tmp/tiny-random --out /tmp

The last stdout line of a run is its JSON document (also ``OUT/tp_decode_tp<N>_<date>.json``, rank 0).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from headwise import tp
from headwise.bench.record import save_result
from headwise.cache import HeadwiseCache
from headwise.engine import Engine
from headwise.models import LoadedModel, load_dir
from headwise.placement import balance, measure
from headwise.plan import HeadPlan
from headwise.profile.solver import solve
from headwise.spec import ModelSpec


def config(tiny: bool, context: int) -> Any:
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                           num_attention_heads=16, num_key_value_heads=8, head_dim=16,
                           max_position_embeddings=context + 256, tie_word_embeddings=False)
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=context + 1024, tie_word_embeddings=False)


def make_weights(path: Path, cfg: Any, device: str) -> None:
    """Random bf16 weights of ``cfg`` written to ``path`` (once: the ranks then load their shares from it)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    del model


def plan_25(spec: ModelSpec, context: int, budget: float) -> HeadPlan:
    scores = torch.rand(spec.num_layers, spec.num_kv_heads, generator=torch.Generator().manual_seed(0))
    return HeadPlan.from_policies(spec, solve(spec, scores, budget, context).policies, "llama3-8b-shape",
                                  budget=budget, scores="uniform seed 0")


@torch.inference_mode()
def fill(cache: HeadwiseCache, context: int, chunk: int = 4096) -> None:
    """Write random keys and values for ``context`` tokens into every store of ``cache`` (``reserve`` first)."""
    g = torch.Generator(device=cache.device).manual_seed(1)
    for layer in cache.layers:
        for group in layer.groups:
            store = cache._ensure_store(group)
            for s in range(0, context, chunk):
                n = min(chunk, context - s)
                shape = (cache.batch, len(group.kv_heads), n, cache.spec.head_dim)
                k = torch.randn(shape, generator=g, device=cache.device, dtype=cache.dtype)
                store.append(k, torch.randn(shape, generator=g, device=cache.device, dtype=cache.dtype))
        layer.seen = context


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gather(group: tp.TPGroup | None, value: Any) -> list[Any]:
    if group is None:
        return [value]
    import torch.distributed as dist

    out: list[Any] = [None] * group.size
    dist.all_gather_object(out, value, group=group.control)
    return out


def run_one(lm: LoadedModel, group: tp.TPGroup | None, plan: HeadPlan, args: argparse.Namespace) -> dict[str, Any]:
    """Time decode steps of a batch-``args.batch`` cache under ``plan`` (this rank's share)."""
    engine = Engine(lm, plan, use_kernels=True if args.kernels else None)
    device = lm.device
    cache: HeadwiseCache | None = None
    try:
        cache = engine.new_cache(args.batch, reserve=args.context + args.steps + args.warmup)
        fill(cache, args.context)
        _sync(device)
        error = None
    except torch.OutOfMemoryError as exc:
        cache, error = None, f"out of memory: {str(exc).splitlines()[0]}"
    errors = [e for e in _gather(group, error) if e]
    if errors:  # every rank learns that one did not fit, and they skip the steps together
        cache = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return {"fits": False, "error": errors[0]}
    assert cache is not None
    ids = torch.randint(0, lm.model.config.vocab_size, (args.batch, 1), device=device,
                        generator=torch.Generator(device=device).manual_seed(2))
    for _ in range(args.warmup):
        engine.forward(ids, cache)
    times = []
    for _ in range(args.steps):
        _sync(device)
        t0 = time.perf_counter()
        engine.forward(ids, cache)
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    slowest = max(_gather(group, med))
    rank_kv = _gather(group, cache.kv_bytes())
    peak = _gather(group, torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    del cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {"fits": True, "step_ms": round(1e3 * slowest, 3), "tokens_per_s": round(args.batch / slowest, 1),
            "rank0_step_ms_all": [round(1e3 * t, 3) for t in times], "rank_kv_bytes": rank_kv,
            "rank_peak_gb": [None if p is None else round(p / 1e9, 2) for p in peak]}


def summary(paths: list[str]) -> None:
    """TP N against TP 1 (tokens/s, per plan, balanced placement) and balanced against naive, from result files."""
    docs = [json.loads(Path(p).read_text()) for p in paths]
    by_tp = {d["results"]["tp"]: d["results"]["runs"] for d in docs}
    out: dict[str, Any] = {}
    base = by_tp.get(1, {})
    for n, runs in sorted(by_tp.items()):
        for key, r in runs.items():
            if not r.get("fits"):
                continue
            plan = key.split("/")[0]
            ref = base.get(f"{plan}/naive", {})
            if n > 1 and ref.get("fits"):
                out[f"tp{n}/{key} vs tp1"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
            if key.endswith("/balanced") and runs.get(f"{plan}/naive", {}).get("fits"):
                naive = runs[f"{plan}/naive"]["tokens_per_s"]
                out[f"tp{n}/{plan} balanced vs naive"] = round(r["tokens_per_s"] / naive, 3)
    print(json.dumps(out, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", help="directory of the random weights (written there when missing)")
    ap.add_argument("--out", default="bench/results")
    ap.add_argument("--context", type=int, default=None, help="tokens in every sequence's cache (default 131072)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--plans", default="dense,25", help="dense,25 (default both)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (4 layers, hidden 128): a CPU dry run")
    ap.add_argument("--kernels", action="store_true",
                    help="the Triton decode kernels also off CUDA (a CPU dry run with TRITON_INTERPRET=1)")
    ap.add_argument("--summary", nargs="+", metavar="RESULT", help="compare result files (TP 1 and TP N) and stop")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
        return
    if not args.weights:
        ap.error("--weights DIR is required")
    args.context = args.context or (2048 if args.tiny else 131072)
    cuda = torch.cuda.is_available()
    n = int(os.environ.get("WORLD_SIZE", "1"))
    group = tp.start(n, sys.argv[1:]) if n > 1 else None
    rank = 0 if group is None else group.rank
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    cfg = config(args.tiny, args.context)
    weights = Path(args.weights)
    if rank == 0 and not (weights / "config.json").is_file():
        make_weights(weights, cfg, device)
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group.control)  # the weights are on disk
    try:
        if group is None:
            model, _ = load_dir(weights, dtype, device, tokenizer=False)
            lm = LoadedModel("llama3-8b-random", model, None, ModelSpec.from_config(model.config), str(weights))
        else:
            lm = tp.load_share("llama3-8b-random", str(weights), str(weights), dtype, group, tokenizer=False)
        spec = lm.spec
        plans = {"dense": HeadPlan.dense(spec), "25": plan_25(spec, args.context, args.budget)}
        runs: dict[str, Any] = {}
        for name in [p.strip() for p in args.plans.split(",") if p.strip()]:
            plan = plans[name]
            placements = {"naive": None}
            if group is not None:
                order = balance(plan, spec, n, args.context)
                placements["balanced"] = None if all(r == sorted(r) for r in order) else order
            for how, order in placements.items():
                if how == "balanced" and order is None:
                    runs[f"{name}/balanced"] = {"same_as": f"{name}/naive"}
                    continue
                if order is not None:
                    tp.permute_kv_heads(lm.model, order, spec)
                    assert group is not None
                    group.order = order
                try:
                    res = run_one(lm, group, plan, args)
                finally:
                    if order is not None and group is not None:
                        tp.permute_kv_heads(lm.model, [sorted(range(len(r)), key=r.__getitem__) for r in order], spec)
                        group.order = None
                if group is not None:
                    res["planned_rank_kv_gb"] = [round(args.batch * b / 1e9, 3) for b in measure(
                        plan, spec, n, args.context, order, dtype.itemsize).rank_bytes]
                runs[f"{name}/{how}"] = res
                if rank == 0:
                    shown = {k: v for k, v in res.items() if k != "rank0_step_ms_all"}
                    print(f"TP {n} {name}/{how}: {json.dumps(shown)}", flush=True)
        results = {"tp": n, "context": args.context, "batch": args.batch, "steps": args.steps, "tiny": args.tiny,
                   "plan_25": {"digest": plans["25"].digest(), "counts": plans["25"].counts(),
                               "kv_fraction": round(plans["25"].kv_fraction(spec, args.context), 4)},
                   "runs": runs}
        if rank == 0:
            command = (f"torchrun --standalone --nproc-per-node {n} " if n > 1 else "python ") + " ".join(sys.argv)
            path = save_result(command, results, args.out, f"tp_decode_tp{n}", device=device)
            print(f"wrote {path}")
            print(json.dumps(json.loads(path.read_text())))
    finally:
        if group is not None:
            group.close()


if __name__ == "__main__":
    main()
