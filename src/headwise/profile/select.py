"""Choosing a plan by the retrieval it keeps, measured on the profiler's probes.

A deciding score (DuoAttention gates, retrieval scores) ranks the heads; how much of the budget goes to full
heads and how much to wider streaming windows is a separate choice, and next-token agreement on text is the
wrong judge of it (issue 19: a plan chosen that way kept 52% of dense's passkey). So the profiler solves a
few candidates (each ranking x a few shares of the budget for full heads), runs each on held-in retrieval
probes (``probes.retrieval_probe``, at the target length and twice it) with the answer fed in, and keeps the
one that answers the most probes exactly, the mean answer-token NLL breaking ties.

Each candidate runs as masks: a ``full`` head attends causally (inside the layer's native window), a
``streaming`` head to its sinks and window, which is what those policies compute token by token (the engine's
caches hold exactly the keys the masks allow). "Answers exactly" means every answer token is the argmax at
its position, i.e. greedy decoding would write the answer first.

The masks leave a ``quantized`` head's rounding out (it attends like ``full``) unless the forward is also given
the plan's rounding (``plan_rounding``): then the K/V of those heads at the positions a query would attend as codes
are quantized and dequantized with the store's own functions (``policies.quantized.fake_quantize``), per query as
the engine's chunked prefill and decode steps see them (``Quantized.codes_attended``), the rest exact. The
ablation ranking does so on a quantized base (``ablate.py``), and ``probe_losses`` for every plan it scores.

A ``knorm`` head (``policies/knorm.py``) keeps keys by their norms, so no mask fixed in advance says what it sees: its
mask is a ``full`` one, and the plan's rounding carries a ``KNormKeep`` per layer that ``plan_mask_attention`` turns,
from the keys of the forward itself, into what the store would hold when each query runs (the newest ``window``
before the query's chunk, and among the older ones the ``tokens`` of smallest norm), per sequence of the batch.

``--select-under`` (``runner.select_under_budget``) judges another set of candidates the same way: the plans one
ranking gives at the budget and at smaller ones (``BudgetCandidate``), because a larger budget's plan can keep
less retrieval than a smaller one's (docs/profiling.md); ``choose_budget`` keeps the most exact answers, the
cheaper plan on a tie. ``--select-deals`` (``runner.select_among_deals``) judges the solved plan against re-deals of its
own policies over the heads (``DealCandidate``, same KV bytes); ``choose_deal`` keeps the most exact answers, the
solved plan on a tie, then the lower answer NLL. ``--select-2bit`` (``runner.select_2bit_rings``) judges the plan
against itself with heads it holds in 2-bit codes on rings (``RingCandidate``); ``choose_ring`` as ``choose_deal``.
A deal or a ring replaces the solved plan only where it answers more probes than chance would (``SELECT_ALPHA``,
``versus_plan``): the probes are few, and a move on a difference of a few of them can cost what they do not test.
A ring must also keep the text: its KL from dense on held-in text may exceed the plan's by at most
``SELECT_TEXT_ALLOWANCE`` nats (``within_text``; ``plan_text_logprobs`` runs a plan on text as ``probe_losses`` runs it
on probes), because the probes do not see what a ring costs the text.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from headwise.attention import attention_implementation
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan, resolve
from headwise.policies import Full, Policy
from headwise.policies.knorm import KNorm
from headwise.policies.quantized import Quantized, fake_quantize
from headwise.policies.streaming import Streaming
from headwise.profile.probe import allowed_mask
from headwise.spec import ModelSpec

PLAN_MASK_NAME = "headwise-planmask"


def plan_masks(spec: ModelSpec, policies: list[list[Policy]], length: int, device: torch.device) -> list[torch.Tensor]:
    """Per layer, bool ``[kv_heads, length, length]``: which keys each KV head's queries may see under the plan."""
    pos = torch.arange(length, device=device)
    out = []
    for i, row in enumerate(policies):
        base = allowed_mask(pos, pos, spec.native_window(i))
        heads = []
        for pol in row:
            if isinstance(pol, Quantized) and pol.window:  # a quantized sliding window (rounding left out)
                heads.append(base & (pos[:, None] - pos[None, :] < pol.window))
            elif isinstance(pol, Full | Quantized | KNorm):  # rounding and KNorm's choice: ``plan_rounding``'s
                heads.append(base)
            elif isinstance(pol, Streaming):
                heads.append(base & pol.allowed(pos[:, None], pos[None, :]))
            else:
                raise HeadwiseError(f"plan selection runs full, streaming, quantized and knorm heads only, not "
                                    f"'{pol.name}'")
        out.append(torch.stack(heads))
    return out


