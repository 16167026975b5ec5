"""``headwise`` command line: info, generate, plan, and the subcommands of profile/eval/serve/bench.

User mistakes (a bad model name, plan or file) are ``HeadwiseError``s: printed on one line, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from headwise.errors import HeadwiseError, InputError
from headwise.model_args import add_model_args, load_from_args
from headwise.models import dtype_name
from headwise.tp import add_tp_args

# Subcommand modules; each exposes ``register(subparsers)``.
_COMMAND_MODULES = (
    "headwise.profile.cli",
    "headwise.eval.cli",
    "headwise.server.cli",
    "headwise.bench.cli",
)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"




# ---------------------------------------------------------------------------------------------- info
def cmd_info(args: argparse.Namespace) -> int:
    lm = load_from_args(args)
    s = lm.spec
    dtype_bytes = lm.dtype.itemsize
    n_window = sum(w is not None for w in s.layer_windows)
    info = {
        "model": lm.name,
        "source": lm.source,
        "architecture": s.architecture,
        "layers": s.num_layers,
        "query_heads": s.num_q_heads,
        "kv_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "max_context": s.max_context,
        "sliding_window_layers": n_window,
        "dtype": dtype_name(lm.dtype),
        "kv_bytes_per_token": s.kv_bytes_per_token(dtype_bytes),
        "parameters": sum(p.numel() for p in lm.model.parameters()),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{lm.name}  ({lm.source})")
    print(f"  architecture       {s.architecture}")
    print(f"  parameters         {info['parameters'] / 1e6:.1f} M ({info['dtype']})")
    print(f"  layers             {s.num_layers}" + (f" ({n_window} sliding-window, {s.num_layers - n_window} global)" if n_window else ""))
    print(f"  heads              {s.num_q_heads} query / {s.num_kv_heads} KV (GQA group {s.group_size}), head_dim {s.head_dim}")
    print(f"  context            {s.max_context} tokens")
    print(f"  KV bytes per token {info['kv_bytes_per_token']} ({_fmt_bytes(info['kv_bytes_per_token'])}, {info['dtype']}; "
          "sliding-window layers stop growing past their window)")
    for n in (4096, s.max_context):
        if n:
            print(f"  dense KV at {n:>6} {_fmt_bytes(s.dense_kv_bytes(n, dtype_bytes))}")
    return 0


# ---------------------------------------------------------------------------------------------- generate
def _read_prompt(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"prompt file {p} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"prompt file {p} is a directory") from None
    except UnicodeDecodeError:
        raise InputError(f"prompt file {p} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read prompt file {p}: {exc.strerror}") from None
    if not text.strip():
        raise InputError(f"prompt file {p} is empty")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from headwise import tp
    from headwise.engine import SamplingParams
    from headwise.plan import HeadPlan

    if tp.is_other_rank(args):  # another rank of --tp: rank 0 reads the prompt and drives this one
        with tp.loaded(args):
            return 0
    if args.prompt_file is None and args.prompt is None:
        raise InputError("give the prompt with --prompt-file FILE (or --prompt TEXT)")
    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    # Checked (NaN, negative, out of range) before the model loads: a bad flag fails in a second.
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    plan = HeadPlan.load(args.plan) if args.plan and args.plan != "dense" else None
    with tp.loaded(args, plan) as lm:
        assert lm is not None
        return _generate(args, lm, plan, prompt, params)


def _generate(args: argparse.Namespace, lm: Any, plan: Any, prompt: str, params: Any) -> int:
    from headwise.engine import Engine

    graphs = {"auto": None, "on": True, "off": False}[args.cuda_graphs]
    engine = Engine(lm, plan, chunk_size=args.chunk_size, cuda_graphs=graphs)
    if args.chat and getattr(lm.tokenizer, "chat_template", None):
        prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                  add_generation_prompt=True)
    stats = None
    t0 = time.perf_counter()
    for ev in engine.generate(prompt, params):
        if ev.stats is not None:
            stats = ev.stats
        elif not args.quiet:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    assert stats is not None
    if not args.quiet:
        sys.stdout.write("\n")
    summary = stats.to_dict() | {"plan": engine.plan.digest(), "total_s": round(time.perf_counter() - t0, 3)}
    print(
        f"[{stats.prompt_tokens} prompt tokens, prefill {stats.prefill_s:.2f} s ({stats.prefill_tokens_per_s:.0f} tok/s); "
        f"{stats.new_tokens} new tokens, {stats.decode_tokens_per_s:.1f} tok/s"
        f"{' (CUDA graph)' if stats.cuda_graph else ''}; KV held {_fmt_bytes(stats.kv_bytes)} "
        f"= {100 * stats.kv_fraction:.1f}% of dense ({_fmt_bytes(stats.dense_kv_bytes)})]",
        file=sys.stderr,
    )
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(summary, indent=1))
    return 0


# ---------------------------------------------------------------------------------------------- plan
def _parse_params(text: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        if "=" not in item:
            raise InputError(f"--params expects key=value[,key=value], got '{item}'")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def _head(policy: str, params: str | None) -> dict[str, Any]:
    """A plan's head entry: ``{"policy": ..., "params": {...}}`` from a policy name and ``key=value[,...]``."""
    head: dict[str, Any] = {"policy": policy}
    parsed = _parse_params(params)
    if parsed:
        head["params"] = parsed
    return head


