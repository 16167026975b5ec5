"""Ranking KV heads by the retrieval the model loses without them: backward elimination on held-in probes.

DuoAttention's gates and the retrieval score rank heads by a proxy (how well a gated mix reproduces hidden
states; how often a head's top key is the token being copied). Issue 19 measured where the proxy misleads: a
plan keeping the 38 heads the gates ranked highest kept needles (99%) but lost the pass key in repeated filler
(56%, then 24%), while 38 *random* full heads kept 77% of it. The heads a task needs act together, and no
per-head score sees that. So this ranking measures the thing itself, on the model, in the combination the plan
will run:

1. Dense answers a set of retrieval probes (``probes.retrieval_probe``: five haystacks, six value kinds, five
   wordings, never the evaluation's formats); only the probes it answers exactly are kept.
2. Every KV head starts ``full`` (or in another ``base``, below). Each round, for every head not yet switched, the
   probes run with that head switched to streaming (``sink`` + ``window``) on top of the heads already switched;
   the loss is the probes' answer NLL
   above dense's, per probe floored at 0 and capped at ``CAP`` nats: only retrieval lost counts (a switch that
   makes some probes *more* confident than dense earns nothing: without the floor, the GPU run's loss fell below
   dense and the elimination rewarded sharpening), and one lost probe does not outweigh the rest.
3. The ``drop`` share of heads whose switch costs least are switched together -- if the combined loss stays within
   twice the sum of their own costs (+ ``TOLERANCE``); otherwise half as many are tried (two heads that back each
   other up each look free alone, not together).
4. Repeat until one head is left (or ``time_limit_s``: the rest are then ordered by their last round's costs).

``base``: the policy every head not switched runs in. ``full`` by default; ``quantized4`` / ``quantized8`` (KIVI,
``policies/quantized.py``, group 32, residual 128: the solver's ``QUANT_OPTIONS``) measure the switches a plan
with few or no full heads makes -- 4-bit heads to streaming, every other head 4-bit (``solve(quantize=True)`` at
budgets where no head fits ``full``). The probes' forwards then round those heads' K/V as their store would
(``select.plan_rounding``: quantized and dequantized with the store's functions, per query as the engine's chunked
prefill of ``chunk`` tokens and its decode steps see them, on the decode kernel on a GPU), so the first entry of the
curve is the loss of every head quantized, and a switch is judged against that.

The order of elimination is the ranking: the head switched last scores 1, the first ``1/n``. The solver then
walks it as any other score (``solver.py``), and ``select.py`` picks how much of the budget goes to full heads on
a separate set of probes. Each round's loss is kept (``AblationResult.curve``): the retrieval lost as a function
of the number of full heads, measured.

Text (``text_weight``, off by default): the retrieval loss keeps the heads the probes need and nothing else, so a
plan that keeps the passkey can still lose text fidelity (Gemma 3 270M, docs/quality-runs.md "Run 11": KL 0.13-0.18 nats
vs dense on Shakespeare). With a weight, each loss adds ``text_weight`` x the mean KL(dense || switched), in nats,
of the next-token distributions at the last ``TEXT_POSITIONS`` positions of held-in text rows (``ablation_text``:
the profiler's Shakespeare, not the evaluation's), under the same masks and rounding as the probes (each row one
prefilled prompt). Dense's log-probs are taken once; each loss then runs one more masked forward per batch of rows.
``AblationResult.parts`` keeps each round's two terms apart.

Cost: about ``n_heads / drop`` masked forwards over the probes (SmolLM2's 90 KV heads, 50 probes at 1K and 2K:
~0.9 s per forward in fp32 on an H200, so ~8 minutes; on a GPU the forwards run in bf16 autocast; on a CPU it is
for small models and tests). A quantized base attends over up to twice the keys (the rounded copy of the old
positions beside the exact one, ``select._rounded``).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from headwise.engine import DEFAULT_CHUNK
from headwise.errors import HeadwiseError
from headwise.models import LoadedModel
from headwise.policies import Full, Policy, Quantized
from headwise.policies.knorm import KNorm
from headwise.policies.streaming import Streaming
from headwise.profile.select import (
    Emulated,
    ProbeSet,
    masked_probe_losses,
    masked_text_logprobs,
    plan_masks,
    plan_rounding,
    subset,
    text_kl,
)
from headwise.profile.solver import ring_policy

CAP = 10.0
"""Largest excess NLL (nats) one probe counts for."""
TOLERANCE = 0.05
"""Nats of combined loss allowed above twice the sum of the switched heads' own losses."""
TEXT_POSITIONS = 512
"""Positions per text row (the last ones) the text term's KL is taken over: bounds the [rows, positions, vocab]
log-probs held for dense."""