@dataclass(frozen=True)
class Rounding:
    """Heads of one layer that run one ``quantized`` policy, in a masked forward of ``seen.shape[0]`` tokens."""

    policy: Quantized
    heads: torch.Tensor
    """long ``[h]``: the layer's KV heads under ``policy``."""
    seen: torch.Tensor
    """long ``[T]``: per query position, how many leading positions it attends as codes (``codes_attended``)."""
    n: int
    """``seen``'s largest value (a multiple of ``policy.group``), kept on the host."""


@dataclass(frozen=True)
class KNormKeep:
    """Heads of one layer that run one ``knorm`` policy, in a masked forward of ``starts.shape[0]`` tokens."""

    policy: KNorm
    heads: torch.Tensor
    """long ``[h]``: the layer's KV heads under ``policy``."""
    starts: torch.Tensor
    """long ``[T]``: per query position, the first position of the step it runs in (its prompt chunk's first, or
    itself for a decode step): what the store holds then was decided by the tokens before it."""
    steps: tuple[int, ...]
    """``starts``' distinct values, in order, on the host (no device sync per layer of every forward)."""


Emulated = Rounding | KNormKeep
"""What a masked forward emulates of a plan beyond its masks, per layer (``plan_rounding``)."""


def plan_rounding(spec: ModelSpec, policies: list[list[Policy]], prompt_len: int, total: int, device: torch.device,
                  chunk: int, kernels: bool) -> list[list[Emulated]]:
    """Per layer, the plan's quantized heads grouped by policy (after ``plan.resolve``: a native sliding layer's
    residual may be shorter) for a masked forward of a ``prompt_len``-token prompt prefilled in chunks of ``chunk``
    and decode steps up to ``total`` tokens (``kernels``: the steps run on the decode kernel, as on a GPU); then its
    ``knorm`` heads grouped by policy (``KNormKeep``)."""
    from headwise.plan import resolve

    starts = _step_starts(prompt_len, total, chunk, device)
    steps = (*range(0, min(prompt_len, total), chunk), *range(prompt_len, total))
    out: list[list[Emulated]] = []
    for row in resolve(policies, spec):
        groups: dict[Quantized, list[int]] = {}
        keeps: dict[KNorm, list[int]] = {}
        for j, pol in enumerate(row):
            if isinstance(pol, Quantized):
                groups.setdefault(pol, []).append(j)
            elif isinstance(pol, KNorm):
                keeps.setdefault(pol, []).append(j)
        layer: list[Emulated] = []
        for pol, heads in groups.items():
            seen, n = _codes_attended(pol, prompt_len, total, chunk, kernels, device)
            if n:
                layer.append(Rounding(pol, torch.tensor(heads, device=device), seen, n))
        for kpol, heads in keeps.items():
            layer.append(KNormKeep(kpol, torch.tensor(heads, device=device), starts, steps))
        out.append(layer)
    return out


def _step_starts(prompt_len: int, total: int, chunk: int, device: torch.device) -> torch.Tensor:
    """Per position, the first position of the engine step that runs it: chunks of ``chunk`` over the prompt, one
    token per decode step after it."""
    pos = torch.arange(total, device=device)
    return torch.where(pos < prompt_len, pos - pos % chunk, pos)


def _knorm_masks(key: torch.Tensor, mask: torch.Tensor, keeps: list[KNormKeep]) -> torch.Tensor:
    """``mask: [Hkv, T, T]`` -> ``[B, Hkv, T, T]`` where each ``knorm`` head's query at ``p`` sees, of the keys before
    its step's start ``s``, only what its store holds then: the newest ``window`` and, before ``s - window``, the
    ``tokens`` of smallest key norm (ties: the older), per sequence of ``key: [B, Hkv, T, D]``."""
    B, T = key.shape[0], key.shape[2]
    out = mask[None].expand(B, *mask.shape).clone()
    cols = torch.arange(T, device=key.device)
    for g in keeps:
        norms = key[:, g.heads].float().norm(dim=-1)  # [B, h, T]
        sub = out[:, g.heads]  # a copy (advanced indexing), written back below
        for s in g.steps:
            older = max(0, s - g.policy.window)
            held = (cols >= older).expand(B, len(g.heads), T).clone()  # the window, the step itself and after
            if older and g.policy.tokens:
                # positions are in order, so a stable sort by norm puts the older of two equal norms first
                idx = torch.argsort(norms[..., :older], dim=-1, stable=True)[..., : g.policy.tokens]
                held.scatter_(2, idx, True)
            rows = g.starts == s
            sub[:, :, rows] &= held[:, :, None, :]
        out[:, g.heads] = sub
    return out


