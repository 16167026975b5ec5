"""Does a plan answer the same through each of the engine's execution paths? Retrieval accuracy of plans on the same
prompts with the Triton kernels on and off, CUDA-graph decode on and off, in bf16 and fp32, and how far the
prefill's last logits of each path are from the fp32 reference path.

A plan that scores far below a plan it dominates head for head (every head kept at least as precisely) points at
a path that computes something else; this finds which one.

    PYTHONPATH=src python bench/plan_paths.py OUT.json --plans plans/a.json,plans/b.json --task passkey \
        --length 2048 --samples 40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from headwise.engine import Engine
from headwise.eval.runner import sample_seed
from headwise.eval.scoring import score
from headwise.eval.tasks import Sample, make_sample
from headwise.models import load_model
from headwise.plan import HeadPlan

PATHS = "bfloat16/on/auto,bfloat16/on/off,bfloat16/off/off,float32/on/auto,float32/off/off"  # dtype/kernels/graphs
SWITCH = {"on": True, "off": False, "auto": None}


def parse_paths(text: str) -> list[tuple[str, bool | None, bool | None]]:
    out = []
    for item in text.split(","):
        dtype, kernels, graphs = item.split("/")
        out.append((dtype, SWITCH[kernels], SWITCH[graphs]))
    return out


def answer_score(engine: Engine, sample: Sample) -> float:
    """Greedy generation of one prompt, scored as ``headwise eval`` scores it."""
    text = [ev.text for ev in engine.generate(sample.prompt, max_new_tokens=sample.max_new_tokens, temperature=0.0)
            if ev.stats is None]
    return score(sample.meta["scoring"], "".join(text), sample.answers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--plans", required=True, help="comma-separated plan files ('dense' for the dense plan)")
    ap.add_argument("--task", default="passkey")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--samples", type=int, default=40, help="prompts in all, spread over the depths")
    ap.add_argument("--paths", default=PATHS, help=f"dtype/kernels/graphs, comma-separated (default {PATHS})")
    args = ap.parse_args()
    paths = parse_paths(args.paths)
    depths = [float(d) for d in args.depths.split(",")]
    per = -(-args.samples // len(depths))
    jobs = [(d, i) for i in range(per) for d in depths][: args.samples]
    rows: list[dict] = []
    for dtype in dict.fromkeys(p[0] for p in paths):
        lm = load_model(args.model, device=args.device, dtype=dtype)
        samples = [make_sample(args.task, lm.tokenizer, args.length, d, sample_seed(0, i)) for d, i in jobs]
        for name in args.plans.split(","):
            plan = None if name == "dense" else HeadPlan.load(name)
            first: torch.Tensor | None = None
            for _, kernels, graphs in [p for p in paths if p[0] == dtype]:
                engine = Engine(lm, plan, use_kernels=kernels, cuda_graphs=graphs)
                t0, total, last = time.perf_counter(), 0.0, []
                for s in samples:
                    total += answer_score(engine, s)
                    with torch.inference_mode():
                        ids = engine.encode(s.prompt).to(lm.device)
                        last.append(engine.prefill(ids, engine.new_cache(1))[0].float().cpu())
                logits = torch.stack(last)
                first = logits if first is None else first
                row = {"plan": name, "dtype": dtype, "kernels": kernels, "graphs": graphs, "n": len(samples),
                       "score": total / len(samples),
                       "max_abs_logit_diff_vs_first_path": (logits - first).abs().max().item(),
                       "seconds": round(time.perf_counter() - t0, 1)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        del lm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    args.out.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "device":
                                    torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