Head = tuple[int, int]

BASES: dict[str, Policy] = {"full": Full(), "quantized4": Quantized(bits=4), "quantized8": Quantized(bits=8)}
"""The policies the heads not switched to streaming may run in (``--ablation-base``)."""
SWITCHES = ("streaming", "knorm")
"""What a switched head runs (``--ablation-switch``): ``streaming`` (``sink`` + ``window``), or ``knorm`` in the same
slots (``sink`` tokens of smallest key norm + the newest ``window``; ``policies/knorm.py``)."""


@dataclass
class AblationResult:
    score: torch.Tensor
    """[layers, kv_heads] in (0, 1]: position in the elimination order (the last head switched scores 1)."""
    order: list[Head]
    """Heads in the order they were switched to streaming."""
    curve: list[tuple[int, float]] = field(default_factory=list)
    """(heads not switched, loss) after each round; the first entry is no head switched (loss 0 with a ``full``
    base; with a quantized one, what rounding every head loses)."""
    probes: int = 0
    """Probes dense answered exactly (the ones the losses are taken on)."""
    probes_asked: int = 0
    forwards: int = 0
    seconds: float = 0.0
    finished: bool = True
    """False if ``time_limit_s`` stopped the elimination (the remaining heads ordered by one round's losses)."""
    base: str = "full"
    """The policy of the heads not switched (a ``BASES`` key)."""
    rounding: dict[str, Any] = field(default_factory=dict)
    """With a quantized base, how its rounding was emulated (prefill chunk, decode kernel or reference path)."""
    text_weight: float = 0.0
    """Weight of the text term in the loss (0: retrieval only)."""
    text: dict[str, int] = field(default_factory=dict)
    """With a text term: the rows, tokens per row and positions per row its KL is taken over."""
    parts: list[tuple[int, float, float]] = field(default_factory=list)
    """With a text term, ``curve``'s rounds split: (heads not switched, retrieval excess, text KL in nats)."""
    switch: str = "streaming"
    """What a switched head runs (a ``SWITCHES`` entry)."""
    ring: int = 0
    """With a ring (``--min-ring``), the tokens a switched head keeps (0: ``sink`` + ``window``)."""

    def meta(self) -> dict[str, Any]:
        text = {"text": self.text, "curve_parts": [[n, round(r, 4), round(k, 4)] for n, r, k in self.parts]}
        return {"base": self.base, "base_policy": BASES[self.base].to_spec(), **self.rounding,
                "probes_kept": self.probes, "probes_asked": self.probes_asked, "forwards": self.forwards,
                "seconds": round(self.seconds, 1), "finished": self.finished, "text_weight": self.text_weight,
                **({"switch": self.switch} if self.switch != "streaming" else {}),
                **({"ring": self.ring} if self.ring else {}),
                **(text if self.text_weight else {}),
                "order": [list(h) for h in self.order],
                "curve": [[n, round(loss, 4)] for n, loss in self.curve]}