@lru_cache(maxsize=64)
def _codes_attended(policy: Quantized, prompt_len: int, total: int, chunk: int, kernels: bool,
                    device: torch.device) -> tuple[torch.Tensor, int]:
    """``policy.codes_attended`` on the device and its maximum, once per shape (the ablation asks for the same
    few at every one of its hundreds of forwards)."""
    seen = policy.codes_attended(prompt_len, total, chunk, kernels)
    return torch.tensor(seen, device=device), max(seen, default=0)


def _rounded(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
             groups: list[Rounding]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``key, value: [B, Hkv, T, D]`` and ``mask: [..., Hkv, T, T]`` -> keys and values ``[B, Hkv, n + T, D]`` (first
    the ``n`` oldest positions as their codes give them back, then every position exact) and the mask ``[..., Hkv,
    T, n + T]`` that lets each query see every allowed position once: as codes below ``seen[query]`` on a rounded
    head, exactly otherwise. One attention call, at the cost of ``n`` more keys."""
    n = max(g.n for g in groups)
    T = key.shape[2]
    kq, vq = key[:, :, :n].clone(), value[:, :, :n].clone()
    as_codes = torch.zeros(key.shape[1], T, n, dtype=torch.bool, device=key.device)
    cols = torch.arange(n, device=key.device)
    for g in groups:
        kq[:, g.heads, : g.n], vq[:, g.heads, : g.n] = fake_quantize(key[:, g.heads, : g.n], value[:, g.heads, : g.n],
                                                                     g.policy)
        as_codes[g.heads] = cols[None, :] < g.seen[:, None]
    exact = mask & ~F.pad(as_codes, (0, T - n))
    return torch.cat([kq, key], 2), torch.cat([vq, value], 2), torch.cat([mask[..., :n] & as_codes, exact], -1)


def plan_mask_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """A whole sequence under the plan's masks (keyword ``headwise_plan_masks``) and, if given, its quantized heads'
    rounding (``headwise_plan_rounding``: ``plan_rounding``'s). query: [B, Hq, T, D]; key, value: [B, Hkv, T, D].
    Returns ([B, T, Hq, D], None)."""
    masks: list[torch.Tensor] = kwargs["headwise_plan_masks"]
    layer = int(module.layer_idx)
    m = masks[layer]
    rounding: list[list[Emulated]] | None = kwargs.get("headwise_plan_rounding")
    if rounding is not None and rounding[layer]:
        keeps = [g for g in rounding[layer] if isinstance(g, KNormKeep)]
        rounded = [g for g in rounding[layer] if isinstance(g, Rounding)]
        if keeps:
            m = _knorm_masks(key, m, keeps)  # before the rounding adds its columns: the norms are of exact keys
        if rounded:
            key, value, m = _rounded(key, value, m, rounded)
    group = query.shape[1] // key.shape[1]
    m = m.repeat_interleave(group, dim=-3)
    m = m if m.dim() == 4 else m[None]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=m, enable_gqa=group > 1,
                                         scale=scaling if scaling is not None else query.shape[-1] ** -0.5)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(PLAN_MASK_NAME, plan_mask_attention)


@dataclass
class ProbeSet:
    ids: dict[int, torch.Tensor]
    """length -> [n, length + answer] prompt with the answer fed in (answers padded to one length by repetition)."""
    answer: dict[int, torch.Tensor]
    """length -> [n, A] answer token ids (-1 past a shorter answer)."""
    haystacks: dict[int, list[str]] = field(default_factory=dict)
    """length -> each probe's haystack (``probes.HAYSTACKS`` key), where known."""


def _answer_ids(tokenizer: Any, probe: Any) -> list[int] | None:
    """The answer's tokens as greedy decoding would write them after the prompt (None if they do not split off)."""
    tpl = probe.format.template
    sep = " " if " {value}" in tpl.fact else ""
    prompt = tokenizer.decode(probe.ids)
    whole = list(tokenizer(prompt + sep + probe.answer, add_special_tokens=False).input_ids)
    base = list(tokenizer(prompt, add_special_tokens=False).input_ids)
    if whole[: len(base)] != base or len(whole) == len(base):
        return None
    return whole[len(base):]


def probe_set(tokenizer: Any, lengths: list[int], n: int, seed: int = 1_000_003, distractors: int = 2) -> ProbeSet:
    """``n`` retrieval probes per length (depths spread over (0, 1)), each with its answer tokens; each asks for one
    of ``distractors + 1`` facts of one format (0: a single fact, as a passkey is)."""
    from headwise.probes import retrieval_probe

    ids: dict[int, torch.Tensor] = {}
    answers: dict[int, torch.Tensor] = {}
    haystacks: dict[int, list[str]] = {}
    for L in lengths:
        rows, ans, hay = [], [], []
        k = 0
        while len(rows) < n:
            p = retrieval_probe(tokenizer, L, (len(rows) + 0.5) / n, seed + k, distractors)
            k += 1
            a = _answer_ids(tokenizer, p)
            if a is None or len(p.ids) != L:
                continue
            rows.append(p.ids)
            ans.append(a)
            hay.append(p.format.haystack)
        width = max(len(a) for a in ans)
        ids[L] = torch.tensor([r + (a * width)[:width] for r, a in zip(rows, ans)])
        answers[L] = torch.tensor([a + [-1] * (width - len(a)) for a in ans])
        haystacks[L] = hay
    return ProbeSet(ids, answers, haystacks)


def probe_losses(lm: LoadedModel, policies: list[list[Policy]] | None, probes: ProbeSet,
                 batch: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Per probe (lengths in ``probes.ids`` order, then rows): whether every answer token is the argmax (greedy
    decoding writes the answer first) and the answer's summed token NLL, under the plan (``None``: dense), its
    quantized heads rounded as the engine's caches hold them (``plan_rounding``: prefill in ``DEFAULT_CHUNK``-token
    chunks, decode steps on the kernel on a GPU). Returns (bool ``[n]``, float ``[n]``) on the CPU."""
    hits, nll, _ = probe_outcomes(lm, policies, probes, batch)
    return hits, nll


def probe_outcomes(lm: LoadedModel, policies: list[list[Policy]] | None, probes: ProbeSet,
                   batch: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``probe_losses`` and, per probe, the token greedy decoding writes first after the prompt (long ``[n]``).
    Compared with dense's, the first tokens count the probes whose answer a plan starts differently, whether or not
    dense's start is right: fidelity at the decision point, which exact answers alone do not show (a plan can turn
    as many wrong first tokens right as right ones wrong)."""
    if policies is None:
        return _masked_probe_outcomes(lm, None, probes, batch)
    masks_for, rounding_for = _plan_forward(lm, policies)
    return _masked_probe_outcomes(lm, masks_for, probes, batch, rounding_for)


def _plan_forward(lm: LoadedModel, policies: list[list[Policy]],
                  ) -> tuple[Callable[[int], list[torch.Tensor]], Callable[[int, int], list[list[Emulated]]] | None]:
    """The plan's ``masks_for`` and ``rounding_for`` (None where no head is rounded), as ``probe_losses`` and
    ``plan_text_logprobs`` run it: prefill in ``DEFAULT_CHUNK``-token chunks, decode steps on the kernel on a GPU."""
    from headwise.engine import DEFAULT_CHUNK

    device = next(lm.model.parameters()).device
    rounding_for = None
    if any(isinstance(p, Quantized | KNorm) for row in policies for p in row):
        def rounding_for(prompt_len: int, total: int) -> list[list[Emulated]]:
            return plan_rounding(lm.spec, policies, prompt_len, total, device, DEFAULT_CHUNK, device.type == "cuda")
    return (lambda n: plan_masks(lm.spec, policies, n, device)), rounding_for


def plan_text_logprobs(lm: LoadedModel, policies: list[list[Policy]] | None, text: torch.Tensor, keep: int,
                       batch: int = 8) -> torch.Tensor:
    """``masked_text_logprobs`` under the plan (``None``: dense), its quantized heads rounded as ``probe_losses``
    rounds them (each row a prompt prefilled whole)."""
    if policies is None:
        return masked_text_logprobs(lm, None, text, keep, batch)
    masks_for, rounding_for = _plan_forward(lm, policies)
    return masked_text_logprobs(lm, masks_for, text, keep, batch, rounding_for)


def _masked_logits(model: torch.nn.Module, x: torch.Tensor, masks: list[torch.Tensor] | None,
                   rounding: list[list[Emulated]] | None, keep: int) -> torch.Tensor:
    """The logits of the last ``keep`` positions of ``x`` under ``masks`` (``plan_masks``' layout; None: dense) and
    ``rounding`` (``plan_rounding``'s; None: none)."""
    if masks is None:
        return model(input_ids=x, use_cache=False, logits_to_keep=keep).logits
    with attention_implementation(model, PLAN_MASK_NAME):
        return model(input_ids=x, use_cache=False, headwise_plan_masks=masks, headwise_plan_rounding=rounding,
                     logits_to_keep=keep).logits


@torch.no_grad()
def masked_probe_losses(lm: LoadedModel, masks_for: Callable[[int], list[torch.Tensor]] | None, probes: ProbeSet,
                        batch: int = 8, rounding_for: Callable[[int, int], list[list[Emulated]]] | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``probe_losses`` with the masks given by ``masks_for(sequence length)`` (``plan_masks``' layout; None:
    dense), for callers that assemble masks faster than from policies (``ablate.py``); ``rounding_for(prompt
    length, sequence length)``: the quantized heads' rounding (``plan_rounding``'s layout; None: none)."""
    hits, nll, _ = _masked_probe_outcomes(lm, masks_for, probes, batch, rounding_for)
    return hits, nll


@torch.no_grad()
def _masked_probe_outcomes(lm: LoadedModel, masks_for: Callable[[int], list[torch.Tensor]] | None, probes: ProbeSet,
                           batch: int = 8, rounding_for: Callable[[int, int], list[list[Emulated]]] | None = None,
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``masked_probe_losses`` and each probe's first greedy token (``probe_outcomes``)."""
    model = lm.model
    device = next(model.parameters()).device
    hit_rows, nll_rows, first_rows = [], [], []
    for L, ids in probes.ids.items():
        ans = probes.answer[L].to(device)
        A = ans.shape[1]
        masks = masks_for(L + A) if masks_for is not None else None
        rounding = rounding_for(L, L + A) if rounding_for is not None and masks is not None else None
        for s in range(0, ids.shape[0], batch):
            logits = _masked_logits(model, ids[s : s + batch].to(device), masks, rounding, A + 1)
            pred = logits[:, :A].float()  # position L-1+j predicts answer token j
            a = ans[s : s + batch]
            valid = a >= 0
            greedy = pred.argmax(-1)
            hit_rows.append(((greedy == a) | ~valid).all(-1).cpu())
            first_rows.append(greedy[:, 0].cpu())
            lp = torch.log_softmax(pred, -1).gather(-1, a.clamp(min=0)[..., None])[..., 0]
            nll_rows.append(-(lp * valid).sum(-1).cpu())
    if not hit_rows:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0), torch.zeros(0, dtype=torch.long)
    return torch.cat(hit_rows), torch.cat(nll_rows), torch.cat(first_rows)


@torch.no_grad()
def masked_text_logprobs(lm: LoadedModel, masks_for: Callable[[int], list[torch.Tensor]] | None, text: torch.Tensor,
                         keep: int, batch: int = 8,
                         rounding_for: Callable[[int, int], list[list[Emulated]]] | None = None) -> torch.Tensor:
    """Next-token log-probs (float ``[n, keep, vocab]``, on the model's device) at the last ``keep`` positions of
    each row of ``text`` (ids ``[n, T]``) under ``masks_for`` and ``rounding_for`` as in ``masked_probe_losses``; a
    row is one prompt (``rounding_for(T, T)``: prefilled, no decode step)."""
    model = lm.model
    device = next(model.parameters()).device
    T = text.shape[1]
    masks = masks_for(T) if masks_for is not None else None
    rounding = rounding_for(T, T) if rounding_for is not None and masks is not None else None
    out = [torch.log_softmax(_masked_logits(model, text[s : s + batch].to(device), masks, rounding, keep).float(), -1)
           for s in range(0, text.shape[0], batch)]
    return torch.cat(out)


def text_kl(dense: torch.Tensor, plan: torch.Tensor) -> float:
    """Mean KL(dense || plan) in nats per position, of two ``masked_text_logprobs``."""
    return float((dense.exp() * (dense - plan)).sum(-1).mean())


def answer_tokens(probes: ProbeSet) -> int:
    """Answer tokens over every probe (the padding of shorter answers left out): what a mean NLL is over."""
    return sum(int((a >= 0).sum()) for a in probes.answer.values())


def hits_by_haystack(probes: ProbeSet, hits: torch.Tensor) -> dict[str, int]:
    """Per haystack (``ProbeSet.haystacks``), how many of ``hits`` (bool over all probes, ``probe_losses`` order)
    are set; every haystack of the set appears, at 0 where none is."""
    hay = [h for L in probes.ids for h in probes.haystacks.get(L, [])]
    counts = dict.fromkeys(sorted(set(hay)), 0)
    for h, hit in zip(hay, hits.tolist()):
        counts[h] += bool(hit)
    return counts


def retrieval_on_probes(lm: LoadedModel, policies: list[list[Policy]] | None, probes: ProbeSet,
                        batch: int = 8) -> tuple[float, float]:
    """(share of probes answered exactly, mean answer-token NLL) under the plan (``None``: dense)."""
    hits, nll = probe_losses(lm, policies, probes, batch)
    return float(hits.float().mean()) if len(hits) else 0.0, float(nll.sum()) / max(1, answer_tokens(probes))


def subset(probes: ProbeSet, keep: torch.Tensor) -> ProbeSet:
    """The probes where ``keep`` (bool over all probes, in ``probe_losses`` order) is set; empty lengths dropped."""
    ids: dict[int, torch.Tensor] = {}
    answer: dict[int, torch.Tensor] = {}
    haystacks: dict[int, list[str]] = {}
    start = 0
    for L, x in probes.ids.items():
        k = keep[start : start + x.shape[0]]
        start += x.shape[0]
        if bool(k.any()):
            ids[L], answer[L] = x[k], probes.answer[L][k]
            if L in probes.haystacks:
                haystacks[L] = [h for h, kept in zip(probes.haystacks[L], k.tolist()) if kept]
    return ProbeSet(ids, answer, haystacks)


@dataclass
class Candidate:
    ranking: str
    full_share: float
    solution: Any
    accuracy: float = 0.0
    nll: float = 0.0

    def info(self) -> dict[str, Any]:
        return {"ranking": self.ranking, "full_share": self.full_share, "full_heads": len(self.solution.full_heads),
                "kv_fraction": round(self.solution.fraction, 4), "probe_accuracy": round(self.accuracy, 4),
                "probe_nll": round(self.nll, 4)}


def select(lm: LoadedModel, candidates: list[Candidate], probes: ProbeSet) -> tuple[Candidate, float]:
    """Score every candidate on ``probes``; returns the best and dense's accuracy on the same probes."""
    dense, _ = retrieval_on_probes(lm, None, probes)
    for c in candidates:
        c.accuracy, c.nll = retrieval_on_probes(lm, c.solution.policies, probes)
    best = max(candidates, key=lambda c: (round(c.accuracy, 6), -c.nll))
    return best, dense


def precision(policy: Policy) -> int | None:
    """How precisely a head under ``policy`` keeps its context, for comparing two plans head by head: streaming 0 <
    2-bit 1 < 4-bit keys over 2-bit values 2 < 4-bit 3 < 8-bit keys over 4-bit values 4 < 8-bit 5 < full 6; None for
    a policy the solver does not hand out.
    Streaming windows are left out: the solver spreads what is left of a budget over them, and a larger budget can
    leave less of it (on SmolLM2, 0.3 -> 0.375 turns heads 4-bit and shrinks two windows from 128 to 96 tokens)."""
    if isinstance(policy, Full):
        return 6
    if isinstance(policy, Quantized):
        return {(2, 2): 1, (4, 2): 2, (4, 4): 3, (8, 4): 4, (8, 8): 5}.get((policy.k_bits, policy.bits))
    if isinstance(policy, Streaming):
        return 0
    return None


def nested(plans: list[list[list[Policy]]]) -> bool:
    """Whether every head is kept at least as precisely (``precision``) in each plan as in the one before it."""
    for small, large in itertools.pairwise(plans):
        for row_s, row_l in zip(small, large):
            for a, b in zip(row_s, row_l):
                pa, pb = precision(a), precision(b)
                if pa is None or pb is None or pa > pb:
                    return False
    return True


def composition(policies: list[list[Policy]]) -> str:
    """``"15 full + 75 4-bit"``: the heads per kind of policy, the most precise first."""
    names = {6: "full", 5: "8-bit", 4: "8-bit keys", 3: "4-bit", 2: "4-bit keys over 2-bit", 1: "2-bit",
             0: "streaming"}
    counts: dict[str, int] = {}
    for row in policies:
        for p in row:
            r = precision(p)
            name = names[r] if r is not None else p.name
            counts[name] = counts.get(name, 0) + 1
    order = list(names.values())
    return " + ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: order.index(kv[0])
                                                      if kv[0] in order else len(order)))


