"""Diagnostic: how much of the attention dense gives the needle would LongHeads' chunk choice keep, per choice rule.

Every query from the end of the haystack (the question) to the one predicting the answer's last token (the answer
teacher-forced), in each global layer and *each query head*, weighted by the attention dense gives the needle
sentence's tokens (dense: the model's own forward, every layer's mask built by headwise's probe attention, so Gemma
3's sliding layers keep their window). For a choice
rule, the *needle mass kept* is the share of that attention falling on chunks the rule lets the query read (the first
chunk, its ``top_k`` chosen, the previous and its own). Rules: the ``longheads`` policy's own choice (its
store filled with the recorded queries, keys and values) under chunk scores ``paper`` (the attention-pooled
representative key), ``bound`` (Quest's page bounds) or ``local`` (``chunk_score="max"``: each chunk's best key at
the paper's positions), chosen per KV head (``kv``: ``choose_per="kv_head"``) or per query head (``head``:
``"query_head"``), at ``top_k`` chunks; and ``exact`` (each chunk's best key at the true positions, a reference no
policy offers). It also reports where dense's
needle attention peaks (which layer, head and query), which says whether the model reads the needle while reading the
question or at the answer step.

    PYTHONPATH=src python bench/experiments/longheads_head_choice.py OUT.json --model gemma3-270m --length 8192 \\
        --tasks needle --per-depth 2

A diagnostic of the choice on prompts within the trained length (dense's attention is the reference), not an
accuracy.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from typing import Any

import torch
from transformers import AttentionInterface

from headwise.attention import attention_implementation
from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.policies.longheads import ChunkStore, LongHeads
from headwise.profile.probe import probe_attention

RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
GLOBAL_LAYERS: set[int] = set()
POLICY_SCORE = {"local": "max"}
"""The rules' names here for the policy's ``chunk_score`` values (``local``: best key at the paper's positions)."""
COPY_MASS = 0.3
"""A (layer, head, answer query) whose dense attention on the needle sentence exceeds this is copying from it."""


def _record(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: Any,
            **kwargs: Any) -> Any:
    if module.layer_idx in GLOBAL_LAYERS:
        RECORDED[module.layer_idx] = (query.detach(), key.detach(), value.detach(), float(module.scaling))
    # headwise's probe attention builds each layer's own mask (causal, and Gemma 3's sliding window): transformers
    # builds none for a name it does not know, and SDPA without one would run every layer as a global one
    return probe_attention(module, query, key, value, None, **kwargs)


AttentionInterface.register("headwise_record_qkv", _record)


def policy(score: str, per: str, top_k: int, C: int) -> LongHeads:
    return LongHeads(chunk_size=C, top_k=top_k, chunk_score=POLICY_SCORE.get(score, score),
                     choose_per="query_head" if per == "head" else "kv_head")


def filled_store(lh: LongHeads, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 rope: torch.Tensor) -> ChunkStore:
    """The policy's store holding the recorded ``q: [1, Hq, T, D]``, ``k, v: [1, Hkv, T, D]`` (as the model rotated
    them): keys, values and what its chunk scores keep."""
    store = lh.make_store(1, k.shape[1], k.shape[-1], k.device, torch.float32)
    store.reserve(k.shape[2])
    store.append(k.float(), v.float())
    store.commit_queries(q.float(), 0, scale, rope)
    return store


def policy_choice(lh: LongHeads, store: ChunkStore, q: torch.Tensor, pos: torch.Tensor,
                  rope: torch.Tensor) -> torch.Tensor:
    """``[Hq, P, n_chunks_total]`` bool: the chunks the ``longheads`` policy itself lets each query at ``pos`` read."""
    Hq = q.shape[1]
    table = lh.choose(q[:, :, pos].float(), pos, store, rope)[0]  # [choosers, P, top_k + 3]
    table = table.repeat_interleave(Hq // table.shape[0], dim=0)
    mask = torch.zeros(Hq, len(pos), int(pos.max()) // lh.chunk_size + 1, dtype=torch.bool)
    return mask.scatter_(2, table, True)


def exact_scores(per: str, q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, C: int) -> torch.Tensor:
    """A reference no policy offers: each complete chunk's best logit at the true positions ``[Hq, P, n]`` for the
    queries at ``pos`` (what a bound can only bound); with ``per="kv"`` the group's query heads' maxima summed."""
    Hq, Hkv = q.shape[1], k.shape[1]
    G, n = Hq // Hkv, int(pos.max()) // C
    kk = k[0, :, : n * C].float().repeat_interleave(G, dim=0)
    s = torch.einsum("hpd,htd->hpt", q[0][:, pos].float(), kk).view(Hq, len(pos), n, C).amax(-1)
    if per == "kv":
        s = s.view(Hkv, G, len(pos), n).sum(dim=1, keepdim=True).expand(-1, G, -1, -1).reshape(Hq, len(pos), n)
    return s


def chosen(scores: torch.Tensor, pos: torch.Tensor, C: int, top_k: int) -> torch.Tensor:
    """``[Hq, P, n_chunks_total]`` bool: the chunks each query reads (first, ``top_k`` best of ``1 .. c_q - 2``,
    previous, own). ``n_chunks_total`` covers every position up to ``max(pos)``."""
    Hq, P, n = scores.shape
    cq = pos // C
    total = int(cq.max()) + 1
    r = torch.arange(n)
    s = scores.masked_fill(~((r[None, :] >= 1) & (r[None, :] <= cq[:, None] - 2))[None], -math.inf)
    top = s.topk(min(top_k, n), dim=-1).indices
    mask = torch.zeros(Hq, P, total, dtype=torch.bool)
    mask.scatter_(2, top, True)
    mask &= (torch.arange(total)[None, None, :] <= (cq[:, None] - 2)[None])  # topk over -inf rows picks junk
    for c in (torch.zeros_like(cq), cq - 1, cq):
        mask[:, torch.arange(P), c] = True
    return mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--tasks", default="needle")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--per-depth", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--top-k", default="13,29", help="comma-separated chunk counts to report")
    args = ap.parse_args()
    C = args.chunk
    tops = [int(t) for t in args.top_k.split(",")]
    lm = load_model(args.model, device="cpu", dtype=torch.float32)
    spec = lm.spec
    GLOBAL_LAYERS.update(i for i in range(spec.num_layers) if spec.native_window(i) is None)
    rules = [(s, p) for s in ("paper", "bound", "exact", "local") for p in ("kv", "head")]
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for task in args.tasks.split(","):
        for depth in (float(d) for d in args.depths.split(",")):
            for seed in range(args.per_depth):
                sample = make_sample(task, lm.tokenizer, args.length, depth, seed)
                full = sample.prompt + (": " if task != "passkey" else " ") + sample.answers[0]
                enc = lm.tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
                ids = enc.input_ids
                first = next(i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                             if b > a and a >= len(full) - len(sample.answers[0]))
                p_ans = first - 1
                n0, n1 = sample.meta["needle_token_span"]
                q_start = sample.meta["haystack_token_span"][1]
                pos = torch.arange(q_start, ids.shape[1] - 1)  # the question and every answer token's predictor
                RECORDED.clear()
                with torch.no_grad(), attention_implementation(lm.model, "headwise_record_qkv"):
                    lm.model(input_ids=ids, use_cache=False)
                row: dict[str, Any] = {"task": task, "depth": depth, "seed": seed, "tokens": ids.shape[1],
                                       "queries": [q_start, p_ans], "needle_span": [n0, n1],
                                       "needle_chunks": sorted({t // C for t in range(n0, n1)})}
                masses, kept = [], {f"{s}/{p}/{t}": [] for s, p in rules for t in tops}
                for layer, (q, k, v, scale) in sorted(RECORDED.items()):
                    G = q.shape[1] // k.shape[1]
                    logits = torch.einsum("hpd,hsd->hps", q[0][:, pos].float(),
                                          k[0].float().repeat_interleave(G, dim=0)) * scale
                    logits = logits.masked_fill(torch.arange(ids.shape[1])[None, None] > pos[None, :, None], -math.inf)
                    probs = torch.softmax(logits, dim=-1)  # [Hq, P, tokens]
                    on_needle = probs[:, :, n0:n1]  # [Hq, P, needle tokens]
                    masses.append(on_needle.sum(-1))
                    chunk_of = torch.arange(n0, n1) // C
                    rope = torch.tensor(spec.rope_inv_freq(layer))
                    with torch.no_grad():
                        for s, per in rules:
                            store = None if s == "exact" else filled_store(policy(s, per, 1, C), q, k, v, scale, rope)
                            for t in tops:
                                m = (chosen(exact_scores(per, q, k, pos, C), pos, C, t) if store is None
                                     else policy_choice(policy(s, per, t, C), store, q, pos, rope))
                                m = m[:, :, chunk_of]  # [Hq, P, needle tokens]
                                kept[f"{s}/{per}/{t}"].append((on_needle * m).sum(-1))
                mass = torch.stack(masses)  # [layers, Hq, P]
                layers = sorted(RECORDED)
                flat = int(mass.argmax())
                li, hi, pi = (flat // (mass.shape[1] * mass.shape[2]), flat // mass.shape[2] % mass.shape[1],
                              flat % mass.shape[2])
                row["dense_needle_mass"] = {"total": float(mass.sum()), "peak": float(mass.max()),
                                            "peak_at": {"layer": layers[li], "head": hi,
                                                        "query_from_answer": int(pos[pi]) - p_ans},
                                            "on_answer_queries": float(mass[:, :, p_ans - q_start :].sum())}
                row["kept"] = {}
                a = p_ans - q_start
                copying = mass[:, :, a:] > COPY_MASS  # (layer, head, answer query): a head copying from the needle
                row["copying_triples"] = int(copying.sum())
                for name, ks in kept.items():
                    km = torch.stack(ks)
                    held = km[:, :, a:] > 0.5 * mass[:, :, a:]
                    row["kept"][name] = {"share": float(km.sum() / mass.sum()),
                                         "peak_kept": bool(km[li, hi, pi] > 0.5 * mass[li, hi, pi]),
                                         "copying_kept": float((held & copying).sum() / max(1, int(copying.sum()))),
                                         "answer_steps_kept": float((held | ~copying).all(0).all(0).float().mean())}
                rows.append(row)
                print(f"{task} d{depth} s{seed}: needle mass {row['dense_needle_mass']['total']:.2f} peak "
                      f"{row['dense_needle_mass']['peak']:.2f} at {row['dense_needle_mass']['peak_at']}; kept "
                      + ", ".join(f"{n} {r['share']:.2f}/{r['answer_steps_kept']:.2f}" for n, r in row["kept"].items())
                      + f" ({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for task in args.tasks.split(","):
        sub = [r for r in rows if r["task"] == task]
        summary[task] = {name: {"mean_share_kept": sum(r["kept"][name]["share"] for r in sub) / len(sub),
                                "peak_kept": sum(r["kept"][name]["peak_kept"] for r in sub),
                                "copying_kept": sum(r["kept"][name]["copying_kept"] * r["copying_triples"] for r in sub)
                                / max(1, sum(r["copying_triples"] for r in sub)),
                                "answer_steps_kept": sum(r["kept"][name]["answer_steps_kept"] for r in sub) / len(sub),
                                "prompts": len(sub)}
                         for name in sub[0]["kept"]}
    print(summary)
    note = (f"chunk {C}, top_k {tops}: every query from the haystack's end to the one predicting the answer's last "
            "token (teacher-forced), each global layer and query head; share = attention dense gives the needle "
            "sentence that falls on chunks the rule lets the query read, over all such queries; peak_kept = the "
            "(layer, head, query) of dense's largest needle attention keeps more than half of it; copying_kept = of the "
            f"(layer, head, answer query) triples putting > {COPY_MASS} of dense attention on the needle, the share the "
            "rule keeps more than half of; answer_steps_kept = answer tokens whose every copying triple is kept")
    write_result(result_doc("python " + shlex.join(sys.argv), {"note": note, "summary": summary, "rows": rows},
                            torch.device("cpu")), args.out)


if __name__ == "__main__":
    main()
