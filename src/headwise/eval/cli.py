"""``headwise eval`` and ``headwise demo``.

    headwise eval smollm2-135m --plans dense,plans/smollm2-135m.json,streaming@equal --lengths 1k,2k
    headwise eval --report-only eval-out/smollm2-135m       # redraw the report from results.json
    headwise demo                                           # dense vs headwise on SmolLM2, < 10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from headwise.errors import InputError
from headwise.model_args import add_model_args

DEMO_MODEL = "smollm2-135m"
# The shipped plans are in the repository's plans/ folder, found from this file rather than the working
# directory; an installation without the repository has none, and the demo then builds a streaming plan.
DEMO_PLAN = Path(__file__).resolve().parents[3] / "plans" / "smollm2-135m.json"
DEMO_TASKS = ["passkey", "needle", "multikey_needle", "fidelity"]
DEMO_DEPTHS = [0.25, 0.5, 0.75]
DEMO_FALLBACK_HEAD = {"policy": "streaming", "params": {"sink": 64, "window": 192}}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("eval", help="evaluate plans on generated long-context tasks; write a report",
                              description="Run a model under several head plans on generated long-context tasks; "
                              "write results.json, PNG plots and a self-contained HTML report (docs/eval.md).")
    add_model_args(p, required=False)
    p.add_argument("--plans", default="dense",
                   help="comma-separated: dense, PLAN.json, streaming@equal, random@equal[:SEED], random@equal*N (N draws, "
                        "pooled in the accuracy table too), random-full@equal[:SEED], quest@equal, streaming@0.25, "
                        "quest@0.25, knorm@equal, knorm@0.25, kivi@equal, kivi@0.25, longheads, longheads@WINDOW[/CHUNK], longheads-bound|-max[-qhead][@WINDOW[/CHUNK]], offload[-ivf|-hnsw|-exact][@TOP_K[/EF|/PROBE]]")
    p.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (default)")
    p.add_argument("--lengths", default="1k", help="prompt lengths in tokens, e.g. 1k,2k,4k (default 1k)")
    p.add_argument("--depths", default=None, help="needle depths for passkey/needle (default 0,0.25,0.5,0.75,1)")
    p.add_argument("--samples", type=int, default=4, help="samples per task × length cell, spread over the depths for tasks with one; default 4 "
                        "(results need >= 100 per cell: docs/eval.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output directory (default eval-out/MODEL)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="override each task's answer length")
    p.add_argument("--on-too-long", choices=("skip", "stop"), default="skip",
                   help="a length above the model's context: skip it with a note (default) or stop")
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--fp32-logits", action="store_true",
                   help="compute the logits in float32 (a bfloat16 model's round to ~3 digits, and greedy decoding "
                        "breaks the exact ties by token id); rows are kept apart from runs without it")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only every N-th sample from the I-th (parallel processes on one GPU); a run "
                        "without --shard then collects every shard's rows and writes the report")
    p.add_argument("--collect", action="store_true",
                   help="generate nothing: write results and report from the rows already in --out (after --shard runs)")
    p.add_argument("--preset", choices=("demo",), default=None, help="demo: the `headwise demo` configuration")
    p.add_argument("--report-only", metavar="DIR", default=None, help="redraw the report from DIR/results.json")
    p.add_argument("--export-prompts", metavar="FILE", default=None,
                   help="run nothing: write this configuration's samples (prompt, token ids, answers) as JSON lines "
                        "to FILE, for baselines run outside headwise (docs/eval.md, kvpress baselines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    from headwise.tp import add_tp_args

    add_tp_args(p)
    p.set_defaults(func=run)

    d = subparsers.add_parser("demo", help="dense vs headwise on SmolLM2: table + HTML report (< 10 min on 2 CPU cores)")
    d.add_argument("--out", default="eval-out/demo", help="output directory (default eval-out/demo)")
    d.add_argument("--device", default=None)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=run_demo)


def run(args: argparse.Namespace) -> int:
    from headwise import tp
    from headwise.eval.report import terminal_report, write_report
    from headwise.eval.runner import (
        EvalConfig,
        command_line,
        parse_depths,
        parse_length,
        parse_list,
        parse_shard,
        parse_tasks,
    )

    if args.report_only:
        path = Path(args.report_only) / "results.json"
        try:
            results = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path} does not exist: run `headwise eval` with --out {args.report_only} first") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON (line {exc.lineno})") from None
        print(terminal_report(results))
        files = write_report(results, Path(args.report_only))
        print(f"report: {files['html']}")
        return 0
    if tp.is_other_rank(args):  # another rank of --tp: rank 0 runs the eval and drives this one
        with tp.loaded(args):
            return 0
    if args.preset == "demo":
        return run_demo(args)
    if not args.model:
        raise InputError("give a model: headwise eval MODEL --plans ... (or --preset demo, or --report-only DIR)")
    if args.export_prompts:
        return _export(args)
    cfg = EvalConfig(
        model=args.model,
        plans=parse_list(args.plans, "plans"),
        tasks=parse_tasks(args.tasks),
        lengths=[parse_length(x) for x in parse_list(args.lengths, "lengths")],
        depths=parse_depths(args.depths),
        samples=args.samples,
        seed=args.seed,
        out=Path(args.out or Path("eval-out") / Path(args.model).name.removesuffix(".gguf")),
        max_new_tokens=args.max_new_tokens,
        on_too_long=args.on_too_long,
        device=args.device,
        dtype=args.dtype,
        chunk_size=args.chunk_size,
        fp32_logits=args.fp32_logits,
        command=command_line(),
        progress=not args.no_progress,
        shard=parse_shard(args.shard) if args.shard else None,
        collect_only=args.collect,
    )
    if args.tp > 1:  # the placement is balanced for the first plan file listed
        from headwise.plan import HeadPlan

        first = next((p for p in cfg.plans if p.endswith(".json") or Path(p).is_file()), None)
        with tp.loaded(args, HeadPlan.load(first) if first else None) as lm:
            return _run(cfg, args, lm)
    return _run(cfg, args)


def _export(args: argparse.Namespace) -> int:
    """``--export-prompts``: the samples of this configuration, with the model directory another program loads."""
    from headwise.eval.external import export_prompts
    from headwise.eval.runner import parse_depths, parse_length, parse_list, parse_tasks
    from headwise.models import load_model, local_dir

    lm = load_model(args.model, device="cpu")
    model_dir, _ = local_dir(args.model)
    n = export_prompts(lm, Path(args.export_prompts), parse_tasks(args.tasks),
                       [parse_length(x) for x in parse_list(args.lengths, "lengths")], parse_depths(args.depths),
                       args.samples, args.seed, model_dir=model_dir)
    print(f"{n} prompts of {lm.name} written to {args.export_prompts} (model directory {model_dir})")
    return 0


def _run(cfg: Any, args: argparse.Namespace, lm: Any = None) -> int:
    if cfg.shard is not None:
        from headwise.eval.runner import run_eval

        done = run_eval(cfg, lm)
        print(f"shard {args.shard}: {done['runs_this_time']} runs; collect with the same command without --shard")
        return 0
    return _run_and_report(cfg, lm)


def _run_and_report(cfg: Any, lm: Any = None) -> int:
    from headwise.eval.report import terminal_report, write_report
    from headwise.eval.runner import run_eval

    t0 = time.perf_counter()
    results = run_eval(cfg, lm)
    print(terminal_report(results))
    files = write_report(results, Path(cfg.out))
    print(f"\nresults: {Path(cfg.out) / 'results.json'}\nreport:  {files['html']}")
    print(f"({results['runs_this_time']} runs this time, {time.perf_counter() - t0:.0f} s)")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """Dense vs headwise on SmolLM2 at 1K tokens: passkey and needle at 3 depths, multi-key needle, fidelity;
    2 samples each. Uses plans/smollm2-135m.json when present, else a uniform streaming plan."""
    from headwise.eval.runner import EvalConfig, command_line
    from headwise.models import load_model
    from headwise.plan import HeadPlan

    t0 = time.perf_counter()
    device = getattr(args, "device", None)
    lm = load_model(DEMO_MODEL, device=device)
    out = Path(getattr(args, "out", None) or "eval-out/demo")
    if DEMO_PLAN.is_file():
        plan_path = str(DEMO_PLAN)
        print(f"headwise demo: using the profiled plan {DEMO_PLAN}", file=sys.stderr)
        plans = ["dense", plan_path, "streaming@equal"]
    else:
        plan = HeadPlan.uniform(lm.spec, DEMO_FALLBACK_HEAD, lm.name,
                                created_by="headwise demo (no profile found: uniform streaming)")
        plan_path = str(plan.save(out / "streaming-demo-plan.json"))
        print(f"headwise demo: {DEMO_PLAN} not found, so no profiled plan: built a streaming-heavy plan on the fly "
              f"(every head streaming, 64 sinks + 192 recent tokens) at {plan_path}. Run `headwise profile "
              f"{DEMO_MODEL}` for a plan that keeps the heads that retrieve.", file=sys.stderr)
        plans = ["dense", plan_path]
    cfg = EvalConfig(
        model=DEMO_MODEL, plans=plans, tasks=list(DEMO_TASKS), lengths=[1024], depths=list(DEMO_DEPTHS), samples=6,
        seed=0, out=out, device=device, command=command_line(),
        progress=not getattr(args, "no_progress", False),
    )
    code = _run_and_report(cfg, lm)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s (model load included)")
    return code