def hit_string(hits: torch.Tensor) -> str:
    """Which probes were answered, '1' or '0' each, in ``probe_losses`` order (``probe_set``: length by length, each
    length's probes at depths (i + 0.5) / n), so a later reader can pair or slice them."""
    return "".join("1" if h else "0" for h in hits.tolist())


@dataclass
class PlanAsIs:
    """What ``BudgetCandidate.solution`` needs of a plan file scored as it is: its policies and KV fraction."""

    policies: list[list[Policy]]
    fraction: float


@dataclass
class BudgetCandidate:
    """One budget's plan solved from the shared ranking (``--select-under``), with what it keeps of the probes."""

    budget: float
    solution: Any
    answered: int = 0
    """Probes answered exactly (every answer token the argmax)."""
    by_length: dict[int, int] | None = None
    """Probe length -> probes answered exactly at that length."""
    by_haystack: dict[str, int] | None = None
    """Haystack -> probes answered exactly in it (``cycle``, repeated filler, is the evaluation's passkey regime)."""
    kept: int = 0
    """Of the probes dense answers exactly, those this plan answers too."""
    nll: float = 0.0
    """Mean answer-token NLL over all probes."""
    hits: torch.Tensor | None = field(default=None, repr=False)
    """Which probes it answers exactly (bool ``[n]``, ``probe_losses`` order), for pairing with another candidate."""
    text_kl: float | None = None
    """KL from dense on held-in text, nats per position (``plan_text_logprobs``), where measured."""
    first_flips: int | None = None
    """Probes whose first greedy token differs from dense's (``probe_outcomes``), where dense ran beside it."""

    @classmethod
    def from_plan(cls, plan: HeadPlan, spec: ModelSpec, length: int) -> BudgetCandidate:
        """A plan file scored as it is (not re-solved): its policies resolved for ``spec``; ``budget`` and the
        solution's ``fraction`` are the KV it holds at ``length`` at its peak, as a share of dense's."""
        frac = plan.kv_fraction(spec, length, peak=True)
        return cls(round(frac, 4), PlanAsIs(resolve(plan.policies(), spec), frac))

    def info(self) -> dict[str, Any]:
        return {"budget": self.budget, "kv_fraction": round(self.solution.fraction, 4),
                "plan": composition(self.solution.policies), "probes_answered": self.answered,
                "answered_by_length": {str(k): v for k, v in (self.by_length or {}).items()},
                "answered_by_haystack": dict(sorted((self.by_haystack or {}).items())),
                "kept_of_dense": self.kept, "probe_nll": round(self.nll, 4),
                **({} if self.hits is None else {"probe_hits": hit_string(self.hits)}),
                **({} if self.text_kl is None else {"text_kl": round(self.text_kl, 4)}),
                **({} if self.first_flips is None else {"first_tokens_changed": self.first_flips})}


