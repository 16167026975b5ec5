"""Fidelity to dense over long real text: KL(dense ‖ plan), top-1 agreement and perplexity by position.

Both plans run the same token ids chunk by chunk, each with its own cache, and every statistic is reduced
per chunk: memory stays at ``chunk × vocab`` floats per plan whatever the length (at 8K tokens, Gemma 3's
262K vocabulary would need 8.6 GB per plan for the full ``[T, V]`` logits in fp32). The chunk is sized so a
chunk's fp32 logits stay under ``LOGIT_BUDGET`` floats (512 tokens for SmolLM2, 128 for Gemma 3); chunked
prefill equals one-shot prefill for every policy, so the chunk size changes no number.

Position buckets are powers of two: ``[0, 512)``, ``[512, 1K)``, ``[1K, 2K)``, ``[2K, 4K)``, ... A token's
bucket is the position of the token being *predicted*, so bucket ``[2K, 4K)`` measures how well the model
predicts tokens that have 2-4K tokens of context before them.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from headwise.engine import Engine
from headwise.errors import InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan

LOGIT_BUDGET = 2**25
"""fp32 logits held per plan per chunk (128 MiB): bounds memory for large vocabularies."""


def bucket_edges(length: int, first: int = 512) -> list[int]:
    """``[0, 512, 1024, 2048, ...]`` up to and including ``length``."""
    edges = [0]
    e = first
    while e < length:
        edges.append(e)
        e *= 2
    edges.append(length)
    return edges


def bucket_label(lo: int, hi: int) -> str:
    def k(n: int) -> str:
        return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)

    return f"{k(lo)}-{k(hi)}"


@dataclass
class _Acc:
    """Sums over predicted positions of one bucket."""

    n: int = 0
    nll_dense: float = 0.0
    nll_plan: dict[str, float] = field(default_factory=dict)
    kl: dict[str, float] = field(default_factory=dict)
    agree: dict[str, int] = field(default_factory=dict)


def text_ids(lm: LoadedModel, length: int, seed: int = 0) -> torch.Tensor:
    """``[1, length]`` token ids of Shakespeare from a seeded line start (BOS first if the tokenizer adds one)."""
    from headwise.data import shakespeare

    text = shakespeare(10**9)
    need = length * 7 + 4000
    if need >= len(text):
        raise InputError(f"the Shakespeare text holds about {len(text) // 5} tokens; {length} is too long")
    rng = random.Random(f"headwise:fidelity:{length}:{seed}")
    start = text.index("\n", rng.randrange(0, len(text) - need)) + 1
    ids = lm.tokenizer(text[start : start + need], add_special_tokens=True).input_ids[:length]
    if len(ids) < length:
        raise InputError(f"could not cut {length} tokens of text")
    return torch.tensor([ids], dtype=torch.long)


@torch.inference_mode()
def fidelity(lm: LoadedModel, plans: Mapping[str, HeadPlan], ids: torch.Tensor, progress: Any = None,
             chunk: int | None = None) -> dict[str, Any]:
    """Compare each plan with dense on ``ids: [1, T]``.

    Returns ``{"tokens": T, "buckets": [{"range": [lo, hi], "label", "tokens", "ppl_dense",
    "plans": {name: {"ppl", "kl", "top1"}}}], "overall": {"ppl_dense", "plans": {...}}}`` where ``kl`` is the
    mean KL(dense ‖ plan) in nats per token and ``top1`` the fraction of positions whose argmax agrees.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise InputError(f"fidelity takes one sequence [1, T], got shape {list(ids.shape)}")
    T = ids.shape[1]
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    chunk = chunk or max(16, min(512, LOGIT_BUDGET // vocab))
    dense = Engine(lm, HeadPlan.dense(lm.spec, lm.name), chunk_size=chunk)
    dense.check_length(T)
    # A plan equal to dense (same digest) is dense: reuse dense's logits instead of running it again.
    same = {name for name, plan in plans.items() if plan.digest() == dense.plan.digest()}
    engines = {name: Engine(lm, plan, chunk_size=chunk) for name, plan in plans.items() if name not in same}
    caches = {name: e.new_cache(1, reserve=T) for name, e in engines.items()}
    dense_cache = dense.new_cache(1, reserve=T)
    edges = bucket_edges(T)
    accs = [_Acc() for _ in range(len(edges) - 1)]
    ids = ids.to(lm.device)
    pos_bucket = torch.bucketize(torch.arange(T), torch.tensor(edges[1:-1]), right=True)
    for s in range(0, T, chunk):
        x = ids[:, s : s + chunk]
        L = x.shape[1]
        # Position p's logits predict token p+1; the last position of the text predicts nothing.
        n_pred = L if s + L < T else L - 1
        target = ids[0, s + 1 : s + 1 + n_pred]
        bucket = pos_bucket[s + 1 : s + 1 + n_pred]
        logp_d = torch.log_softmax(dense.forward(x, dense_cache, all_logits=True)[0, :n_pred].float(), dim=-1)
        nll_d = -logp_d.gather(1, target[:, None])[:, 0]
        top_d = logp_d.argmax(-1)
        p_d = logp_d.exp()
        per_plan = {name: (nll_d, torch.zeros_like(nll_d), torch.ones_like(top_d, dtype=torch.bool)) for name in same}
        for name, e in engines.items():
            logp = torch.log_softmax(e.forward(x, caches[name], all_logits=True)[0, :n_pred].float(), dim=-1)
            kl = (p_d * (logp_d - logp)).sum(-1)
            per_plan[name] = (-logp.gather(1, target[:, None])[:, 0], kl, (logp.argmax(-1) == top_d))
            del logp
        for b in bucket.unique().tolist():
            m = bucket == b
            acc = accs[b]
            acc.n += int(m.sum())
            acc.nll_dense += float(nll_d[m].sum())
            for name, (nll, kl, agree) in per_plan.items():
                acc.nll_plan[name] = acc.nll_plan.get(name, 0.0) + float(nll[m].sum())
                acc.kl[name] = acc.kl.get(name, 0.0) + float(kl[m].sum())
                acc.agree[name] = acc.agree.get(name, 0) + int(agree[m].sum())
        if progress is not None:
            progress.update(L)

    def stats(accs_: list[_Acc]) -> dict[str, Any]:
        n = sum(a.n for a in accs_)
        out: dict[str, Any] = {"tokens": n, "ppl_dense": _ppl(sum(a.nll_dense for a in accs_), n), "plans": {}}
        for name in plans:
            out["plans"][name] = {
                "ppl": _ppl(sum(a.nll_plan.get(name, 0.0) for a in accs_), n),
                "kl": round(sum(a.kl.get(name, 0.0) for a in accs_) / max(1, n), 6),
                "top1": round(sum(a.agree.get(name, 0) for a in accs_) / max(1, n), 6),
            }
        return out

    buckets = []
    for i, acc in enumerate(accs):
        if acc.n:
            lo, hi = edges[i], edges[i + 1]
            buckets.append({"range": [lo, hi], "label": bucket_label(lo, hi)} | stats([acc]))
    return {"tokens": T, "chunk": chunk, "buckets": buckets, "overall": stats(accs)}


def _ppl(nll_sum: float, n: int) -> float:
    return round(math.exp(nll_sum / n), 4) if n else float("nan")