def _model_spec(args: argparse.Namespace) -> Any:
    """The attention shape of ``args.model``: a random model's from its config alone (no weights built), any other
    model's from loading it."""
    from headwise import random_model
    from headwise.spec import ModelSpec

    if random_model.is_random(args.model):
        return ModelSpec.from_config(random_model.config(args.model))
    return load_from_args(args).spec


def _plan_spec(plan: Any, model: str | None) -> Any:
    """The attention shape a plan's per-rank figures use: ``model``'s config (native sliding windows included),
    else the plan's own header (every layer global)."""
    from headwise.spec import ModelSpec

    if model:
        from transformers import AutoConfig

        from headwise.models import local_dir

        path, _ = local_dir(model)
        spec = ModelSpec.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
        plan.check_model(spec)
        return spec
    m = plan.model
    n = int(m["num_layers"])
    return ModelSpec(str(m["architecture"]), n, int(m["num_q_heads"]), int(m["num_kv_heads"]), int(m["head_dim"]),
                     0, (None,) * n)


def _rank_table(plan: Any, spec: Any, tp: int, at: int) -> list[str]:
    """Per-rank KV bytes of ``plan`` at ``at`` tokens over ``tp`` ranks: naive split vs balanced placement."""
    from headwise.placement import balance, measure

    recorded = plan.kv_order(tp)
    order = recorded or balance(plan, spec, tp, at)
    rows = [("naive", measure(plan, spec, tp, at)),
            ("balanced" + (" (recorded)" if recorded else ""), measure(plan, spec, tp, at, order))]
    lines = [f"  TP {tp} at {at} tokens: KV per rank (MB); spread = fullest / emptiest rank - 1, "
             "layer excess = extra attention time if each layer waits for its slowest rank"]
    lines.append("    " + f"{'placement':<20}" + "".join(f"{f'rank {r}':>10}" for r in range(tp))
                 + f"{'spread':>9}{'excess':>9}")
    for name, b in rows:
        lines.append("    " + f"{name:<20}" + "".join(f"{x / 1e6:>10.1f}" for x in b.rank_bytes)
                     + f"{100 * b.spread:>8.1f}%{100 * b.layer_excess:>8.1f}%")
    return lines


def cmd_plan(args: argparse.Namespace) -> int:
    from headwise.placement import balance, check_tp, default_at
    from headwise.plan import HeadPlan
    from headwise.spec import ModelSpec

    if args.plan_cmd in ("show", "balance"):
        plan = HeadPlan.load(args.plan)
        tps = args.tp or []
        spec = _plan_spec(plan, args.model) if tps else None
        for tp in tps:
            check_tp(spec, tp)
        at = args.at or int(plan.meta.get("target_len") or 0) or (default_at(spec) if spec is not None else 0)
        if args.plan_cmd == "balance":
            if not tps:
                raise InputError("give the rank counts to balance for: --tp N (repeatable)")
            for tp in tps:
                plan = plan.with_placement(tp, balance(plan, spec, tp, at), at)
            path = plan.save(args.output)
            print(f"wrote {path} with placements for TP {', '.join(map(str, tps))} (balanced at {at} tokens)")
            for tp in tps:
                print("\n".join(_rank_table(plan, spec, tp, at)))
            return 0
        print(f"plan {args.plan} (digest {plan.digest()}) for {plan.model.get('name', plan.model['architecture'])}")
        print("  " + plan.summary())
        if plan.placement:
            print("  placements recorded for TP " + ", ".join(sorted(plan.placement, key=int)))
        for tp in tps:
            print("\n".join(_rank_table(plan, spec, tp, at)))
        if not tps:
            for i, row in enumerate(plan.policies()):
                print(f"  layer {i:>3}: " + "  ".join(p.short() for p in row))
        return 0
    spec: ModelSpec = _model_spec(args)
    if args.plan_cmd == "dense":
        plan = HeadPlan.dense(spec, args.model)
    elif args.plan_cmd == "split":
        plan = HeadPlan.split(spec, args.share, _head(args.first, args.first_params), _head(args.rest, args.rest_params),
                              args.model, created_by="headwise plan split")
    else:
        plan = HeadPlan.uniform(spec, _head(args.policy, args.params), args.model, created_by="headwise plan uniform")
    path = plan.save(args.output)
    at = args.at or min(spec.max_context or 4096, 4096)
    print(f"wrote {path}: {plan.summary(spec, at)}")
    return 0