def measure_budgets(lm: LoadedModel, candidates: list[BudgetCandidate], probes: ProbeSet,
                    batch: int = 8, dense: torch.Tensor | None = None) -> torch.Tensor:
    """Run every candidate (and dense, unless its hits on these ``probes`` are given) on ``probes``, filling in what
    each answers (and, where dense ran here, how many first tokens it changed); returns dense's hits (bool ``[n]``,
    ``probe_losses`` order)."""
    dense_first = None
    if dense is None:
        dense, _, dense_first = probe_outcomes(lm, None, probes, batch)
    tokens = answer_tokens(probes)
    sizes = [(L, x.shape[0]) for L, x in probes.ids.items()]
    for c in candidates:
        hits, nll, first = probe_outcomes(lm, c.solution.policies, probes, batch)
        c.hits = hits
        c.first_flips = None if dense_first is None else int((first != dense_first).sum())
        c.answered, c.kept, c.nll = int(hits.sum()), int((hits & dense).sum()), float(nll.sum()) / max(1, tokens)
        c.by_length = {L: int(h.sum()) for (L, _), h in zip(sizes, hits.split([n for _, n in sizes]))}
        c.by_haystack = hits_by_haystack(probes, hits)
    return dense


def choose_budget(candidates: list[BudgetCandidate]) -> BudgetCandidate:
    """The candidate that answers the most probes exactly; of those that tie, the one holding the least KV (the
    extra KV bought nothing the probes see; the NLL, always a little different, would never let a tie stand)."""
    return max(candidates, key=lambda c: (c.answered, -c.solution.fraction, -c.budget))


