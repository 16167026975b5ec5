"""``headwise profile MODEL --budget 0.25 -o plan.json [--method retrieval|duo|razor|mass] [--target-len N] [--fast]``

Measures every head (progress bars), solves the KV budget, and writes the plan atomically with a heatmap PNG
next to it (``plan.png``). Ctrl-C stops cleanly: the plan is written only at the very end, atomically, so an
interrupted run leaves no plan file (an older plan at the same path stays as it was).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from headwise.errors import InputError
from headwise.kernels.kv_quant import BITS
from headwise.model_args import add_model_args, load_from_args
from headwise.placement import check_tp
from headwise.plan import HeadPlan
from headwise.profile.act import OBJECTIVES as ACT_OBJECTIVES
from headwise.profile.runner import (
    ABLATION_BASES,
    ABLATION_SWITCHES,
    DEFAULT_METHOD,
    FULL_SHARE,
    METHODS,
    Settings,
    check_select_2bit,
    check_select_deals,
    check_select_under,
    check_text_allowance,
    draw_plan,
    parse_budgets,
    print_deals,
    print_rings,
    print_selection,
    profile_model,
    resolve_from_scores,
)
from headwise.profile.select import SELECT_TEXT_ALLOWANCE
from headwise.profile.solver import QuantMenu, check_budget

FULL_HEADS: dict[str, dict[str, Any]] = {
    "full": {"policy": "full"},
    "longheads": {"policy": "longheads", "params": {"chunk_score": "max"}},
    "offload": {"policy": "retrieval_offload"},
}
"""``--full-heads``: the head entry the solver's full heads get (past the trained length, past GPU memory)."""


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "profile", help="measure every head's role and write a plan that meets a KV-memory budget",
        description=__doc__.splitlines()[0],
    )
    add_model_args(p)
    p.add_argument("--budget", type=float, required=True,
                   help="KV memory as a fraction of dense at --target-len, in (0, 1] (e.g. 0.25)")
    p.add_argument("-o", "--output", required=True, help="plan file to write (a PNG heatmap goes next to it)")
    p.add_argument("--method", choices=METHODS, default=DEFAULT_METHOD,
                   help=f"score that decides which heads stay full (default {DEFAULT_METHOD}; see docs/profiling.md)")
    p.add_argument("--target-len", type=int, default=4096, help="length the budget is computed at (default 4096)")
    p.add_argument("--full-share", type=float, default=None,
                   help="share of the spare budget full heads may take, the rest grows streaming spans (default: "
                        "chosen by the retrieval that held-in probes keep, docs/profiling.md; without probes "
                        f"(--fast on a CPU) {FULL_SHARE})")
    p.add_argument("--select-under", default=None, metavar="B1,B2",
                   help="smaller budgets (e.g. 0.25,0.3,0.375,0.5) whose plans from the same scores compete with "
                        "--budget's on held-in retrieval probes; the plan written is the one answering the most, the "
                        "cheaper on a tie, so it may hold less than --budget (needs --full-share; docs/profiling.md)")
    p.add_argument("--select-deals", type=int, default=0, metavar="N",
                   help="also deal the solved plan's per-head policies to other heads N times (within global and within "
                        "sliding layers: the same KV bytes) and write whichever of the plan and its deals answers the "
                        "most held-in retrieval probes, the plan on a tie (default 0: off; docs/profiling.md)")
    p.add_argument("--select-2bit", action="store_true",
                   help="with --quant-2bit, judge each head the solver holds in 2-bit values against the smallest ring "
                        "(--min-ring, else 128 tokens) on held-in retrieval probes, and stream those whose ring answers "
                        "more (the plan then holds less than --budget; docs/profiling.md)")
    p.add_argument("--select-text-allowance", default=None, metavar="NATS",
                   help="with --select-2bit, the KL from dense on held-in text (nats per position) a ring may add to "
                        f"the plan's: rings that lose more text are not kept (default {SELECT_TEXT_ALLOWANCE:g}; 'off': "
                        "judge rings on the probes alone; docs/profiling.md)")
    p.add_argument("--select-lengths", default="", metavar="L1,L2",
                   help="prompt lengths the --select-under, --select-2bit and --select-deals probes run at (default: "
                        "--target-len and twice it)")
    p.add_argument("--select-probes", type=int, default=None, metavar="N",
                   help="held-in retrieval probes per length that candidate plans are judged on (default 64 on a GPU, "
                        "8 on a CPU, 2 with --fast)")
    p.add_argument("--prefill-patterns", type=float, default=None, metavar="DENSITY",
                   help="also give full heads on global layers the MInference prefill pattern keeping the most "
                        "attention mass at block density <= DENSITY (e.g. 0.3); KV memory is unchanged")
    p.add_argument("--from-scores", metavar="PLAN", default=None,
                   help="re-solve from the scores recorded in an earlier profile's plan (no measuring; seconds)")
    p.add_argument("--fit-lengths", default="", metavar="L1,L2",
                   help="prompt lengths (e.g. 2k,8k) at which the plan must also hold at most --budget of dense KV: the "
                        "solver spends less where one of them needs it (a plan for 2K-8K prompts: --target-len 4096 "
                        "--fit-lengths 2k,8k)")
    p.add_argument("--quantize", action="store_true",
                   help="let the solver keep heads whole in 8- or 4-bit KV (policy 'quantized') where full does not fit "
                        "(Gemma 3's few global heads)")
    p.add_argument("--quant-global-key-bits", type=int, choices=BITS, default=4, metavar="{2,4,8}",
                   help="with --quantize, the fewest key bits of a quantized head on a global layer (default 4; 8: at "
                        "least 8-bit keys over 4-bit values, for heads that tell similar keys apart across the whole "
                        "context; where that would leave more global heads unreachable than 4-bit keys, 4; 2: "
                        "KIVI-2 allowed there too, with --quant-2bit; docs/profiling.md)")
    p.add_argument("--quant-2bit", action="store_true",
                   help="with --quantize, offer 2-bit KV too (KIVI-2, and 4-bit keys over 2-bit values): a cheaper "
                        "rung that keeps every token reachable at budgets where 4-bit codes do not fit")
    p.add_argument("--quant-residual", type=int, default=128, metavar="TOKENS",
                   help="with --quantize, the tokens a quantized head keeps in full precision (default 128, as KIVI)")
    p.add_argument("--min-ring", type=int, default=0, metavar="TOKENS",
                   help="let the solver stream a head with a ring this small (8-127 tokens: a window on a sliding "
                        "layer, half sinks and half recent tokens on a global one) where the budget leaves nothing "
                        "else; the smallest ring otherwise holds 128 (default 0: none). Low budgets: 32 lets Gemma 3 "
                        "keep two global heads in 2 bits at ~0.11 of dense at 4K. With --method ablation the ranking "
                        "switches heads to this ring too")
    p.add_argument("--ablation-base", choices=ABLATION_BASES, default="full",
                   help="policy of the heads the ablation ranking has not switched to streaming (default full; "
                        "quantized4: measure 4-bit -> streaming switches, for --quantize plans with few full heads; "
                        "docs/profiling.md)")
    p.add_argument("--ablation-switch", choices=ABLATION_SWITCHES, default="streaming",
                   help="what the ablation ranking switches heads to, and what the plan's streaming heads on global "
                        "layers become (default streaming; knorm: the same slots kept by key norm beside the newest "
                        "tokens, policies/knorm.py; needs --full-share)")
    p.add_argument("--ablation-time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop the ablation's elimination after SECONDS, the rest ordered by their last costs "
                        "(default 300 on a GPU, 600 on a CPU)")
    p.add_argument("--ablation-text-weight", type=float, default=None, metavar="W",
                   help="add W x the KL from dense on held-in Shakespeare to the ablation's retrieval loss, so heads "
                        "that carry text are kept too (default 0: retrieval only; docs/profiling.md)")
    p.add_argument("--act", action="store_true",
                   help="give ACT's hidden-sink calibration (policy 'act') to the full heads where it lowers the loss on "
                        "held-in and held-out text, or with --act-objective retrieval on the answers of held-in and "
                        "held-out retrieval probes (docs/profiling.md)")
    p.add_argument("--act-objective", choices=ACT_OBJECTIVES, default=None,
                   help="what --act's losses are of (default text)")
    p.add_argument("--train-gates", action="store_true",
                   help="train SeerAttention gates (self-distillation, model frozen) and let them compete in the "
                        "--prefill-patterns search; saved beside the plan as PLAN.gates.safetensors")
    p.add_argument("--full-heads", choices=FULL_HEADS, default="full",
                   help="what the heads the solver keeps whole run as: full (default); longheads (LongHeads with max "
                        "chunk scores: every token kept, each query reads at most 4096 of them at positions within "
                        "the trained length; the plan runs past the model's context when no global layer keeps a "
                        "streaming head, whose sinks are as far as the context is long); offload (RetrievalAttention: "
                        "128 sinks + 512 recent tokens on the GPU, the rest in host memory behind a faiss index, read by "
                        "each query's top 100; the budget is solved as for full heads, the GPU then holds less). "
                        "docs/profiling.md")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel ranks the plan will run over: the solver keeps a multiple of N full heads "
                        "and the plan records a placement that gives every rank the same KV bytes (default 1)")
    p.add_argument("--duo-steps", type=int, default=None,
                   help="DuoAttention gate-training steps (default: 300 on a GPU, 40 on a CPU)")
    p.add_argument("--fast", action="store_true", help="a quick, rough profile (smoke tests; not for real plans)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def command_line(args: argparse.Namespace) -> str:
    parts = ["headwise profile", args.model, "--budget", str(args.budget), "-o", str(args.output),
             "--method", args.method, "--target-len", str(args.target_len)]
    if args.prefill_patterns is not None:
        parts += ["--prefill-patterns", str(args.prefill_patterns)]
    if args.from_scores:
        parts += ["--from-scores", str(args.from_scores)]
    if args.fast:
        parts.append("--fast")
    if args.duo_steps is not None:
        parts += ["--duo-steps", str(args.duo_steps)]
    if args.fit_lengths:
        parts += ["--fit-lengths", args.fit_lengths]
    menu = solver_menu(args)
    if menu:
        parts += menu.flags()
    if args.ablation_base != "full":
        parts += ["--ablation-base", args.ablation_base]
    if args.ablation_switch != "streaming":
        parts += ["--ablation-switch", args.ablation_switch]
    if args.ablation_time_limit is not None:
        parts += ["--ablation-time-limit", str(args.ablation_time_limit)]
    if args.ablation_text_weight is not None:
        parts += ["--ablation-text-weight", str(args.ablation_text_weight)]
    if args.act:
        parts.append("--act")
    if args.act_objective is not None:
        parts += ["--act-objective", args.act_objective]
    if args.train_gates:
        parts.append("--train-gates")
    if args.full_share is not None:
        parts += ["--full-share", str(args.full_share)]
    if args.select_under is not None:
        parts += ["--select-under", args.select_under]
    if args.select_2bit:
        parts.append("--select-2bit")
    if args.select_deals:
        parts += ["--select-deals", str(args.select_deals)]
    if args.select_lengths:
        parts += ["--select-lengths", args.select_lengths]
    if args.select_probes is not None:
        parts += ["--select-probes", str(args.select_probes)]
    if args.full_heads != "full":
        parts += ["--full-heads", args.full_heads]
    return " ".join(parts)


def _settings(args: argparse.Namespace, device: str) -> Settings:
    """``--fast``: smoke-run settings; else what shipped plans use on a GPU, or the CPU-sized defaults."""
    if args.prefill_patterns is not None and not (0 < args.prefill_patterns <= 1):
        raise InputError(f"--prefill-patterns is a block density in (0, 1], got {args.prefill_patterns}")
    if args.fast:
        s = Settings.fast(args.prefill_patterns)
    elif device == "cuda":
        s = Settings.gpu(args.prefill_patterns)
    else:
        s = Settings(prefill_density=args.prefill_patterns)
    if args.duo_steps is not None:
        if args.duo_steps < 1:
            raise InputError(f"--duo-steps must be at least 1, got {args.duo_steps}")
        s = dataclasses.replace(s, duo_steps=args.duo_steps)
    if args.ablation_time_limit is not None:
        if args.ablation_time_limit <= 0:
            raise InputError(f"--ablation-time-limit must be a positive number of seconds, got {args.ablation_time_limit}")
        s = dataclasses.replace(s, ablation_time_limit_s=args.ablation_time_limit)
    if args.ablation_text_weight is not None:
        if not (0 <= args.ablation_text_weight < math.inf):
            raise InputError(f"--ablation-text-weight must be a number >= 0, got {args.ablation_text_weight}")
        s = dataclasses.replace(s, ablation_text_weight=args.ablation_text_weight)
    if args.select_probes is not None:
        if args.select_probes < 1:
            raise InputError(f"--select-probes must be at least 1, got {args.select_probes}")
        s = dataclasses.replace(s, select_probes=args.select_probes)
    return s


def solver_menu(args: argparse.Namespace) -> QuantMenu | bool:
    """``solve``'s ``quantize``: the menu that ``--quantize`` (with ``--quant-global-key-bits``, ``--quant-residual``
    and ``--quant-2bit``) and ``--min-ring`` ask for, or False when neither does."""
    if not (args.quantize or args.min_ring):
        return False
    return QuantMenu(global_key_bits=args.quant_global_key_bits, residual=args.quant_residual,
                     two_bit=args.quant_2bit, quantized=args.quantize, min_ring=args.min_ring)


def parse_text_allowance(value: str | None, select_2bit: bool) -> float | None:
    """``--select-text-allowance``: nats (a number >= 0), ``off`` (None: no text term), or not given (the default,
    ``select.SELECT_TEXT_ALLOWANCE``). ``InputError`` for anything else, or when given without ``--select-2bit``."""
    if value is None:
        return SELECT_TEXT_ALLOWANCE
    if not select_2bit:
        raise InputError("--select-text-allowance bounds the text --select-2bit's rings may cost: give --select-2bit")
    if value.strip().lower() == "off":
        return None
    try:
        nats = float(value)
    except ValueError:
        raise InputError(f"--select-text-allowance takes nats (e.g. 0.05) or 'off', got {value!r}") from None
    check_text_allowance(nats)
    return nats


def run(args: argparse.Namespace) -> int:
    check_budget(args.budget)  # before loading anything: a bad budget fails in a blink
    if not args.quantize and (args.quant_global_key_bits != 4 or args.quant_residual != 128 or args.quant_2bit):
        raise InputError("--quant-global-key-bits, --quant-residual and --quant-2bit choose among the quantized "
                         "options: give --quantize too")
    quantize = solver_menu(args)  # a bad residual or ring fails before loading
    if args.target_len < 1:
        raise InputError(f"--target-len must be a positive number of tokens, got {args.target_len}")
    from headwise.eval.runner import parse_length

    select_under = parse_budgets(args.select_under) if args.select_under is not None else ()
    check_select_under(args.budget, select_under, args.full_share)
    check_select_deals(args.select_deals)
    if args.select_2bit:
        check_select_2bit(quantize)
    text_allowance = parse_text_allowance(args.select_text_allowance, args.select_2bit)
    if args.select_lengths and not (select_under or args.select_deals or args.select_2bit):
        raise InputError("--select-lengths sets where the --select-under, --select-2bit or --select-deals candidates are "
                         "measured: give one of them")
    select_lengths = tuple(parse_length(x) for x in args.select_lengths.split(",") if x.strip())
    import torch

    settings = _settings(args, args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.act_objective is not None and not args.act:
        raise InputError(f"--act-objective {args.act_objective} says what --act measures: add --act")
    if args.act and args.from_scores:
        raise InputError("--act measures each full head's loss with and without ACT; it cannot run with --from-scores "
                         "(which measures nothing): drop one of them")
    if args.ablation_base != "full" and (args.from_scores or args.method != "ablation"):
        raise InputError(f"--ablation-base {args.ablation_base} sets the base the ablation ranking is measured on: it "
                         "needs --method ablation and no --from-scores (a re-solve measures nothing; its ranking's base "
                         "is in the source plan's meta.ablation.base)")
    if args.ablation_switch != "streaming" and (args.from_scores or args.method != "ablation" or args.full_share is None
                                                 or args.select_under is not None or args.select_deals
                                                 or args.select_2bit):
        raise InputError(f"--ablation-switch {args.ablation_switch} needs --method ablation and --full-share, without "
                         "--from-scores, --select-under, --select-2bit or --select-deals (the plan selection judges "
                         "streaming plans)")
    if args.min_ring and args.ablation_switch != "streaming":
        raise InputError(f"--min-ring sets the ring the ablation ranking switches heads to; it cannot be combined with "
                         f"--ablation-switch {args.ablation_switch}")
    if settings.ablation_text_weight and (args.from_scores or args.method != "ablation"):
        raise InputError("--ablation-text-weight weighs a term of the ablation ranking's loss: it needs --method ablation "
                         "and no --from-scores")
    if args.train_gates and (args.from_scores or args.prefill_patterns is None):
        raise InputError("--train-gates needs --prefill-patterns DENSITY (the gate competes with the other prefill "
                         "patterns at that density) and cannot run with --from-scores")
    if args.full_heads != "full" and (args.act or args.prefill_patterns is not None or args.tp != 1):
        raise InputError(f"--full-heads {args.full_heads} runs the full heads as another policy: it cannot be combined "
                         "with --act or --prefill-patterns (which change how full heads run) or --tp (a placement of "
                         "full heads' bytes)")
    out = Path(args.output)
    if out.is_dir():
        raise InputError(f"-o {out} is a directory; give a plan file name such as {out / 'plan.json'}")
    fit_lengths = tuple(parse_length(x) for x in args.fit_lengths.split(",") if x.strip())
    t0 = time.perf_counter()
    try:
        lm = load_from_args(args)
        check_tp(lm.spec, args.tp)
        if args.from_scores:
            plan = resolve_from_scores(lm, HeadPlan.load(args.from_scores), args.budget, args.target_len,
                                       args.method, command_line(args), full_share=args.full_share,
                                       select_probes=settings.select_probes, quantize=quantize, ranks=args.tp,
                                       fit_lengths=fit_lengths, select_under=select_under,
                                       select_lengths=select_lengths, progress=not args.no_progress,
                                       select_deals=args.select_deals, select_2bit=args.select_2bit,
                                       select_text_allowance=text_allowance,
                                       select_text_tokens=settings.select_text_tokens)
        else:
            plan = profile_model(lm, args.budget, args.target_len, args.method,
                                 settings, progress=not args.no_progress,
                                 command=command_line(args), full_share=args.full_share, quantize=quantize,
                                 act=(args.act_objective or "text") if args.act else False,
                                 train_seer_gates=args.train_gates, ranks=args.tp,
                                 fit_lengths=fit_lengths, ablation_base=args.ablation_base,
                                 select_under=select_under, select_lengths=select_lengths,
                                 ablation_switch=args.ablation_switch, select_deals=args.select_deals,
                                 select_2bit=args.select_2bit, select_text_allowance=text_allowance)
            plan.meta["timings_s"]["total_s"] = round(time.perf_counter() - t0, 2)
        if args.full_heads != "full":
            plan = plan.replaced("full", FULL_HEADS[args.full_heads])
            plan.meta["full_heads"] = FULL_HEADS[args.full_heads]
        plan.save(out)
        png = out.with_suffix(".png")
        draw_plan(plan, lm.spec, str(png))
    except KeyboardInterrupt:
        print(f"\nheadwise profile: interrupted; no plan written to {out}", file=sys.stderr)
        return 130
    sol = plan.meta["solution"]
    if plan.meta.get("selection", {}).get("by") == "budget":
        print_selection(plan.meta["selection"])
    if "select_2bit" in plan.meta:
        print_rings(plan.meta["select_2bit"])
    if "select_deals" in plan.meta:
        print_deals(plan.meta["select_deals"])
    print(f"wrote {out} ({plan.summary(lm.spec, args.target_len)}; {sol['kv_tokens']} of {sol['cap_tokens']} "
          f"allowed KV slots) and {png} in {time.perf_counter() - t0:.0f} s")
    if args.full_heads == "longheads" and (limit := plan.max_context(lm.spec)) is not None:
        print(f"note: the plan's streaming heads on global layers keep it within the model's context ({limit} tokens): "
              "their sinks are as far from the query as the context is long; LongHeads alone runs past it (a larger "
              "--budget leaves fewer streaming heads)")
    return 0