def _add_rank_args(q: argparse.ArgumentParser) -> None:
    q.add_argument("--tp", type=int, action="append",
                   help="tensor-parallel rank count (repeatable): per-rank KV bytes, naive split vs balanced")
    q.add_argument("--at", type=int, default=None,
                   help="context length of the KV figures (default: the plan's target length, else the model's "
                        "context, at most 131072)")
    q.add_argument("--model", default=None,
                   help="read the model's config for native sliding windows (default: the plan's header, every "
                        "layer global)")


# ---------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headwise", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log details and show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("info", help="a model's attention shape and KV bytes per token")
    add_model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text with a head plan (streams tokens)")
    add_model_args(p)
    p.add_argument("--plan", default="dense", help="plan JSON file, or 'dense' (default)")
    p.add_argument("--prompt-file", help="UTF-8 text file with the prompt ('-' for stdin)")
    p.add_argument("--prompt", help="prompt text (instead of --prompt-file)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                   help="replay decode steps from a CUDA graph: auto (default: when the GPU, the kernels and "
                        "every policy of the plan allow it, from 8 decode steps on), on (an error says what "
                        "prevents it), off")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--quiet", action="store_true", help="print only the statistics line")
    p.add_argument("--stats-json", help="also write the statistics as JSON to this file")
    add_tp_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="make or show head plans")
    psub = p.add_subparsers(dest="plan_cmd", metavar="PLAN_COMMAND", required=True)
    q = psub.add_parser("dense", help="every head full attention")
    add_model_args(q)
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--at", type=int, default=None, help="sequence length for the KV summary")
    q.set_defaults(func=cmd_plan)
    q = psub.add_parser("uniform", help="the same policy for every head (baselines)")
    add_model_args(q)
    q.add_argument("--policy", required=True)
    q.add_argument("--params", help="key=value[,key=value] (JSON values)")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--at", type=int, default=None, help="sequence length for the KV summary")
    q.set_defaults(func=cmd_plan)
    q = psub.add_parser("split", help="in every layer, a share of the KV heads one policy, the rest another (e.g. 25%% "
                                      "full heads with vertical-slash prefill + 75%% streaming)")
    add_model_args(q)
    q.add_argument("--share", type=float, required=True, help="share of each layer's KV heads taking --first (0..1)")
    q.add_argument("--first", required=True, help="policy of the first heads of each layer")
    q.add_argument("--first-params", help="key=value[,key=value] (JSON values)")
    q.add_argument("--rest", required=True, help="policy of the other heads")
    q.add_argument("--rest-params", help="key=value[,key=value] (JSON values)")
    q.add_argument("-o", "--output", required=True)
    q.add_argument("--at", type=int, default=None, help="sequence length for the KV summary")
    q.set_defaults(func=cmd_plan)
    q = psub.add_parser("show", help="print a plan's heads, or with --tp its KV bytes per tensor-parallel rank")
    q.add_argument("plan")
    _add_rank_args(q)
    q.set_defaults(func=cmd_plan)
    q = psub.add_parser("balance", help="record KV-head placements that even out KV bytes over tensor-parallel ranks")
    q.add_argument("plan")
    _add_rank_args(q)
    q.add_argument("-o", "--output", required=True)
    q.set_defaults(func=cmd_plan)

    for mod_name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name and mod_name.startswith(exc.name):
                continue  # optional part not present in this build
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="headwise: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # what tensor-parallel ranks are started with
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.verbose:
        logging.getLogger("headwise").setLevel(logging.INFO)
    try:
        return int(args.func(args) or 0)
    except HeadwiseError as exc:
        if args.verbose:
            raise
        print(f"headwise: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("headwise: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``headwise plan show X | head``): stop quietly, as other command-line tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
