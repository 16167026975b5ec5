"""How close is the first answer token? For ``headwise eval --export-prompts`` prompts, the next-token logits after
the whole prompt under dense (or a plan) in each dtype, and the margin between the best token that starts the answer
and the best token that does not (``margin > 0``: greedy decoding starts the answer).

SmolLM2's 2K passkey is decided at that token: the model continues "The pass key is" with " the pass key..." or
with the digits, and on many prompts the two are a fraction of a logit apart, so a change of numerics (bf16 on
another kernel, another library's forward) moves dense's accuracy on that cell. This measures how many prompts sit
that close, and how many change their first token between dtypes.

    headwise eval smollm2-135m --tasks passkey --lengths 2k --samples 100 --export-prompts prompts.jsonl
    PYTHONPATH=src python bench/experiments/passkey_first_token.py smollm2-135m prompts.jsonl OUT.json \\
        --dtypes float32,bfloat16 [--plans PLAN.json ...]

Each run after the first is also held to the first (dense in the first dtype): the largest logit difference and
KL(first ‖ this run) at that position, per prompt, averaged.

``rescore EARLIER.json OUT.json`` counts an earlier run's per-prompt records again with the argmax rule (runs before
2026-12-07 counted an exact tie of the margin, common in bf16 logits, as a wrong first token; greedy decoding's
argmax gives it to the lower token id).

A token "starts the answer" when its text, leading spaces kept, is a non-empty prefix of " " + the answer (a lone
space included: the model may write the space and the digits apart).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def starts_answer(token: str, answer: str) -> bool:
    """Whether ``token``'s text is a non-empty prefix of ``" " + answer``."""
    return bool(token) and (" " + answer).startswith(token)


def answer_start_ids(answer: str, vocab: list[str]) -> list[int]:
    """Ids of the tokens whose text starts the answer (``starts_answer``)."""
    return [i for i, t in enumerate(vocab) if starts_answer(t, answer)]


def margin(logits: torch.Tensor, good: list[int]) -> tuple[float, int]:
    """(best answer-start logit - best other logit, argmax id)."""
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[good] = True
    best_good = logits[mask].max()
    best_other = logits[~mask].max()
    return float(best_good - best_other), int(logits.argmax())


def summary(margins: list[float], right: list[bool]) -> dict[str, Any]:
    """``first_token_right``: prompts whose argmax starts the answer (what greedy decoding writes: an exact tie goes
    to the lower token id, as ``argmax`` breaks it); ``exact_ties``: margins of exactly 0, common in bf16 logits,
    ``margin_positive`` those above 0."""
    m = torch.tensor(margins)
    return {"n": len(margins), "first_token_right": sum(right), "margin_positive": int((m > 0).sum()),
            "exact_ties": int((m == 0).sum()),
            "within_0.1": int((m.abs() < 0.1).sum()), "within_0.5": int((m.abs() < 0.5).sum()),
            "within_1": int((m.abs() < 1.0).sum()), "median_abs": round(float(m.abs().median()), 4)}


def rescore(doc: dict[str, Any]) -> dict[str, Any]:
    """An earlier run's per-prompt records counted with the argmax rule (``summary``): per run, the prompts whose
    argmax (``top``) and, where recorded, generate()'s token start the answer, and the exact ties. Runs written
    before 2026-12-07 counted a prompt right only where its margin was above 0, an exact tie as wrong."""
    per_prompt = doc["results"]["per_prompt"]
    runs = sorted({k for p in per_prompt.values() for k in p if k != "answers"})
    out: dict[str, Any] = {}
    for run in runs:
        rows = [(p[run], p["answers"][0]) for p in per_prompt.values() if run in p]
        out[run] = summary([e["margin"] for e, _ in rows], [starts_answer(e["top"], a) for e, a in rows])
        gen = [starts_answer(e["generate"], a) for e, a in rows if "generate" in e]
        if gen:
            out[run]["generate_first_token_right"] = sum(gen)
            out[run]["generate_token_is_argmax"] = sum(e["generate"] == e["top"] for e, _ in rows if "generate" in e)
        out[run]["exact_ties_by_argmax"] = dict(sorted(Counter(e["top"] for e, _ in rows if e["margin"] == 0).items()))
    return out


