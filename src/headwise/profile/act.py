"""Which heads get ACT's hidden-sink calibration (``policies/act.py``), by measurement.

ACT (https://arxiv.org/abs/2406.15765, section 4.2) calibrates one head at a time on a calibration set and keeps
the heads whose calibration raises accuracy. Here the measure is a loss, by default the language-model loss on real
text (Shakespeare); with ``objective="retrieval"`` (``headwise profile --act --act-objective retrieval``) the
loss of the answers of retrieval probes (``select.probe_set``: key-value facts in haystacks, the answer fed after
the question), held-in and held-out probes drawn with different seeds, so with other formats, keys and values. On
SmolLM2, calibrating the candidates the text rule turned off raised the held-out text loss by 0.0001 nats yet
lifted the passkey from 75 to 86% at 2K (docs/kernels.md): text loss does not see what ACT does to retrieval. The
decision has two steps, so that nothing is switched on that does not help:

1. *held-in*: for every ``full`` head of a global-attention layer, the mean next-token loss with that head alone
   on ``act`` minus the loss without (``delta``, nats); heads with ``delta < -margin`` are candidates;
2. *held-out*: the loss on the following, unseen stretch of text with every candidate on at once against the plan
   without; the candidates are kept only if that loss is lower (by ``margin`` too), else no head gets ACT.

Cost: one forward of ``length`` tokens per full head plus three. Differences from the paper: loss on text rather
than accuracy on classification prompts; per KV head (the plan's unit) rather than per query head; every layer
is tried (the authors' script skips layers 0 and 1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from headwise.engine import Engine
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import ACT, Full, Policy
from headwise.spec import ModelSpec

if TYPE_CHECKING:
    from headwise.profile.select import ProbeSet

OBJECTIVES = ("text", "retrieval")

MARGIN = 1e-4
"""Loss change (nats per token) below which a head, or the held-out check, counts as no gain: on the tiny random
model single heads move the loss by ~1e-6, float noise that must not switch anything on."""
LOGIT_BUDGET = 2**25
"""fp32 logits kept per chunk (128 MiB): with a large vocabulary only every few positions are scored."""


def _nll(eng: Engine, ids: torch.Tensor, first: int = 0, step: int = 1) -> tuple[float, int]:
    """Summed next-token NLL (nats) and count over positions ``first``, then every ``step``-th of each chunk, of
    ``ids: [1, T]`` (a position predicts the next token: the last predicts nothing), prefilled chunk by chunk in a
    new cache of ``eng`` as the engine runs it."""
    ids = ids.to(eng.lm.device)
    T = ids.shape[1]
    cache = eng.new_cache(1, reserve=T)
    total, count = 0.0, 0
    for s in range(0, T, eng.chunk_size):
        part = ids[:, s : s + eng.chunk_size]
        keep = torch.arange(0, part.shape[1], step)
        keep = keep[(s + keep >= first) & (s + keep < T - 1)]
        logits = eng.forward(part, cache, keep=keep if keep.numel() else torch.tensor([part.shape[1] - 1]))
        if keep.numel() == 0:
            continue
        target = ids[0, s + keep + 1]
        total += float(torch.nn.functional.cross_entropy(logits[0].float(), target, reduction="sum"))
        count += keep.numel()
    return total, count


@torch.inference_mode()
def mean_loss(lm: LoadedModel, policies: list[list[Policy]], ids: torch.Tensor, chunk_size: int = 512) -> float:
    """Mean next-token loss (nats) of ``ids: [1, T]`` under ``policies``, chunked prefill as the engine runs it;
    positions are subsampled evenly when a chunk's logits would exceed ``LOGIT_BUDGET`` floats."""
    eng = Engine(lm, HeadPlan.from_policies(lm.spec, policies, lm.name), chunk_size=chunk_size)
    vocab = lm.model.config.get_text_config().vocab_size
    total, count = _nll(eng, ids, step=max(1, -(-chunk_size * vocab // LOGIT_BUDGET)))
    if count == 0:
        raise HeadwiseError(f"text of {ids.shape[1]} tokens is too short to measure a loss on")
    return total / count


@torch.inference_mode()
def answer_loss(lm: LoadedModel, policies: list[list[Policy]], probes: ProbeSet, chunk_size: int = 512) -> float:
    """Mean NLL (nats per answer token) of the retrieval probes' answers, each fed after its prompt, under
    ``policies`` through the engine (one cache per probe)."""
    eng = Engine(lm, HeadPlan.from_policies(lm.spec, policies, lm.name), chunk_size=chunk_size)
    total, count = 0.0, 0
    for L, rows in probes.ids.items():
        for ids, answer in zip(rows, probes.answer[L]):
            n = int((answer >= 0).sum())
            t, c = _nll(eng, ids[None, : L + n], first=L - 1)
            total, count = total + t, count + c
    if count == 0:
        raise HeadwiseError("no probe answer to measure a loss on")
    return total / count


def _loss(lm: LoadedModel, policies: list[list[Policy]], data: Any) -> float:
    """``mean_loss`` on token ids, ``answer_loss`` on a probe set."""
    return mean_loss(lm, policies, data) if isinstance(data, torch.Tensor) else answer_loss(lm, policies, data)


@dataclass
class ActChoice:
    """What ``choose_act_heads`` measured and decided."""

    heads: list[tuple[int, int]]
    """(layer, KV head) pairs that get ACT (empty if none helps)."""
    delta: dict[tuple[int, int], float] = field(default_factory=dict)
    """held-in loss with the head alone on ACT minus without, nats"""
    base_loss: float = 0.0
    held_out_base: float = 0.0
    held_out_with: float | None = None
    """held-out loss with every candidate on (None: no candidate)"""
    candidates: list[tuple[int, int]] = field(default_factory=list)
    """the heads whose calibration alone lowered the held-in loss (``heads`` if they also lower it held out)"""
    objective: str = "text"
    """what the losses are of: ``text`` (next-token loss on Shakespeare) or ``retrieval`` (probe answers)"""

    def meta(self) -> dict[str, Any]:
        return {"objective": self.objective, "heads": [list(h) for h in self.heads],
                "candidates": [list(h) for h in self.candidates],
                "held_in_loss": round(self.base_loss, 5),
                "delta_held_in": {f"{i},{j}": round(d, 6) for (i, j), d in self.delta.items()},
                "held_out_loss": round(self.held_out_base, 5),
                "held_out_loss_with_candidates": None if self.held_out_with is None else round(self.held_out_with, 5)}


def global_full_heads(spec: ModelSpec, policies: list[list[Policy]]) -> list[tuple[int, int]]:
    """(layer, KV head) of the ``full`` heads on the model's global (not natively sliding) layers: the heads that ACT,
    or an approximate prefill such as HyperAttention, may take over."""
    return [(i, j) for i in range(spec.num_layers) if spec.native_window(i) is None
            for j in range(spec.num_kv_heads) if isinstance(policies[i][j], Full)]


def choose_act_heads(lm: LoadedModel, policies: list[list[Policy]], held_in: torch.Tensor | ProbeSet,
                     held_out: torch.Tensor | ProbeSet, act: ACT | None = None, margin: float = MARGIN,
                     progress: bool = True) -> ActChoice:
    """The module's two steps on ``held_in`` and ``held_out``: token ids ``[1, T]`` (the text objective) or probe
    sets (the retrieval objective, ``act_probes``); ``policies`` is left unchanged."""
    act = act or ACT()
    spec = lm.spec
    heads = global_full_heads(spec, policies)
    base = _loss(lm, policies, held_in)
    delta: dict[tuple[int, int], float] = {}
    for i, j in tqdm(heads, desc="ACT per head", unit="head", disable=not progress):
        trial = [list(row) for row in policies]
        trial[i][j] = act
        delta[(i, j)] = _loss(lm, trial, held_in) - base
    candidates = [h for h in heads if delta[h] < -margin]
    objective = "text" if isinstance(held_in, torch.Tensor) else "retrieval"
    out = ActChoice([], delta, base, _loss(lm, policies, held_out), candidates=candidates, objective=objective)
    if candidates:
        out.held_out_with = _loss(lm, with_act(policies, candidates, act), held_out)
        if out.held_out_with < out.held_out_base - margin:
            out.heads = candidates
    return out


def with_act(policies: list[list[Policy]], heads: list[tuple[int, int]], act: ACT | None = None) -> list[list[Policy]]:
    """A copy of ``policies`` with ``heads`` on ACT."""
    out = [list(row) for row in policies]
    for i, j in heads:
        out[i][j] = act or ACT()
    return out


def act_texts(lm: LoadedModel, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Held-in and held-out ids ``[1, length]`` each: consecutive stretches of Shakespeare (Hamlet onwards)."""
    from headwise.data import shakespeare

    ids = lm.tokenizer(shakespeare(length * 16), return_tensors="pt").input_ids
    if ids.shape[1] < 2 * length:
        raise HeadwiseError(f"the profiling text has {ids.shape[1]} tokens, fewer than the {2 * length} ACT needs")
    return ids[:, :length], ids[:, length : 2 * length]


ACT_PROBE_SEEDS = (70_001, 90_001)
"""Seeds of the held-in and held-out probe sets (``select.probe_set``): other seeds than the plan selection's, so
other formats, keys and values than it and each other."""


def act_probes(lm: LoadedModel, length: int, n: int = 16) -> tuple[ProbeSet, ProbeSet]:
    """Held-in and held-out retrieval probes for the ``retrieval`` objective: ``n`` each of ``length`` tokens."""
    from headwise.profile.select import probe_set

    held_in, held_out = (probe_set(lm.tokenizer, [length], n, seed=s) for s in ACT_PROBE_SEEDS)
    return held_in, held_out