SELECT_ALPHA = 0.05
"""A re-deal (``--select-deals``) or a ring (``--select-2bit``) replaces the solved plan only if it answers more of the
same held-in probes than the plan by more than chance: a one-sided exact sign test on the probes one of the two
answers and the other does not (``sign_test``), p < ``SELECT_ALPHA``; so at least 5 more, and more where some are
lost. Each candidate is tested against the plan on its own (no correction for their number: the guard is against
moves on a handful of probes, not a proof). Why: on Gemma 3 at 0.2 (docs/quality-runs.md, run 32, H100) ``--select-2bit``
moved four heads on 45 probes answered against the plan's 41 of 64, and the plan written found 21% of the 2K passkeys
where the solved plan found 84%; at 0.25 and 0.3 it moved heads on 44 against 25 and 40 against 30, and the plans
written kept dense's share of passkeys and multi-key needles where the solved ones lost them."""


def sign_test(gained: int, lost: int) -> float:
    """One-sided exact sign test (McNemar's, exact): the chance of at least ``gained`` of ``gained + lost``
    discordant probes going the candidate's way were each a coin toss (by symmetry, at most ``lost`` going the plan's:
    ``scoring.half_binomial_tail``, whose two-sided form is the evaluation's McNemar p). 1.0 when there are none."""
    from headwise.eval.scoring import half_binomial_tail

    return half_binomial_tail(lost, gained + lost)


