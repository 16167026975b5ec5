"""Diagnostic: how much of the attention dense gives the needle would LongHeads' chunk choice keep, per choice rule.

Every query from the end of the haystack (the question) to the one predicting the answer's last token (the answer
teacher-forced), in each global layer and *each query head*, weighted by the attention dense gives the needle
sentence's tokens (dense: the model's own forward, every layer's mask built by headwise's probe attention, so Gemma
3's sliding layers keep their window). For a choice
rule, the *needle mass kept* is the share of that attention falling on chunks the rule lets the query read (the first
chunk, its ``top_k`` chosen, the previous and its own). Rules: chunk scores ``paper`` (the attention-pooled
representative key), ``bound`` (Quest's page bounds), ``local`` (each chunk's best key at the paper's positions:
``chunk_score="max"``) or ``exact`` (its best key at the true positions: a reference), chosen per KV head (``kv``: the group's query heads summed,
as ``policies/longheads.py`` does) or per query head (``head``: each query head scores with its own representative
and chooses its own chunks, the paper's rule on an MHA model), at ``top_k`` chunks. It also reports where dense's
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
from headwise.policies.longheads import chunk_representatives
from headwise.profile.probe import probe_attention
from headwise.rope import rotate

RECORDED: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = {}
GLOBAL_LAYERS: set[int] = set()
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


def chunk_scores(score: str, per: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 rope: torch.Tensor, pos: torch.Tensor, C: int, page: int = 16) -> torch.Tensor:
    """Scores ``[Hq, P, n]`` of the ``n`` complete chunks for the queries at ``pos`` (``q: [1, Hq, T, D]``, ``k, v:
    [1, Hkv, T, D]`` as the model rotated them); with ``per="kv"`` every query head of a group gets the group's sum."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    G = Hq // Hkv
    n = int(pos.max()) // C
    if score == "paper":
        if per == "kv":
            reps = chunk_representatives(q[:, :, : n * C], k[:, :, : n * C], v[:, :, : n * C], 0, C, scale, rope)
            reps = reps.repeat_interleave(G, dim=1)[0]  # [Hq, n, D]
        else:
            reps = torch.cat([chunk_representatives(q[:, h : h + 1, : n * C], k[:, h // G : h // G + 1, : n * C],
                                                    v[:, h // G : h // G + 1, : n * C], 0, C, scale, rope)
                              for h in range(Hq)], dim=1)[0]
        q_pre = rotate(q[0][:, pos], -pos, rope).float()  # [Hq, P, D], before RoPE
        s = torch.einsum("hpd,hnd->hpn", q_pre, reps)
    elif score in ("exact", "local"):  # each page's largest logit: at the true positions (what a bound can only
        # bound), or ("local") at the paper's positions: the query before RoPE against keys at their offsets in the chunk
        kk = k[0, :, : n * C].float().repeat_interleave(G, dim=0)
        qq = q[0][:, pos].float()
        if score == "exact":
            s = torch.einsum("hpd,htd->hpt", qq, kk)
        else:  # (R(c C - p) q) . (R(t) k) = q~ . R(t - c C) k: the query rotated once per chunk
            shift = (torch.arange(n) * C)[None, :] - pos[:, None]  # [P, n]
            qc = rotate(qq[:, :, None, :].expand(-1, -1, n, -1), shift, rope)  # [Hq, P, n, D]
            s = torch.einsum("hpnd,hncd->hpnc", qc, kk.view(Hq, n, C, D)).reshape(Hq, len(pos), n * C)
        s = s.view(Hq, len(pos), n, C // page, page).amax(-1)
        s = s.reshape(Hq, len(pos), n * C // page)
        if per == "kv":
            s = s.view(Hkv, G, len(pos), -1).sum(dim=1, keepdim=True).expand(-1, G, -1, -1).reshape(Hq, len(pos), -1)
        s = s.view(Hq, len(pos), n, C // page).amax(dim=-1)
    else:
        pages = k[0, :, : n * C].float().view(Hkv, n * C // page, page, D)
        kmin, kmax = (t.repeat_interleave(G, dim=0) for t in (pages.amin(dim=2), pages.amax(dim=2)))
        qq = q[0][:, pos].float()
        up = qq.clamp(min=0)
        s = torch.einsum("hpd,hrd->hpr", up, kmax) + torch.einsum("hpd,hrd->hpr", qq - up, kmin)
        s = s.view(Hq, len(pos), n, C // page)
        if per == "kv":
            s = s.view(Hkv, G, len(pos), n, C // page).sum(dim=1, keepdim=True).expand(-1, G, -1, -1, -1)
            s = s.reshape(Hq, len(pos), n, C // page)
        s = s.amax(dim=-1)
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
                            sc = chunk_scores(s, per, q, k, v, scale, rope, pos, C)
                            for t in tops:
                                m = chosen(sc, pos, C, t)[:, :, chunk_of]  # [Hq, P, needle tokens]
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
