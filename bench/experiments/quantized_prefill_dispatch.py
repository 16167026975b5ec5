"""Diagnostic: how many PyTorch ops one prompt chunk dispatches under dense and under a plan, and from where.

On a GPU shared by many evaluation processes a plan's prefill speed follows its launches. This prefills a prompt of
``--prefix`` tokens, then counts every op the next ``--chunk``-token chunk dispatches (a ``TorchDispatchMode``),
attributing each to the innermost ``headwise`` function on the Python stack (``(torch / transformers)`` when none).
On the CPU, fp32: counts, not times.

    PYTHONPATH=src python bench/experiments/quantized_prefill_dispatch.py OUT.json --model gemma3-270m \\
        --plan plans/gemma3-270m.json --prefix 1536 --chunk 512
"""

from __future__ import annotations

import argparse
import collections
import shlex
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from headwise.bench.record import result_doc, write_result
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan


class CountOps(TorchDispatchMode):
    """Counts dispatched ops by the innermost ``headwise`` function calling them."""

    def __init__(self) -> None:
        super().__init__()
        self.by: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        frame, where = sys._getframe(1), "(torch / transformers)"
        while frame is not None:
            name = frame.f_code.co_filename
            if "/headwise/" in name:
                where = f"{name.split('/headwise/')[-1]}:{frame.f_code.co_name}"
                break
            frame = frame.f_back
        self.by[where] += 1
        return func(*args, **(kwargs or {}))


def count_chunk(lm: Any, plan: HeadPlan | None, ids: list[int], prefix: int, chunk: int) -> dict[str, Any]:
    """The ops the chunk after ``prefix`` tokens dispatches, in all and by function."""
    engine = Engine(lm, plan, chunk_size=chunk)
    cache = engine.new_cache(1, reserve=prefix + chunk)
    with torch.inference_mode():
        engine.prefill(torch.tensor([ids[:prefix]]), cache)
        with CountOps() as ops:
            engine.prefill(torch.tensor([ids[prefix : prefix + chunk]]), cache)
    return {"ops": sum(ops.by.values()), "by_function": dict(ops.by.most_common())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the result JSON to write")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--plan", default="plans/gemma3-270m.json")
    ap.add_argument("--prefix", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=512)
    args = ap.parse_args()
    lm = load_model(args.model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.prefix + args.chunk,), generator=gen).tolist()
    results = {"model": args.model, "prefix": args.prefix, "chunk": args.chunk,
               "dense": count_chunk(lm, None, ids, args.prefix, args.chunk),
               args.plan: count_chunk(lm, HeadPlan.load(args.plan), ids, args.prefix, args.chunk)}
    for name in ("dense", args.plan):
        print(f"{name}: {results[name]['ops']} ops")
    write_result(result_doc("python " + shlex.join(sys.argv), results, "cpu"), args.out)


if __name__ == "__main__":
    main()
