"""Diagnostic: where LongHeads' chunk scores rank the chunk that holds the answer, on the bundled weights.

On the H200 (docs/ARCHITECTURE.md) Gemma 3 under ``longheads`` found passkeys past its trained length but lost most
needles. A query past the window attends the first chunk, the previous and its own, and the ``top_k`` best-scored
chunks; if the chunk holding the answer's tokens is not among them, no head of that layer can copy it. This runs
each prompt once densely through the model (transformers' SDPA, fp32), records the global layers' queries and keys
(after RoPE), fills a ``longheads`` store per scoring rule, and reports for the query that predicts the answer's
first token (the prompt followed by the answer, teacher-forced) the rank of
the answer's chunk among the candidate chunks (1 = best) under the paper's scores, under ``chunk_score="bound"`` and
by the attention the query really gives each chunk densely (``attention``: what an ideal choice would follow), per
global layer, and whether it is in the ``top_k`` of any of them.

    PYTHONPATH=src python bench/experiments/longheads_chunk_rank.py OUT.json --model gemma3-270m --length 8192 \\
        --tasks needle,passkey --per-depth 2

A diagnostic of the choice, not an accuracy: prompts where the model does not answer densely count the same.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from headwise.attention import attention_implementation
from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.policies.longheads import LongHeads

RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}
GLOBAL_LAYERS: set[int] = set()


def _record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
            **kwargs: Any) -> Any:
    if module.layer_idx in GLOBAL_LAYERS:
        RECORDED[module.layer_idx] = (query.detach(), key.detach(), float(module.scaling))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("headwise_record_qk", _record)


def ranks(policy: LongHeads, q: torch.Tensor, k: torch.Tensor, scale: float, rope: torch.Tensor,
          answer_chunk: int, p: int) -> tuple[int, int]:
    """(rank of ``answer_chunk`` among the candidates for the query at ``p``, number of candidates)."""
    store = policy.make_store(1, k.shape[1], k.shape[-1], k.device, torch.float32)
    T = k.shape[2]
    store.reserve(T)
    store.append(k.float(), k.float())  # values are not scored: keys stand in
    store.commit_queries(q.float(), 0, scale, rope)
    scores = policy.chunk_scores(q[:, :, p : p + 1].float(), torch.tensor([p]), store, rope)[0, :, 0]  # [Hkv, R]
    cq = p // policy.chunk_size
    cand = scores[:, 1 : cq - 1].sum(dim=0)  # one KV head on Gemma 3; summed otherwise
    order = torch.argsort(cand, descending=True).tolist()
    return order.index(answer_chunk - 1) + 1, len(order)


def oracle_rank(q: torch.Tensor, k: torch.Tensor, scale: float, chunk: int, answer_chunk: int, p: int) -> int:
    """Rank of ``answer_chunk`` among the candidates by the attention the query at ``p`` really gives each chunk
    (dense causal softmax at the true positions, summed over the query heads of the KV head and the chunk's keys)."""
    G = q.shape[1] // k.shape[1]
    logits = torch.einsum("bhd,bhsd->bhs", q[:, :, p].float(), k[:, :, : p + 1].float().repeat_interleave(G, dim=1))
    mass = torch.softmax(logits * scale, dim=-1)[0].sum(dim=0)  # [p + 1]
    cq = p // chunk
    per_chunk = mass[: cq * chunk].view(cq, chunk).sum(dim=-1)[1 : cq - 1]
    return torch.argsort(per_chunk, descending=True).tolist().index(answer_chunk - 1) + 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--tasks", default="needle,passkey")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--per-depth", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=13)
    args = ap.parse_args()
    lm = load_model(args.model, device="cpu", dtype=torch.float32)
    spec = lm.spec
    GLOBAL_LAYERS.update(i for i in range(spec.num_layers) if spec.native_window(i) is None)
    rules = {"paper": LongHeads(chunk_size=args.chunk, top_k=args.top_k),
             "bound": LongHeads(chunk_size=args.chunk, top_k=args.top_k, chunk_score="bound")}
    rows = []
    t0 = time.time()
    for task in args.tasks.split(","):
        for depth in (float(d) for d in args.depths.split(",")):
            for seed in range(args.per_depth):
                sample = make_sample(task, lm.tokenizer, args.length, depth, seed)
                # The prompt followed by the answer as dense writes it (": VALUE" after a needle question, " VALUE"
                # after the passkey's); the query scored is the one that predicts the answer's first token.
                full = sample.prompt + (": " if task != "passkey" else " ") + sample.answers[0]
                enc = lm.tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
                ids = enc.input_ids
                first = next(i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                             if b > a and a >= len(full) - len(sample.answers[0]))
                p = first - 1
                # The queried needle's value (the passkey task records only the needle sentence's span)
                queried = [n for n in sample.meta.get("needles", [])
                           if n["token_span"] == sample.meta["needle_token_span"]]
                span = queried[0]["value_token_span"] if queried else sample.meta["needle_token_span"]
                answer_chunk = span[0] // args.chunk
                RECORDED.clear()
                with torch.no_grad(), attention_implementation(lm.model, "headwise_record_qk"):
                    lm.model(input_ids=ids, use_cache=False)
                row: dict[str, Any] = {"task": task, "depth": depth, "seed": seed, "tokens": ids.shape[1],
                                       "query_position": p, "answer_chunk": answer_chunk}
                for name, policy in rules.items():
                    per_layer = {}
                    for layer, (q, k, scale) in sorted(RECORDED.items()):
                        rope = torch.tensor(spec.rope_inv_freq(layer))
                        per_layer[layer] = ranks(policy, q, k, scale, rope, answer_chunk, p)
                    row[name] = {"rank_by_layer": {str(L): r for L, (r, _) in per_layer.items()},
                                 "candidates": next(iter(per_layer.values()))[1],
                                 "in_top_k_any_layer": any(r <= args.top_k for r, _ in per_layer.values())}
                oracle = {str(L): oracle_rank(q, k, scale, args.chunk, answer_chunk, p)
                          for L, (q, k, scale) in sorted(RECORDED.items())}
                row["attention"] = {"rank_by_layer": oracle, "candidates": row["paper"]["candidates"],
                                    "in_top_k_any_layer": any(r <= args.top_k for r in oracle.values())}
                rows.append(row)
                print(f"{task} depth {depth} seed {seed}: answer chunk {answer_chunk}; paper ranks "
                      f"{row['paper']['rank_by_layer']}, bound ranks {row['bound']['rank_by_layer']}, by dense "
                      f"attention {oracle} of {row['paper']['candidates']} ({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for task in args.tasks.split(","):
        sub = [r for r in rows if r["task"] == task]
        summary[task] = {name: {"in_top_k_any_layer": sum(r[name]["in_top_k_any_layer"] for r in sub),
                                "median_best_rank": statistics.median(min(r[name]["rank_by_layer"].values())
                                                                      for r in sub),
                                "prompts": len(sub)} for name in (*rules, "attention")}
    print(summary)
    note = (f"chunk {args.chunk}, top_k {args.top_k}: the query that predicts the answer's first token (prompt + the "
            "answer as dense writes it, teacher-forced); a rank <= top_k means some global layer's LongHeads head "
            "would attend the chunk holding the answer's first token at that step")
    write_result(result_doc("python " + shlex.join(sys.argv), {"note": note, "summary": summary, "rows": rows},
                            torch.device("cpu")), args.out)


if __name__ == "__main__":
    main()