class _Masks:
    """Per layer, the full and the streaming mask of one head at one length; a plan's masks are stacks of them (a
    quantized head's mask is a full one's). With a quantized ``base``, the rounding of the heads not streamed."""

    def __init__(self, lm: LoadedModel, sink: int, window: int, base: Policy = BASES["full"],
                 chunk: int = DEFAULT_CHUNK, kernels: bool = False, switch: str = "streaming", ring: int = 0) -> None:
        self.spec = lm.spec
        self.device = next(lm.model.parameters()).device
        # a knorm head's mask is a full one: what it keeps comes from the keys, in ``rounding`` (select.KNormKeep)
        self.streams: list[Policy] = [
            ring_policy(ring, self.spec.native_window(i)) if ring else
            Streaming(sink=sink, window=window) if switch == "streaming" else KNorm(tokens=sink, window=window)
            for i in range(self.spec.num_layers)]
        self.base, self.chunk, self.kernels = base, chunk, kernels
        self._cache: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.streamed: set[Head] = set()

    def _base(self, n: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if n not in self._cache:  # one entry per probe length (two); the masks are select.plan_masks' own
            layers = self.spec.num_layers
            full = [m[0] for m in plan_masks(self.spec, [[Full()]] * layers, n, self.device)]
            stream = [m[0] for m in plan_masks(self.spec, [[p] for p in self.streams], n, self.device)]
            self._cache[n] = (full, stream)
        return self._cache[n]

    def __call__(self, n: int) -> list[torch.Tensor]:
        full, stream = self._base(n)
        return [torch.stack([stream[i] if (i, j) in self.streamed else full[i]
                             for j in range(self.spec.num_kv_heads)]) for i in range(self.spec.num_layers)]

    def rounding(self, prompt_len: int, total: int) -> list[list[Emulated]]:
        """``select.plan_rounding`` of the plan the masks stand for: the heads not streamed in ``base``, and the
        switched ones' key choice under ``knorm``."""
        policies = [[self.streams[i] if (i, j) in self.streamed else self.base for j in range(self.spec.num_kv_heads)]
                    for i in range(self.spec.num_layers)]
        return plan_rounding(self.spec, policies, prompt_len, total, self.device, self.chunk, self.kernels)


def _fast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """On a GPU, the probes' forwards in bf16 autocast (dense and every plan alike): the losses only rank heads, and
    the GPU run in fp32 managed 5 of ~17 rounds in its 300 s. Elsewhere nothing changes."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def eliminate(heads: list[Head], loss: Callable[[set[Head]], float], drop: float = 0.15,
              time_limit_s: float | None = None, progress: bool = True,
              t0: float | None = None, start: float = 0.0) -> tuple[list[Head], list[tuple[int, float]], bool]:
    """The elimination of steps 2-4 (module docstring) for any ``loss`` of a set of switched heads (``start`` for
    none). Returns the heads in elimination order (all of them), the (heads not switched, loss) curve, and whether
    it finished within ``time_limit_s`` (counted from ``t0``)."""
    t0 = time.perf_counter() if t0 is None else t0
    full = list(heads)
    removed: list[Head] = []
    cur = start
    curve = [(len(full), cur)]
    singles: dict[Head, float] = {}
    finished = True
    bar = tqdm(total=max(0, len(heads) - 1), desc="ablation", unit="head", disable=not progress)
    try:
        while len(full) > 1:
            if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                finished = False
                break
            done = set(removed)
            singles = {h: loss(done | {h}) for h in full}
            ranked = sorted(full, key=lambda h: (singles[h], h))
            k = min(len(full) - 1, max(1, math.ceil(drop * len(full))))
            while True:
                pick = ranked[:k]
                combined = loss(done | set(pick)) if k > 1 else singles[pick[0]]
                own = sum(max(0.0, singles[h] - cur) for h in pick)
                if k == 1 or combined - cur <= 2 * own + TOLERANCE:
                    break
                k //= 2
            removed += pick
            picked = set(pick)
            full = [h for h in full if h not in picked]
            cur = combined
            curve.append((len(full), cur))
            bar.update(len(pick))
            bar.set_postfix(full=len(full), loss=f"{cur:.3f}")
    finally:
        bar.close()
    return removed + sorted(full, key=lambda h: (singles.get(h, 0.0), h)), curve, finished


def ablation_ranking(lm: LoadedModel, probes: ProbeSet, sink: int = 64, window: int = 64, drop: float = 0.15,
                     batch: int = 8, time_limit_s: float | None = None, progress: bool = True, base: str = "full",
                     chunk: int = DEFAULT_CHUNK, kernels: bool | None = None, text: torch.Tensor | None = None,
                     text_weight: float = 0.0, text_positions: int = TEXT_POSITIONS,
                     switch: str = "streaming", ring: int = 0) -> AblationResult:
    """Backward elimination (module docstring). ``probes``: from ``select.probe_set``. ``base``: a ``BASES`` key;
    with a quantized one, ``chunk`` is the prefill chunk the rounding is emulated for and ``kernels`` whether decode
    steps run on the decode kernel (default: on a GPU, as the engine does). ``text``: ids ``[n, T]`` of held-in text
    (``ablation_text``); with ``text_weight`` > 0 the loss adds ``text_weight`` x the mean KL(dense || switched), in
    nats, over the last ``text_positions`` positions of each row (module docstring, "Text"). ``switch``: what a
    switched head runs (``SWITCHES``): ``streaming``, or ``knorm`` with ``sink`` tokens kept by key norm beside the
    newest ``window``. ``ring`` (``--min-ring``): a switched head keeps the ring the solver's smallest option holds
    instead (``ring_policy``: half sinks, half recent tokens on a global layer, a ``ring``-token window on a native
    sliding one), so the losses, the text term's above all, are those of the switch the plan will make."""
    if not 0.0 < drop < 1.0:
        raise HeadwiseError(f"drop must be in (0, 1), got {drop}")
    if not text_weight >= 0.0 or not math.isfinite(text_weight):
        raise HeadwiseError(f"the ablation's text weight must be a number >= 0, got {text_weight}")
    if text_weight and (text is None or text.dim() != 2 or text.numel() == 0):
        raise HeadwiseError("a text weight above 0 needs held-in text: token ids [rows, tokens]")
    if base not in BASES:
        raise HeadwiseError(f"unknown ablation base '{base}'; choose one of {', '.join(BASES)}")
    if switch not in SWITCHES:
        raise HeadwiseError(f"unknown ablation switch '{switch}'; choose one of {', '.join(SWITCHES)}")
    if ring < 0 or (ring and switch != "streaming"):
        raise HeadwiseError(f"a ring switch is a streaming one of at least 1 token, got ring {ring} with switch "
                            f"{switch}")
    spec = lm.spec
    t0 = time.perf_counter()
    heads: list[Head] = [(i, j) for i in range(spec.num_layers) for j in range(spec.num_kv_heads)]
    asked = sum(x.shape[0] for x in probes.ids.values())
    with _fast(next(lm.model.parameters()).device):
        hits, dense_nll = masked_probe_losses(lm, None, probes, batch)
    if not bool(hits.any()):
        raise HeadwiseError(f"{lm.name} answers none of the {asked} retrieval probes densely; the ablation ranking "
                            "needs probes the model can answer (use another --method, or a longer --target-len)")
    kept = subset(probes, hits)
    dense = dense_nll[hits]
    device = next(lm.model.parameters()).device
    kernels = device.type == "cuda" if kernels is None else kernels
    rounded = isinstance(BASES[base], Quantized)
    masks = _Masks(lm, sink, window, BASES[base], chunk, kernels, switch, ring)
    emulated = rounded or switch == "knorm"
    forwards = 1
    keep = min(text.shape[1], text_positions) if text is not None else 0
    dense_text = None
    if text_weight and text is not None:
        with _fast(device):
            dense_text = masked_text_logprobs(lm, None, text, keep, batch)
    parts: dict[frozenset[Head], tuple[float, float]] = {frozenset(): (0.0, 0.0)}

    def loss(streamed: set[Head]) -> float:
        nonlocal forwards
        masks.streamed = streamed
        forwards += 1
        rounding = masks.rounding if emulated else None
        kl = 0.0
        with _fast(masks.device):
            _, nll = masked_probe_losses(lm, masks, kept, batch, rounding)
            if dense_text is not None and text is not None:
                kl = text_kl(dense_text, masked_text_logprobs(lm, masks, text, keep, batch, rounding))
        retrieval = float((nll - dense).clamp(min=0.0, max=CAP).mean())
        parts[frozenset(streamed)] = (retrieval, kl)
        return retrieval + text_weight * kl

    start = loss(set()) if rounded else 0.0
    order, curve, finished = eliminate(heads, loss, drop, time_limit_s, progress, t0, start)
    score = torch.zeros(spec.num_layers, spec.num_kv_heads)
    for p, (i, j) in enumerate(order):
        score[i, j] = (p + 1) / len(order)
    how = {"rounding": {"prefill_chunk": chunk, "decode": "kernel" if kernels else "reference"}} if emulated else {}
    split = [(n, *parts[frozenset(order[: len(order) - n])]) for n, _ in curve] if dense_text is not None else []
    shape = {"rows": text.shape[0], "tokens": text.shape[1], "positions": keep} if text is not None and dense_text is not None else {}
    return AblationResult(score, order, curve, int(hits.sum()), asked, forwards, time.perf_counter() - t0, finished,
                          base, how, text_weight, shape, split, switch, ring)


def ablation_text(lm: LoadedModel, tokens: int, length: int) -> torch.Tensor:
    """Held-in text for the ablation's text term: ``tokens`` tokens of Shakespeare from the start of Hamlet (the
    profiler's own text, as ``mass.text_for_profile`` and ``seer.profile_texts``; the evaluation cuts its text from
    seeded places), in rows of ``length`` (at least one row; a row no longer than ``tokens``)."""
    from headwise.profile.seer import profile_texts

    length = min(length, tokens)
    return profile_texts(lm, length, max(1, tokens // length))