def main(argv: list[str] | None = None) -> None:
    from headwise.bench.record import result_doc, write_result

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rescore"]:  # rescore EARLIER.json OUT.json
        if len(argv) != 3:
            raise SystemExit("usage: passkey_first_token.py rescore EARLIER.json OUT.json")
        earlier = json.loads(Path(argv[1]).read_text())
        by = rescore(earlier)
        write_result(result_doc("python bench/experiments/passkey_first_token.py " + " ".join(argv),
                                {"rescored": argv[1], "command_of_the_run": earlier.get("command"),
                                 "device_of_the_run": earlier.get("device"), "by": by}, device="cpu"), argv[2])
        print(json.dumps(by, indent=1))
        return
    from headwise.engine import Engine
    from headwise.models import load_model
    from headwise.plan import HeadPlan
    from headwise.profile.select import text_kl

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("prompts", type=Path, help="a `headwise eval --export-prompts` file")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--plans", nargs="*", type=Path, default=[], help="plan files (dense is always run)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    ap.add_argument("--generate", action="store_true",
                    help="also the first token the engine's own generate() picks (the evaluation's path: prompt "
                         "chunks through Engine.step), per engine run: 'generate_first_token_right', and the margin "
                         "and distance to the first run of the logits it picks it from ('generate_*')")
    ap.add_argument("--transformers", action="store_true",
                    help="also transformers' own forward of the loaded model (row 'transformers'), beside the engine's")
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in args.prompts.read_text().splitlines() if line.strip()]
    if args.limit:
        rows = rows[:args.limit]
    results: dict[str, Any] = {"prompts": str(args.prompts), "n": len(rows), "by": {}}
    keys = [f"{r['depth']},{r['seed']},{r['idx']}" for r in rows]
    per_prompt: dict[str, dict[str, Any]] = {k: {"answers": r["answers"]} for k, r in zip(keys, rows)}
    vocab: list[str] = []  # the tokenizer's, decoded once
    good: list[list[int]] = []  # per prompt, the ids that start its answer
    reference: dict[str, torch.Tensor] = {}
    t0 = time.perf_counter()
    cmd = "python bench/experiments/passkey_first_token.py " + " ".join(argv)

    def write(partial: bool) -> None:
        done = list(results["by"])
        if len(done) > 1:  # prompts whose first token changes between the first run and each other
            results["first_token_changes_vs_" + done[0]] = {
                k: sum(p[done[0]]["right"] != p[k]["right"] for p in per_prompt.values())
                for k in done[1:]}
        results["per_prompt"] = per_prompt
        results["seconds"] = round(time.perf_counter() - t0, 1)
        results["partial"] = partial
        write_result(result_doc(cmd, results, device=args.device), args.out)

    for dtype in args.dtypes.split(","):
        lm = load_model(args.model, device=args.device, dtype=dtype)
        if not vocab:
            vocab = [lm.tokenizer.decode([i]) for i in range(len(lm.tokenizer))]
            good = [answer_start_ids(r["answers"][0], vocab) for r in rows]
        runs: list[tuple[str, Any]] = [("dense", Engine(lm, None))]
        if args.transformers:
            runs.append(("transformers", None))
        runs += [(p.stem, Engine(lm, HeadPlan.load(p))) for p in args.plans]
        for name, engine in runs:
            margins: list[float] = []
            rights: list[bool] = []
            diffs: list[float] = []
            kls: list[float] = []
            for key, r, starts in zip(keys, rows, good):
                ids = torch.tensor([r["input_ids"]])
                if engine is None:
                    with torch.inference_mode():
                        logits = lm.model(input_ids=ids.to(lm.device), logits_to_keep=1).logits[0, -1].float().cpu()
                else:
                    logits = engine.logits(ids, positions=torch.tensor([ids.shape[1] - 1]))[0, -1].float().cpu()
                m, top = margin(logits, starts)
                margins.append(m)
                rights.append(top in starts)
                if key not in reference:  # the first run (dense in the first dtype) is what the others are held to
                    reference[key] = logits
                ref = reference[key]
                diffs.append(float((logits - ref).abs().max()))
                kls.append(text_kl(ref.log_softmax(-1), logits.log_softmax(-1)))
                per_prompt[key][f"{name}/{dtype}"] = {
                    "margin": round(m, 4), "top": vocab[top], "right": top in starts}
            if args.generate and engine is not None:
                gen_margins: list[float] = []
                gen_rights: list[bool] = []
                gen_diffs: list[float] = []
                gen_kls: list[float] = []
                seen: list[torch.Tensor] = []  # the logits generate() samples its first token from
                sample = engine._sample

                def spy(rows_: list[Any], sample: Any = sample, seen: list[torch.Tensor] = seen) -> Any:
                    seen.extend(lg.float().cpu() for _, lg in rows_)
                    return sample(rows_)

                engine._sample = spy  # type: ignore[method-assign]  # a diagnostic's look at the step's logits
                for key, r, starts in zip(keys, rows, good):
                    seen.clear()
                    first = next(ev.token_id for ev in engine.generate(r["input_ids"], max_new_tokens=1,
                                                                         temperature=0.0) if ev.token_id >= 0)
                    entry = per_prompt[key][f"{name}/{dtype}"]
                    entry["generate"] = vocab[first]
                    m, _ = margin(seen[0], starts)  # the logits of the first step: generate() always samples there
                    gen_margins.append(m)
                    gen_rights.append(first in starts)
                    entry["generate_margin"] = round(m, 4)
                    gen_diffs.append(float((seen[0] - reference[key]).abs().max()))
                    gen_kls.append(text_kl(reference[key].log_softmax(-1), seen[0].log_softmax(-1)))
                engine._sample = sample  # type: ignore[method-assign]
                # generate_first_token_right: the prompts whose sampled first token starts the answer
                gen = {"generate_" + k: v for k, v in summary(gen_margins, gen_rights).items()} | {
                        "generate_mean_max_abs_logit_diff_vs_first": round(sum(gen_diffs) / len(gen_diffs), 4),
                        "generate_mean_kl_first_to_this_nats": round(sum(gen_kls) / len(gen_kls), 6)}
            else:
                gen = {}
            results["by"][f"{name}/{dtype}"] = summary(margins, rights) | gen | {
                "max_abs_logit_diff_vs_first": round(max(diffs), 4),
                "mean_max_abs_logit_diff_vs_first": round(sum(diffs) / len(diffs), 4),
                "mean_kl_first_to_this_nats": round(sum(kls) / len(kls), 6)}
            print(name, dtype, results["by"][f"{name}/{dtype}"], flush=True)
            write(partial=True)  # a long CPU run keeps what it has measured if it is cut short
    write(partial=False)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