@dataclass
class Versus:
    """A candidate against the solved plan, on the same probes: answered by it and not the plan, the reverse, and
    the sign test's p (``sign_test``)."""

    gained: int = 0
    lost: int = 0
    p: float = 1.0

    def info(self) -> dict[str, Any]:
        return {"gained_vs_plan": self.gained, "lost_vs_plan": self.lost, "p_vs_plan": round(self.p, 4)}


def versus_plan(plan: BudgetCandidate, candidates: list[Any]) -> None:
    """Fill each candidate's ``versus`` (a ``DealCandidate`` or ``RingCandidate``) against ``plan``, all measured on
    the same probes (``measure_budgets``)."""
    if plan.hits is None:
        raise HeadwiseError("versus_plan: the plan has not been run on the probes")
    for c in candidates:
        gained, lost = int((c.hits & ~plan.hits).sum()), int((plan.hits & ~c.hits).sum())
        c.versus = Versus(gained, lost, sign_test(gained, lost))


def _may_replace(c: Any, is_plan: bool) -> bool:
    return is_plan or c.versus.p < SELECT_ALPHA


@dataclass
class DealCandidate(BudgetCandidate):
    """The budget's solved plan (``deal`` None) or one re-deal of its policies over the KV heads (``--select-deals``,
    ``plan.deal_heads``): the same budget and KV bytes, other heads."""

    deal: int | None = None
    """Which deal (its seed is ``runner.DEAL_SEED``:``deal``); None: the solved plan itself."""
    differs: list[tuple[int, int]] = field(default_factory=list)
    """(layer, KV head) whose policy differs from the solved plan's."""
    versus: Versus = field(default_factory=Versus)
    """Against the solved plan on the same probes (``versus_plan``); untested, it cannot replace the plan."""

    def info(self) -> dict[str, Any]:
        return {"deal": self.deal, "differs": [list(h) for h in self.differs], **super().info(),
                **({} if self.deal is None else self.versus.info())}


@dataclass
class RingCandidate(BudgetCandidate):
    """The plan with ``ringed`` heads, held in 2-bit values by the solver, streaming on the menu's smallest ring
    instead (``--select-2bit``; none: the plan itself): less KV, every other head as solved."""

    ringed: list[tuple[int, int]] = field(default_factory=list)
    """(layer, KV head) moved from 2-bit codes to the ring."""
    versus: Versus = field(default_factory=Versus)
    """Against the plan on the same probes (``versus_plan``); untested, it cannot replace the plan."""

    def info(self) -> dict[str, Any]:
        return {"ringed": [list(h) for h in self.ringed], **super().info(),
                **(self.versus.info() if self.ringed else {})}


SELECT_TEXT_ALLOWANCE = 0.05
"""``--select-2bit``'s text term (``--select-text-allowance``): a ring, or a set of rings, may replace the plan only if
its KL from dense on held-in text exceeds the plan's by at most this many nats per position. Why: on Gemma 3 at 0.3
(docs/quality-runs.md, runs 32-33, H100) the five rings the probes preferred kept dense's multi-key needles but lost 0.33-0.36
nats of text on the evaluation's Shakespeare (perplexity 55 against 38), where layer 10's ring alone, +0.01 nats over
the solved plan's 0.11-0.14, kept 0.92-1.00 of them (n = 400) against the solved plan's 0.61-0.73. On the held-in text
this term measures, those five rings cost 0.006-0.065 nats each (CPU, session 39): 0.05 lets three of them through
together (layers 0, 7, 10: +0.039) and stops the two that cost the most."""


def within_text(c: BudgetCandidate, plan: BudgetCandidate, allowance: float | None) -> bool:
    """Whether ``c`` keeps the text within ``allowance`` nats of ``plan``'s (None: no text term); unmeasured, it does
    not."""
    if allowance is None:
        return True
    return c.text_kl is not None and plan.text_kl is not None and kl_within(c.text_kl, plan.text_kl, allowance)


def kl_within(kl: float, plan_kl: float, allowance: float) -> bool:
    """The text term's test: ``kl`` exceeds ``plan_kl`` by at most ``allowance`` nats."""
    return kl - plan_kl <= allowance


def choose_ring(candidates: list[RingCandidate], allowance: float | None = None) -> RingCandidate:
    """Of the plan itself (``candidates[0]``) and the candidates that answer more probes than it beyond chance
    (``SELECT_ALPHA``) and, with an ``allowance``, lose at most that many nats of held-in text more than it
    (``within_text``), the one that answers the most exactly; of those that tie, the plan, else the fewest heads
    moved, then the lowest mean answer NLL."""
    plan = candidates[0]
    return max((c for c in candidates if not c.ringed or (_may_replace(c, False) and within_text(c, plan, allowance))),
               key=lambda c: (c.answered, -len(c.ringed), -c.nll))


def choose_deal(candidates: list[DealCandidate]) -> DealCandidate:
    """Of the solved plan and the deals that answer more probes than it beyond chance (``SELECT_ALPHA``), the one that
    answers the most exactly; of those that tie, the solved plan, else the lowest mean answer NLL (then the first
    deal)."""
    return max((c for c in candidates if _may_replace(c, c.deal is None)),
               key=lambda c: (c.answered, c.deal is None, -c.nll, -(c.deal or 0)))
