"""``profile_model``: measure the heads, pick the deciding score, solve the budget, return the plan.

Which score decides which heads stay full (``method``):

* ``retrieval`` — Wu et al. retrieval score (``retrieval.py``), max over the query heads of a KV head;
* ``duo`` — DuoAttention gates (``duo.py``), one per KV head already;
* ``razor`` — RazorAttention max(echo, induction) (``razor.py``), max over the group;
* ``mass`` — attention mass a head loses under ``streaming(64, 256)`` at the longest profiled length
  (``mass.py``), max over the group;
* ``ablation`` — the order in which backward elimination on held-in retrieval probes switches heads to streaming
  (``ablate.py``): measured retrieval loss of the plan itself, not a per-head proxy.

Max over the group because the query heads of a KV head share its cache: one retrieving query head is
enough to need the whole context. The retrieval, mass and echo/induction scores are always measured (they
are cheap and go in the plan's metadata and picture); the DuoAttention gates only with ``method="duo"``, the
ablation only with ``method="ablation"``.
Streaming spans always come from the mass profile (``solver.py``).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from headwise.errors import BudgetError, HeadwiseError, InputError
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import Policy
from headwise.profile.mass import MassResult
from headwise.profile.probe import Probe, probing
from headwise.profile.select import SELECT_TEXT_ALLOWANCE, kl_within
from headwise.profile.solver import Quantize, check_budget, check_room, quant_menu, solve
from headwise.spec import ModelSpec

METHODS = ("retrieval", "duo", "razor", "mass", "ablation")
ABLATION_BASES = ("full", "quantized4", "quantized8")
"""Policies the ablation ranking's unswitched heads may run in (``ablate.BASES``'s keys; ``--ablation-base``)."""
ABLATION_SWITCHES = ("streaming", "knorm")
"""What the ablation ranking switches heads to (``ablate.SWITCHES``; ``--ablation-switch``)."""
DEFAULT_METHOD = "duo"
"""The deciding score by default: DuoAttention's gates, trained on the retrieval probes (docs/profiling.md and
docs/results.md hold the GPU evaluation behind the choice)."""


SELECT_TEXT_TOKENS = 8192
"""Tokens of held-in text (``ablate.ablation_text``, in rows of the target length) ``--select-2bit``'s text term is
measured on, over the last positions of each row (``select_text_positions``)."""
SELECT_TEXT_POSITIONS = 1024
"""Positions, over all rows, whose next-token log-probs ``--select-2bit``'s text term holds for dense and for each
candidate (x the vocabulary, in fp32: 1 GiB each on Gemma 3's 262,144 tokens)."""


def select_text_positions(rows: int, tokens: int) -> int:
    """The last positions of each of ``rows`` rows of ``tokens`` the text term is taken over: ``ablate.TEXT_POSITIONS``,
    fewer where the rows are many (``SELECT_TEXT_POSITIONS`` in all), at least 16, at most the row."""
    from headwise.profile.ablate import TEXT_POSITIONS

    return min(tokens, TEXT_POSITIONS, max(16, SELECT_TEXT_POSITIONS // max(1, rows)))


@dataclass(frozen=True)
class Settings:
    """How much the profiler measures (``fast`` is for tests and smoke runs, not for shipped plans)."""

    retrieval_lengths: tuple[int, ...] = (512, 1024, 2048)
    retrieval_depths: tuple[float, ...] = (0.25, 0.75)
    retrieval_tasks: tuple[str, ...] = ("needle", "passkey")
    mass_length: int = 0
    """Tokens of text for the mass profile; 0: the plan's target length (capped at the model's context)."""
    razor_segment: int = 256
    razor_batch: int = 2
    duo_steps: int = 40
    duo_seq_len: int = 768
    """Longest gate-training sequence; 0: twice the plan's target length, within the model's context."""
    duo_time_limit_s: float = 420.0
    duo_batch: int = 1
    select_probes: int = 8
    """Retrieval probes per length (the target length and twice it) that candidate plans are judged on
    (``select.py``); 0: no selection, the solver's ``full_share`` as given."""
    prefill_density: float | None = None
    """If set, full heads on global layers get the best prefill pattern of at most this block density."""
    pattern_length: int = 1024
    calibrate: bool = True
    """Measure each layer's KL sensitivity (``mass.layer_sensitivity``: one forward per layer) to weigh spans."""
    ablation_probes: int = 8
    """Retrieval probes per length (the target length and twice it) the ablation ranking is measured on
    (``ablate.py``; only those dense answers exactly count)."""
    ablation_drop: float = 0.15
    ablation_time_limit_s: float = 600.0
    ablation_text_weight: float = 0.0
    """Weight of the text term in the ablation's loss (``ablate.py``, "Text"): 0, retrieval only."""
    ablation_text_tokens: int = 8192
    """Tokens of held-in text for that term, in rows of the target length (used only with a weight above 0)."""
    select_text_tokens: int = SELECT_TEXT_TOKENS
    """Tokens of held-in text ``--select-2bit``'s text term is measured on (``select_2bit_rings``)."""
    act_length: int = 1024
    """Tokens of held-in and of held-out text, or of each retrieval probe, for ACT's per-head choice (``act.py``)."""
    act_probes: int = 16
    """Held-in and held-out retrieval probes each for ACT's ``retrieval`` objective."""
    seer_steps: int = 40
    """SeerAttention gate-training steps (``seer.py``, with ``train_seer_gates=True``), one sequence each."""
    seer_seq_len: int = 1024
    """Tokens per gate-training sequence."""
    seer_time_limit_s: float = 300.0

    @classmethod
    def fast(cls, prefill_density: float | None = None) -> Settings:
        return cls((512,), (0.5,), ("passkey",), 512, 64, 1, 3, 256, 60.0, 1, 2, prefill_density, 512,
                   ablation_probes=2, ablation_drop=0.5, ablation_time_limit_s=60.0, ablation_text_tokens=512,
                   select_text_tokens=512,
                   act_length=256, act_probes=2, seer_steps=4, seer_seq_len=256)

    @classmethod
    def gpu(cls, prefill_density: float | None = None) -> Settings:
        """What shipped plans are profiled with, on a GPU: gates trained for 300 steps of 4 sequences (the loss
        has flattened well before on the bundled models: the curve is in the plan's ``meta.duo``), retrieval
        probes at five depths."""
        return cls(retrieval_depths=(0.1, 0.3, 0.5, 0.7, 0.9), duo_steps=300, duo_seq_len=0,
                   duo_time_limit_s=300.0, duo_batch=4, select_probes=64, prefill_density=prefill_density,
                   ablation_probes=48, ablation_time_limit_s=300.0, act_length=2048, seer_steps=300, seer_seq_len=4096)


class _LayerSeen(Probe):
    def __init__(self) -> None:
        self.layers: set[int] = set()

    def edit(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        self.layers.add(layer)
        return out


FULL_SHARE = 1.0
"""Share of the spare budget (above the cheapest spans) full heads may take when it is not chosen by measurement
(``--full-share``, ``--from-scores``). 1.0: every head the deciding score ranks high enough to fit is made full
before any streaming window grows. The earlier 0.25, chosen on next-token agreement, lost 42-56 points of
passkey on SmolLM2 (issue 19)."""
SELECT_SHARES = (1.0, 0.75, 0.5, 0.25)
"""Full-head shares of the budget that ``profile_model`` tries (``select.py``) when none is given."""


def check_reachable(lm: LoadedModel) -> None:
    """Raise ``HeadwiseError`` unless every layer's attention runs through our attention function."""
    spec = lm.spec
    if spec.num_layers < 1 or spec.num_q_heads < 1 or spec.num_kv_heads < 1:
        raise HeadwiseError(f"{lm.name} has no attention heads to profile (layers={spec.num_layers}, "
                            f"query heads={spec.num_q_heads}, KV heads={spec.num_kv_heads})")
    probe = _LayerSeen()
    device = next(lm.model.parameters()).device
    try:
        with torch.inference_mode(), probing(lm.model):
            lm.model(input_ids=torch.ones(1, 4, dtype=torch.long, device=device), headwise_probe=probe,
                     use_cache=False)
    except TypeError as exc:
        raise HeadwiseError(f"{lm.name}: its forward does not pass attention keywords through ({exc}); "
                            "headwise can only profile models whose attention uses transformers' AttentionInterface"
                            ) from None
    missing = sorted(set(range(spec.num_layers)) - probe.layers)
    if missing:
        raise HeadwiseError(
            f"{lm.name}: no attention heads reachable in layer(s) {missing[:8]}{'...' if len(missing) > 8 else ''}: "
            "their attention does not call transformers' AttentionInterface, so headwise cannot observe them"
        )


def span_value(recall: torch.Tensor, error: torch.Tensor | None) -> torch.Tensor:
    """What the solver maximises per (layer, KV head, span option): ``1 - output error`` when it was measured
    (``mass.py``), else the attention mass kept."""
    return recall if error is None else 1.0 - error


@dataclass
class Spans:
    """What the solver needs about streaming spans, per (layer, KV head, ``SPAN_OPTIONS`` option)."""

    recall: torch.Tensor
    """attention mass kept (mean over the KV head's query heads and the bins)"""
    error: torch.Tensor | None
    """relative output error, or None where the model has no ``o_proj`` to measure through"""
    layer_kl: torch.Tensor | None
    """[layers] KL when the layer alone streams at ``CALIB_WINDOW`` (None: not calibrated)"""
    quant_error: torch.Tensor | None = None
    """[layers, kv_heads, len(mass.QUANT_PROBE)] relative output error of each quantized option (``mass.py``), or None;
    recorded in the plan (``mass.weighted_span_error(..., other=)`` puts it on the spans' KL scale), not traded by
    the solver (whole heads are chosen by score: ``solver.py``)"""

    @property
    def weighted_error(self) -> torch.Tensor | None:
        from headwise.profile.mass import weighted_span_error

        if self.error is None or self.layer_kl is None:
            return self.error
        return weighted_span_error(self.error, self.layer_kl)

    @property
    def value(self) -> torch.Tensor:
        return span_value(self.recall, self.weighted_error)

    def meta(self) -> dict[str, Any]:
        r = lambda x: [[[float(f"{v:.6g}") for v in h] for h in row] for row in x.tolist()]  # noqa: E731
        out: dict[str, Any] = {"span_recall_kv": [[[round(float(v), 4) for v in h] for h in row]
                                                  for row in self.recall.tolist()]}
        if self.error is not None:
            out["span_error_kv"] = r(self.error)
        if self.layer_kl is not None:
            out["layer_kl"] = [float(f"{v:.4g}") for v in self.layer_kl.tolist()]
        if self.quant_error is not None:
            from headwise.profile.mass import QUANT_PROBE, QUANT_PROBE_RESIDUAL

            out["quant_error_kv"] = r(self.quant_error)
            out["quant_error_options"] = {"key_value_bits": [list(o) for o in QUANT_PROBE],
                                          "residual": QUANT_PROBE_RESIDUAL}
        return out

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Spans | None:
        if "span_recall_kv" not in meta:
            return None
        err, kl, qerr = meta.get("span_error_kv"), meta.get("layer_kl"), meta.get("quant_error_kv")
        return cls(torch.tensor(meta["span_recall_kv"]), None if err is None else torch.tensor(err),
                   None if kl is None else torch.tensor(kl), None if qerr is None else torch.tensor(qerr))


def profile_length(spec: ModelSpec, target_len: int, mass_length: int = 0) -> int:
    """Tokens of text the spans are measured on: ``mass_length``, or by default the target length, within the
    model's context."""
    return min(mass_length or target_len, spec.max_context or target_len)


def measure_spans(lm: LoadedModel, target_len: int, calibrate: bool = True, progress: bool = True,
                  mass: MassResult | None = None, length: int | None = None) -> Spans:
    """Per KV head: the span recalls and output errors of the mass profile for ``target_len`` (measured here
    unless ``mass`` is given), and (``calibrate``) each layer's KL sensitivity measured end to end over the same
    ``length`` tokens (``mass.layer_sensitivity``)."""
    from headwise.profile.mass import SPAN_OPTIONS, layer_sensitivity, mass_scores

    spec = lm.spec
    length = length or profile_length(spec, target_len)
    if mass is None:
        mass = mass_scores(lm, length, progress=progress, target_len=target_len)
    g = spec.group_size
    # span recall of a KV head = mean over its query heads and over the profiled bins
    recall = mass.span_recall.mean(-1).view(spec.num_layers, spec.num_kv_heads, g, len(SPAN_OPTIONS)).mean(2)
    layer_kl = layer_sensitivity(lm, length, progress=progress) if calibrate and mass.span_error is not None else None
    return Spans(recall, mass.span_error, layer_kl, mass.quant_error)


def group_max(x: torch.Tensor, group: int) -> torch.Tensor:
    """[layers, q_heads] -> [layers, kv_heads]: max over each KV head's query heads (GQA order)."""
    return x.view(x.shape[0], -1, group).amax(-1)


@contextmanager
def phase(timings: dict[str, float], name: str, log: bool) -> Iterator[None]:
    """Time one profiling phase into ``timings[name + "_s"]``; with ``log`` (``--no-progress``: no bars to watch), a
    line on stderr when it starts and when it ends, so a run cut short by a time limit says how far it got."""
    if log:
        print(f"headwise profile: {name} ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    yield
    timings[f"{name}_s"] = time.perf_counter() - t
    if log:
        print(f"headwise profile: {name} took {timings[f'{name}_s']:.1f} s", file=sys.stderr, flush=True)


def act_within_budget(lm: LoadedModel, policies: list[list[Policy]], heads: list[tuple[int, int]],
                      delta: dict[tuple[int, int], float], budget: float,
                      lengths: tuple[int, ...]) -> list[tuple[int, int]]:
    """The ACT heads that fit: ACT keeps one fp32 column sum per token beside a full head's keys and values, so a
    plan solved up to its budget (or a dense one) would hold more than the budget, or than dense, with them. Heads
    are added most helpful first (``delta``, the held-in loss change) while the plan's peak stays within ``budget``
    of dense KV at every length in ``lengths``; the others stay ``full``."""
    from headwise.profile.act import with_act

    spec = lm.spec
    kept: list[tuple[int, int]] = []
    for h in sorted(heads, key=lambda h: delta.get(h, 0.0)):
        plan = HeadPlan.from_policies(spec, with_act(policies, [*kept, h]), lm.name)
        if all(plan.kv_bytes(spec, n, peak=True) <= budget * spec.dense_kv_bytes(n, 2) for n in lengths):
            kept.append(h)
    return [h for h in heads if h in kept]


def profile_model(lm: LoadedModel, budget: float, target_len: int = 4096, method: str = DEFAULT_METHOD,
                  settings: Settings | None = None, progress: bool = True, command: str = "",
                  full_share: float | None = None, quantize: Quantize = False, ranks: int = 1, act: bool | str = False,
                  train_seer_gates: bool = False, fit_lengths: tuple[int, ...] = (),
                  ablation_base: str = "full", select_under: tuple[float, ...] = (),
                  select_lengths: tuple[int, ...] = (), ablation_switch: str = "streaming",
                  select_deals: int = 0, select_2bit: bool = False,
                  select_text_allowance: float | None = SELECT_TEXT_ALLOWANCE) -> HeadPlan:
    """Measure, solve and return the plan (not saved: the caller saves it atomically).

    ``full_share`` None: the plan is chosen among candidates (each available ranking, ``method``'s first, x
    ``SELECT_SHARES``) by the retrieval they keep on held-in probes (``select.py``), unless
    ``settings.select_probes`` is 0 (then ``FULL_SHARE``). ``quantize``: the solver may also keep heads whole in 8 or
    4 bits (policy ``quantized``) where full does not fit. ``ranks``: the tensor-parallel ranks the plan will run
    over (``solve``'s ``ranks``; the plan records a balanced placement for them, ``with_ranks``). ``act``: the full
    heads whose ACT calibration lowers the loss on held-in and held-out text (``True`` or ``"text"``), or on the
    answers of held-in and held-out retrieval probes (``"retrieval"``), get policy ``act`` (``act.py``).
    ``train_seer_gates``: SeerAttention gates are trained (``seer.py``), join the prefill-pattern search (needs
    ``settings.prefill_density``) and travel with the plan (``HeadPlan.gates``, saved beside it). ``fit_lengths``: the
    plan must hold at most ``budget`` of dense KV at these prompt lengths too (``solve``). ``ablation_base``: the
    policy the ablation ranking's unswitched heads run in (``ablate.BASES``; ``method="ablation"`` only), recorded in
    ``meta["ablation"]["base"]``. ``select_under``: smaller budgets whose plans (same ranking, same ``full_share``)
    compete with ``budget``'s on held-in probes at ``select_lengths`` (``select_under_budget``). ``ablation_switch``
    ``knorm``: the ranking measures switches to ``knorm`` instead of ``streaming``, and the solved plan's streaming
    heads on global layers become ``knorm`` heads of the same slots (``streaming_to_knorm``); it needs ``full_share``
    (the selection among shares and budgets judges streaming plans). ``select_deals``: the solved plan competes with
    that many re-deals of its policies over the heads on held-in probes at ``select_lengths``
    (``select_among_deals``; recorded in ``meta["select_deals"]``). ``select_2bit``: before the deals, each head the
    plan holds in 2-bit values competes with the menu's ring on those probes (``select_2bit_rings``; recorded in
    ``meta["select_2bit"]``), a ring kept only within ``select_text_allowance`` nats of the plan's text KL (None: no
    text term)."""
    from headwise.profile.mass import SPAN_OPTIONS, mass_scores
    from headwise.profile.razor import razor_scores
    from headwise.profile.retrieval import retrieval_scores

    check_room(lm.spec, budget, target_len, quantize)
    check_select_under(budget, select_under, full_share)
    check_select_deals(select_deals)
    if method not in METHODS:
        raise HeadwiseError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")
    if ablation_base != "full" and method != "ablation":
        raise HeadwiseError(f"--ablation-base {ablation_base} sets the base of the ablation ranking; it needs --method "
                            f"ablation, not {method}")
    if ablation_switch not in ABLATION_SWITCHES:
        raise HeadwiseError(f"unknown --ablation-switch '{ablation_switch}'; choose one of {', '.join(ABLATION_SWITCHES)}")
    if ablation_switch != "streaming" and (method != "ablation" or full_share is None or select_under or select_deals
                                           or select_2bit):
        raise HeadwiseError(f"--ablation-switch {ablation_switch} needs --method ablation and --full-share, without "
                            "--select-under, --select-2bit or --select-deals: the plan selection judges the solver's "
                            "streaming plans, not their knorm twins")
    settings = settings or Settings()
    if select_deals:  # before the profiling, not after it
        check_probe_lengths(lm, settings.select_probes, select_lengths, "--select-deals")
    if select_2bit:
        check_select_2bit(quantize)
        check_probe_lengths(lm, settings.select_probes, select_lengths, "--select-2bit")
        check_text_allowance(select_text_allowance)
    if settings.ablation_text_weight and method != "ablation":
        raise HeadwiseError(f"an ablation text weight weighs the text term of the ablation ranking; it needs --method "
                            f"ablation, not {method}")
    # with --min-ring the ranking switches heads to that ring (what the plan's streaming heads hold at low budgets)
    menu = quant_menu(quantize)
    if menu is not None and menu.min_ring and ablation_switch != "streaming" and method == "ablation":
        raise HeadwiseError(f"--min-ring sets the ring the ablation ranking switches heads to; it cannot be combined "
                            f"with --ablation-switch {ablation_switch}")
    spec = lm.spec
    check_reachable(lm)
    timings: dict[str, float] = {}
    cpu0 = time.process_time()
    log = not progress
    with phase(timings, "retrieval", log):
        ret = retrieval_scores(lm, settings.retrieval_lengths, settings.retrieval_depths, settings.retrieval_tasks,
                               progress=progress)
    with phase(timings, "mass", log):
        mass_len = profile_length(spec, target_len, settings.mass_length)
        mass = mass_scores(lm, mass_len, progress=progress, target_len=target_len)
    with phase(timings, "razor", log):
        razor = razor_scores(lm, settings.razor_segment, 3, settings.razor_batch, progress=progress)
    g = spec.group_size
    kv_scores = {
        "retrieval": group_max(ret.scores, g),
        "razor": group_max(razor.score, g),
        "mass": group_max(mass.streaming_loss(), g),
    }
    duo_meta: dict[str, Any] = {}
    ablation_meta: dict[str, Any] = {}
    if method == "duo":
        from headwise.profile.duo import train_gates

        with phase(timings, "duo", log):
            seq_len = settings.duo_seq_len or min(2 * target_len, spec.max_context or 2 * target_len)
            duo = train_gates(lm, settings.duo_steps, seq_len, batch=settings.duo_batch, progress=progress,
                              time_limit_s=settings.duo_time_limit_s)
        kv_scores["duo"] = duo.alpha
        every = max(1, len(duo.losses) // 40)
        duo_meta = {"steps": duo.steps, "seq_len": duo.seq_len, "batch": settings.duo_batch,
                    "first_loss": duo.losses[0], "last_loss": duo.losses[-1],
                    "loss_curve": {str(i): round(duo.losses[i], 5) for i in range(0, len(duo.losses), every)}}
    if method == "ablation":
        from headwise.profile.ablate import ablation_ranking, ablation_text
        from headwise.profile.select import probe_set

        with phase(timings, "ablation", log):
            w = settings.ablation_text_weight
            text = ablation_text(lm, settings.ablation_text_tokens, profile_length(spec, target_len)) if w else None
            abl = ablation_ranking(lm, probe_set(lm.tokenizer, probe_lengths(spec, target_len),
                                                 settings.ablation_probes, seed=ABLATION_SEED),
                                   drop=settings.ablation_drop, time_limit_s=settings.ablation_time_limit_s,
                                   progress=progress, base=ablation_base, text=text, text_weight=w,
                                   switch=ablation_switch, ring=menu.min_ring if menu is not None else 0)
        kv_scores["ablation"] = abl.score
        ablation_meta = abl.meta()
    with phase(timings, "layer_sensitivity", log):
        spans = measure_spans(lm, target_len, settings.calibrate, progress, mass, mass_len)
    selection: dict[str, Any] = {}
    with phase(timings, "solve", log):
        if select_under:
            assert full_share is not None  # check_select_under
            sol, selection = select_under_budget(lm, kv_scores[method], budget, select_under, target_len,
                                                 spans.value, full_share, settings.select_probes, quantize, ranks,
                                                 fit_lengths, select_lengths)
        elif full_share is None and settings.select_probes > 0:
            sol, method, full_share, selection = _select(lm, kv_scores, method, budget, target_len, spans,
                                                         settings.select_probes, quantize, ranks, fit_lengths)
        else:
            full_share = FULL_SHARE if full_share is None else full_share
            sol = solve(spec, kv_scores[method], budget, target_len, spans.value, full_share=full_share,
                        quantize=quantize, ranks=ranks, fit_lengths=fit_lengths)
    rings: dict[str, Any] = {}
    if select_2bit:
        with phase(timings, "select_2bit", log):
            sol, rings = select_2bit_rings(lm, sol, quantize, budget, target_len, settings.select_probes,
                                           select_lengths, select_text_allowance, settings.select_text_tokens)
    deals: dict[str, Any] = {}
    if select_deals:
        with phase(timings, "select_deals", log):
            sol, deals = select_among_deals(lm, sol, select_deals, budget, target_len, settings.select_probes,
                                            select_lengths, fit_lengths)
    policies = sol.policies
    if ablation_switch == "knorm":
        policies = streaming_to_knorm(policies, spec)
    pattern_meta: dict[str, Any] = {}
    gates = None
    if train_seer_gates:
        from headwise.profile.patterns import BLOCK
        from headwise.profile.seer import profile_texts
        from headwise.profile.seer import train_gates as fit_gates

        if settings.prefill_density is None:
            raise HeadwiseError("training SeerAttention gates needs a prefill-pattern density (--prefill-patterns) "
                                "for the gate to compete at")
        with phase(timings, "seer_gates", log):
            seq = min(settings.seer_seq_len, spec.max_context or settings.seer_seq_len)
            fit = fit_gates(lm, profile_texts(lm, seq, 8, offset=1), settings.seer_steps, BLOCK, progress=progress,
                            time_limit_s=settings.seer_time_limit_s)
            gates = fit.gates.on("cpu")
    if settings.prefill_density is not None:
        from headwise.profile.patterns import search_patterns

        with phase(timings, "patterns", log):
            found = search_patterns(lm, sol.full_heads, settings.pattern_length, settings.prefill_density,
                                    progress=progress, gates=gates)
        for (i, j), choice in found.items():
            policies[i][j] = choice.policy
            pattern_meta[f"{i},{j}"] = {"chosen": choice.policy.to_spec(), "recall": round(choice.recall, 4),
                                        "density": round(choice.density, 4), "candidates": choice.table}
    act_meta: dict[str, Any] = {}
    if act:
        from headwise.profile.act import act_probes, act_texts, choose_act_heads, with_act

        with phase(timings, "act", log):
            length = min(settings.act_length, (spec.max_context or settings.act_length))
            if act == "retrieval":
                choice = choose_act_heads(lm, policies, *act_probes(lm, length, settings.act_probes),
                                          progress=progress)
            else:
                choice = choose_act_heads(lm, policies, *act_texts(lm, length), progress=progress)
            kept = act_within_budget(lm, policies, choice.heads, choice.delta, budget, (target_len, *fit_lengths))
            policies = with_act(policies, kept)
        act_meta = choice.meta()
        if kept != choice.heads:
            act_meta["dropped_for_budget"] = [list(h) for h in choice.heads if h not in kept]
            act_meta["heads"] = [list(h) for h in kept]
    # CPU seconds of this process (all threads): less sensitive than wall time to other jobs on a shared machine
    timings["process_cpu_s"] = time.process_time() - cpu0
    r2 = lambda x: [[round(float(v), 4) for v in row] for row in x.tolist()]  # noqa: E731
    meta: dict[str, Any] = {
        "created_by": command or f"headwise profile {lm.name} --budget {budget} --method {method}",
        "method": method,
        "budget": budget,
        "target_len": target_len,
        **({"fit_lengths": list(fit_lengths)} if fit_lengths else {}),
        "full_share": full_share,
        "solution": sol.info(),
        "timings_s": {k: round(v, 2) for k, v in timings.items()},
        "dense_needle_accuracy": round(ret.accuracy, 4),
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in settings.__dict__.items()},
        "scores": {
            "retrieval_q": r2(ret.scores),
            "echo_q": r2(razor.echo),
            "induction_q": r2(razor.induction),
            "sink_mass_q": r2(mass.sink),
            "local_mass_q": r2(mass.local),
            **{f"{k}_kv": r2(v) for k, v in kv_scores.items()},
        },
        "score_aggregation": "max over the query heads of each KV head",
        "span_options": [list(o) for o in SPAN_OPTIONS],
        "span_recall_target_len": target_len,
        **spans.meta(),
    }
    if ablation_meta:
        meta["ablation"] = ablation_meta
    if duo_meta:
        meta["duo"] = duo_meta
    if act:
        meta["act"] = act_meta
    if selection:
        meta["selection"] = selection
    if rings:
        meta["select_2bit"] = rings
    if deals:
        meta["select_deals"] = deals
    if settings.prefill_density is not None:
        meta["prefill_patterns"] = {"density": settings.prefill_density, "length": settings.pattern_length,
                                    "heads": pattern_meta}
    plan = with_ranks(HeadPlan.from_policies(spec, policies, lm.name, **meta), spec, ranks, target_len)
    if gates is not None:
        plan.meta["seer_training"] = dict(gates.info)
        plan.gates = gates
    return plan


def streaming_to_knorm(policies: list[list[Any]], spec: ModelSpec) -> list[list[Any]]:
    """Every ``streaming`` head of a global layer (no compensation) -> ``knorm`` holding the same slots: the newest
    ``min(knorm.DEFAULT_WINDOW, slots)`` tokens and, of the older ones, the rest by key norm. Native sliding layers keep
    their streaming heads (their window is the model's)."""
    from headwise.policies.knorm import DEFAULT_WINDOW, KNorm
    from headwise.policies.streaming import Streaming

    out = []
    for i, row in enumerate(policies):
        new_row = []
        for pol in row:
            if isinstance(pol, Streaming) and not pol.compensation and spec.layer_windows[i] is None:
                slots = pol.sink + pol.window
                window = min(DEFAULT_WINDOW, slots)
                pol = KNorm(tokens=slots - window, window=window)
            new_row.append(pol)
        out.append(new_row)
    return out


def with_ranks(plan: HeadPlan, spec: Any, ranks: int, at: int) -> HeadPlan:
    """``plan`` with a balanced placement for ``ranks`` tensor-parallel ranks at ``at`` tokens (``ranks > 1``)."""
    from headwise.placement import balance

    return plan.with_placement(ranks, balance(plan, spec, ranks, at), at) if ranks > 1 else plan


ABLATION_SEED = 2_000_003
"""Seed of the ablation's probes: not the selection's (``select.probe_set``'s default), so the share of the budget
for full heads is chosen on probes the ranking was not fitted to."""


def probe_lengths(spec: ModelSpec, target_len: int) -> list[int]:
    """Lengths the held-in probes run at: the target length and twice it, within the model's context."""
    limit = spec.max_context or 2 * target_len
    return sorted({min(target_len, limit - 32), min(2 * target_len, limit - 32)})


def _select(lm: LoadedModel, kv_scores: dict[str, torch.Tensor], method: str, budget: float, target_len: int,
            spans: Spans, n_probes: int, quantize: Quantize = False, ranks: int = 1,
            fit_lengths: tuple[int, ...] = ()) -> tuple[Any, str, float, dict[str, Any]]:
    """Solve each ranking x ``SELECT_SHARES`` candidate and keep the one that answers the most held-in probes."""
    from headwise.profile.select import Candidate, probe_set, select

    spec = lm.spec
    rankings = [method] + [m for m in ("ablation", "duo", "retrieval") if m != method and m in kv_scores]
    cands = [Candidate(r, f, solve(spec, kv_scores[r], budget, target_len, spans.value, full_share=f,
                                   quantize=quantize, ranks=ranks, fit_lengths=fit_lengths))
             for r in rankings for f in SELECT_SHARES]
    lengths = probe_lengths(spec, target_len)
    probes = probe_set(lm.tokenizer, lengths, n_probes)
    best, dense = select(lm, cands, probes)
    info = {"probes_per_length": n_probes, "lengths": lengths, "dense_probe_accuracy": round(dense, 4),
            "candidates": [c.info() for c in cands], "chosen": best.info()}
    return best.solution, best.ranking, best.full_share, info


def check_select_under(budget: float, under: tuple[float, ...], full_share: float | None) -> None:
    """Raise ``InputError`` unless ``under`` lists budgets in (0, ``budget``] for plans of one ``full_share``."""
    if not under:
        return
    bad = [b for b in under if not 0.0 < b <= budget]
    if bad:
        raise InputError(f"--select-under lists budgets the plan for --budget {budget} may hold instead, each in "
                         f"(0, {budget}]; got {', '.join(f'{b:g}' for b in bad)}")
    if full_share is None:
        raise InputError("--select-under compares the plans one ranking gives at several budgets with one share of "
                         "the budget for full heads; give --full-share (e.g. 1.0)")


def parse_budgets(text: str) -> tuple[float, ...]:
    """``"0.25,0.3"`` -> (0.25, 0.3); an empty list or a word that is not a number is an ``InputError``."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise InputError(f"--select-under needs at least one budget below --budget (e.g. 0.25,0.3,0.5), got '{text}'")
    try:
        return tuple(float(x) for x in items)
    except ValueError:
        raise InputError(f"--select-under is a comma-separated list of budgets (e.g. 0.25,0.3,0.5), got '{text}'"
                         ) from None


def check_probe_lengths(lm: LoadedModel, n_probes: int, lengths: tuple[int, ...], flag: str) -> None:
    """Raise ``InputError`` unless ``flag``'s candidates can run on ``n_probes`` held-in probes per length at
    ``lengths`` (each leaving room for the answer in the model's context)."""
    if n_probes < 1:
        raise InputError(f"{flag} runs the candidate plans on held-in probes; it needs at least one probe per "
                         "length (--select-probes)")
    limit = lm.spec.max_context
    too_long = [L for L in lengths if limit is not None and limit < L + 32]
    if too_long:
        raise InputError(f"--select-lengths {', '.join(map(str, too_long))} leave no room for the probe's answer in "
                         f"{lm.name}'s {limit}-token context; use lengths up to {limit - 32}")


def measure_on_probes(lm: LoadedModel, cands: list[Any], target_len: int, n_probes: int,
                      lengths: tuple[int, ...], more: Callable[[list[Any]], list[Any]] | None = None) -> dict[str, Any]:
    """Run ``cands`` (``select.BudgetCandidate``s) and dense on ``n_probes`` held-in probes per length
    (``select.probe_set``'s seed, not the ablation's) at ``lengths`` (default: ``probe_lengths``), filling in what
    each answers (``select.measure_budgets``); ``more``, given the measured ``cands``, returns further candidates to
    run on the same probes (appended to ``cands``; dense is not run again). Returns what the probes and dense's
    answers were, for the meta."""
    from headwise.profile.select import hits_by_haystack, measure_budgets, probe_set

    use = sorted(set(lengths)) or probe_lengths(lm.spec, target_len)
    probes = probe_set(lm.tokenizer, use, n_probes)
    dense = measure_budgets(lm, cands, probes)
    extra = more(cands) if more is not None else []
    if extra:
        measure_budgets(lm, extra, probes, dense=dense)
        cands.extend(extra)
    return {"probes_per_length": n_probes, "lengths": use, "dense_probes_answered": int(dense.sum()),
            "probes": int(dense.numel()), "dense_by_haystack": hits_by_haystack(probes, dense),
            "probes_by_haystack": hits_by_haystack(probes, torch.ones_like(dense))}


DEAL_SEED = "headwise-select-deal"
"""Prefix of ``--select-deals``' seeds (``plan.deal_heads``): not the evaluation's ``random@equal`` draws'
(``eval.runner.RANDOM_SEED``), so the plan written is never one of its baseline draws by construction."""


def check_select_deals(n_deals: int) -> None:
    """Raise ``InputError`` unless ``n_deals`` (``--select-deals``) is a count of deals, 0 for none."""
    if n_deals < 0:
        raise InputError(f"--select-deals is how many re-deals of the plan's policies compete with it (0: none), at "
                         f"least 0; got {n_deals}")


def dealt_solution(sol: Any, policies: list[list[Any]]) -> Any:
    """``sol`` (``solver.Solution``) with its policies dealt to other heads as ``policies``: the same KV, its full and
    quantized heads where those policies now are, and no skipped heads (the ranking no longer placed them)."""
    import dataclasses

    from headwise.policies import Full, Quantized

    heads = [((i, j), p) for i, row in enumerate(policies) for j, p in enumerate(row)]
    return dataclasses.replace(sol, policies=policies, skipped=[],
                               full_heads=[h for h, p in heads if isinstance(p, Full)],
                               quantized_heads=[h for h, p in heads if isinstance(p, Quantized)])


def select_among_deals(lm: LoadedModel, sol: Any, n_deals: int, budget: float, target_len: int, n_probes: int,
                 lengths: tuple[int, ...] = (), fit_lengths: tuple[int, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """The solved plan ``sol`` or one of ``n_deals`` re-deals of its per-head policies (``plan.deal_heads`` seeded
    ``DEAL_SEED``:k, within global layers and within native sliding layers: the same KV bytes at every length),
    whichever answers the most held-in probes exactly; ties go to the solved plan, then to the lower mean answer NLL
    (``select.choose_deal``). Judged as ``select_under_budget`` judges budgets (``measure_on_probes``, the quantized
    heads rounded as their stores hold them). Why: on the H200, Gemma 3 270M's ablation-ranked plan kept 94/87/77
    passkeys at 2K/4K/8K where five random deals of the same policies kept 92-100/79-99/71-94 (docs/profiling.md).
    Returns the solution kept and ``meta["select_deals"]``."""
    from headwise.plan import HeadPlan, deal_heads
    from headwise.profile.select import DealCandidate, choose_deal, versus_plan

    check_select_deals(n_deals)
    check_probe_lengths(lm, n_probes, lengths, "--select-deals")
    spec = lm.spec
    at = sorted({target_len, *fit_lengths, *lengths, *probe_lengths(spec, target_len)})

    def held(policies: list[list[Any]]) -> list[int]:
        plan = HeadPlan.from_policies(spec, policies)
        return [plan.kv_bytes(spec, L, peak=True) for L in at]

    want = held(sol.policies)
    cands = [DealCandidate(budget, sol)]
    for k in range(n_deals):
        policies = deal_heads(spec, sol.policies, f"{DEAL_SEED}:{k}")
        if held(policies) != want:
            raise HeadwiseError(f"--select-deals: deal {k} holds other KV bytes than the solved plan at {at} tokens")
        differs = [(i, j) for i, row in enumerate(policies) for j, p in enumerate(row) if p != sol.policies[i][j]]
        cands.append(DealCandidate(budget, dealt_solution(sol, policies), deal=k, differs=differs))
    common = measure_on_probes(lm, cands, target_len, n_probes, lengths)
    versus_plan(cands[0], cands[1:])
    best = choose_deal(cands)
    info = {"deals": n_deals, "seed": f"{DEAL_SEED}:K", **common, "candidates": [c.info() for c in cands],
            "kept": best.deal}
    return best.solution, info


def two_bit_heads(policies: list[list[Any]]) -> list[tuple[int, int]]:
    """(layer, KV head) of every ``quantized`` head holding 2-bit values (KIVI-2, or 4-bit keys over 2-bit values)."""
    from headwise.policies import Quantized

    return [(i, j) for i, row in enumerate(policies) for j, p in enumerate(row) if isinstance(p, Quantized) and p.bits == 2]


def ringed_policies(spec: ModelSpec, policies: list[list[Policy]], heads: list[tuple[int, int]],
                    ring: int) -> list[list[Policy]]:
    """A copy of ``policies`` with ``heads`` streaming on a ``ring``-token ring (``solver.ring_policy``: a window on a
    native sliding layer, half sinks on a global one)."""
    import copy

    from headwise.profile.solver import ring_policy

    out = copy.deepcopy(policies)
    for i, j in heads:
        out[i][j] = ring_policy(ring, spec.native_window(i))
    return out


def ringed_solution(spec: Any, sol: Any, heads: list[tuple[int, int]], ring: int, target_len: int) -> Any:
    """``sol`` (``solver.Solution``) with ``heads`` streaming on a ``ring``-token ring (``solver.ring_policy``: a window
    on a native sliding layer, half sinks on a global one) instead of their quantized codes, its KV recounted."""
    import dataclasses

    from headwise.plan import HeadPlan

    policies = ringed_policies(spec, sol.policies, heads, ring)

    def held(pols: list[list[Any]]) -> int:
        return HeadPlan.from_policies(spec, pols).kv_tokens(spec, target_len, peak=True)

    kv = sol.kv_tokens - (held(sol.policies) - held(policies))
    moved = set(heads)
    return dataclasses.replace(sol, policies=policies, kv_tokens=kv,
                               quantized_heads=[h for h in sol.quantized_heads if tuple(h) not in moved])


def check_select_2bit(quantize: Quantize) -> Any:
    """The menu ``quantize`` asks for; ``InputError`` unless it offers 2-bit codes (``--select-2bit`` judges them)."""
    menu = quant_menu(quantize)
    if menu is None or not menu.quantized or not menu.two_bit:
        raise InputError("--select-2bit judges the heads the solver holds in 2-bit codes: give --quantize --quant-2bit")
    return menu


@dataclass
class HeldInText:
    """``--select-2bit``'s text term: held-in text (``ablate.ablation_text``, ``SELECT_TEXT_TOKENS`` in rows of the
    target length) and dense's next-token log-probs on its last ``keep`` positions per row
    (``select_text_positions``); ``kl(policies)`` runs a plan on it (``select.plan_text_logprobs``)."""

    lm: LoadedModel
    ids: torch.Tensor
    keep: int
    dense: torch.Tensor

    @classmethod
    def load(cls, lm: LoadedModel, tokens: int, target_len: int) -> HeldInText:
        from headwise.profile.ablate import ablation_text
        from headwise.profile.select import plan_text_logprobs

        ids = ablation_text(lm, tokens, profile_length(lm.spec, target_len))
        keep = select_text_positions(*ids.shape)
        return cls(lm, ids, keep, plan_text_logprobs(lm, None, ids, keep))

    def kl(self, policies: list[list[Policy]]) -> float:
        """KL(dense || plan) in nats per position."""
        from headwise.profile.select import plan_text_logprobs, text_kl

        return text_kl(self.dense, plan_text_logprobs(self.lm, policies, self.ids, self.keep))

    def info(self) -> dict[str, int]:
        return {"rows": int(self.ids.shape[0]), "tokens": int(self.ids.shape[1]), "positions": self.keep}


def select_2bit_rings(lm: LoadedModel, sol: Any, quantize: Quantize, budget: float, target_len: int, n_probes: int,
                      lengths: tuple[int, ...] = (), text_allowance: float | None = SELECT_TEXT_ALLOWANCE,
                      text_tokens: int = SELECT_TEXT_TOKENS) -> tuple[Any, dict[str, Any]]:
    """Each head the solved plan ``sol`` holds in 2-bit values, judged against the menu's smallest ring (``min_ring``,
    else the spans' 128-token floor) on held-in probes: one candidate per such head with that head on the ring, then,
    where several beat the plan, one with those on rings together; the candidate answering the most probes exactly is
    kept, the plan on a tie (``select.choose_ring``). Judged as ``select_under_budget`` judges budgets
    (``measure_on_probes``, the quantized heads rounded as their stores hold them). Why: the solver values every
    quantized option above every ring (it keeps every token), but on Gemma 3 (docs/quality-runs.md, run 31) one sliding
    head in 2-bit codes cost the 0.25 plan most of its multi-key needles (18-24% where the 0.2 plan, with that head on
    a 32-token ring, kept 43-60%), and the held-in probes saw it (9 of 24 answered against 15). A candidate replaces
    the plan only if it answers more probes beyond chance (``select.SELECT_ALPHA``).

    ``text_allowance`` (nats, default ``select.SELECT_TEXT_ALLOWANCE``; None: no text term): the plan
    and each ring that beats it are also run on ``text_tokens`` of held-in text (``ablate.ablation_text``), and a
    candidate may replace the plan only if its KL from dense there exceeds the plan's by at most the allowance
    (``select.within_text``); the heads tried together are those rings, the most probes first, each added only while
    the set stays within it (one text forward per step). Why: on Gemma 3 at 0.3 (runs 32-33) the five rings the
    probes preferred lost 0.33 nats of text where one of them lost 0.01 and kept most of the multi-key needles.

    A ring never holds more than the codes it replaces, so the plan kept holds at most the solved plan's KV. Returns
    the solution kept and ``meta["select_2bit"]``."""
    from headwise.profile.select import RingCandidate, choose_ring, versus_plan
    from headwise.profile.solver import SPAN_FLOOR

    menu = check_select_2bit(quantize)
    check_probe_lengths(lm, n_probes, lengths, "--select-2bit")
    check_text_allowance(text_allowance)
    heads = two_bit_heads(sol.policies)
    ring = menu.min_ring or SPAN_FLOOR
    cands = [RingCandidate(budget, sol)]
    cands += [RingCandidate(budget, ringed_solution(lm.spec, sol, [h], ring, target_len), ringed=[h]) for h in heads]
    text: HeldInText | None = None  # loaded only when a ring beats the plan
    steps: list[dict[str, Any]] = []

    def together(measured: list[RingCandidate]) -> list[RingCandidate]:  # the heads whose ring alone beat the plan
        nonlocal text
        plan = measured[0]
        better = sorted((c for c in measured[1:] if c.answered > plan.answered), key=lambda c: (-c.answered, c.nll))
        chosen, set_kl = sorted(c.ringed[0] for c in better), None
        if text_allowance is not None and better:
            held = text = HeldInText.load(lm, text_tokens, target_len)
            plan.text_kl = held.kl(plan.solution.policies)
            for c in better:
                c.text_kl = held.kl(c.solution.policies)
            chosen, set_kl, found = rings_within_text(
                [(c.ringed[0], c.text_kl) for c in better],
                lambda hs: held.kl(ringed_policies(lm.spec, sol.policies, hs, ring)), plan.text_kl, text_allowance)
            steps.extend(found)
        if len(chosen) < 2:
            return []
        both = RingCandidate(budget, ringed_solution(lm.spec, sol, chosen, ring, target_len), ringed=chosen)
        both.text_kl = set_kl
        return [both]

    common: dict[str, Any] = {}
    if heads:
        common = measure_on_probes(lm, cands, target_len, n_probes, lengths, more=together)
        versus_plan(cands[0], cands[1:])
    best = choose_ring(cands, text_allowance)
    told = {} if text_allowance is None else {"text": {
        "allowance": text_allowance, "measured": text is not None,
        **({} if text is None else {**text.info(), "steps": steps})}}
    info = {"ring": ring, "heads": [list(h) for h in heads], **common, **told,
            "candidates": [c.info() for c in cands], "ringed": [list(h) for h in best.ringed]}
    return best.solution, info


def rings_within_text(order: list[tuple[tuple[int, int], float]], kl_of: Callable[[list[tuple[int, int]]], float],
                      plan_kl: float, allowance: float) -> tuple[list[tuple[int, int]], float | None, list[dict[str, Any]]]:
    """The set of rings ``--select-2bit`` tries together under its text term: the heads of ``order`` (each with its
    own ring's KL on held-in text), in that order, each added while the set's KL (``kl_of(sorted heads)``; a set of
    one is its own) stays within ``allowance`` nats of ``plan_kl``. Returns the heads (sorted), the set's KL (None for
    none) and one step per head tried (``ringed``, ``text_kl``, ``within``)."""
    chosen: list[tuple[int, int]] = []
    last: float | None = None
    steps: list[dict[str, Any]] = []
    for head, own in order:
        trial = sorted([*chosen, head])
        kl = own if len(trial) == 1 else kl_of(trial)
        fits = kl_within(kl, plan_kl, allowance)
        steps.append({"ringed": [list(h) for h in trial], "text_kl": round(kl, 4), "within": fits})
        if fits:
            chosen, last = trial, kl
    return chosen, last, steps


def check_text_allowance(allowance: float | None) -> None:
    """Raise ``InputError`` unless ``allowance`` (``--select-text-allowance``) is None or a number of nats >= 0."""
    if allowance is not None and not (allowance >= 0.0 and math.isfinite(allowance)):
        raise InputError(f"--select-text-allowance is the KL in nats a ring may add to the plan's on held-in text: a "
                         f"number >= 0, or 'off' for no text term; got {allowance}")


def print_rings(rings: dict[str, Any]) -> None:
    """One line on stdout: which 2-bit heads ``--select-2bit`` moved to the ring, and what the candidates answered."""
    cands = rings["candidates"]
    if len(cands) == 1:
        print("--select-2bit: no head in 2-bit values; the plan is as solved")
        return
    moved = ", ".join(f"layer {i} head {j}" for i, j in rings["ringed"]) or "none"
    singles = [c["probes_answered"] for c in cands[1:] if len(c["ringed"]) == 1]
    together = [f", {len(c['ringed'])} together {c['probes_answered']}" for c in cands[1:] if len(c["ringed"]) > 1]
    print(f"--select-2bit: moved to the {rings['ring']}-token ring: {moved} (probes answered exactly of "
          f"{rings['probes']}: plan {cands[0]['probes_answered']}, one head ringed {min(singles)}-{max(singles)} over "
          f"{len(singles)} heads{''.join(together)}, dense {rings['dense_probes_answered']}){_untold(cands[1:])}"
          f"{_text_told(rings)}")


def _text_told(rings: dict[str, Any]) -> str:
    """What the text term (``--select-text-allowance``) measured: the plan's KL on held-in text, what the rings kept
    add to it, and the rings or sets it kept out."""
    text = rings.get("text")
    if not text or not text.get("measured"):
        return ""
    cands = rings["candidates"]
    plan_kl = cands[0]["text_kl"]
    kept = next((c for c in cands if c["ringed"] == rings["ringed"]), cands[0])
    out = [f"held-in text KL: plan {plan_kl:.3f} nats"]
    if rings["ringed"]:
        out.append(f"with the rings kept {kept['text_kl']:.3f}")
    over = [s for s in text["steps"] if not s["within"]]
    if over:
        said = " / ".join(f"{', '.join(f'{i}.{j}' for i, j in s['ringed'])} (+{s['text_kl'] - plan_kl:.3f})"
                          for s in over)
        out.append(f"over the {text['allowance']:g}-nat allowance and not kept (layer.head): {said}")
    return "; " + "; ".join(out)


def _untold(cands: list[dict[str, Any]]) -> str:
    """Where no candidate moved the plan but one answered more probes: that its lead was within chance."""
    from headwise.profile.select import SELECT_ALPHA

    ahead = [c for c in cands if c["gained_vs_plan"] > c["lost_vs_plan"]]
    if not ahead or any(c["p_vs_plan"] < SELECT_ALPHA for c in ahead):
        return ""
    best = min(ahead, key=lambda c: c["p_vs_plan"])
    return (f"; the best lead, {best['gained_vs_plan']} probes gained and {best['lost_vs_plan']} lost, is within "
            f"chance (sign test p = {best['p_vs_plan']:.2g}, needs < {SELECT_ALPHA:g}): the plan is kept")


def print_deals(deals: dict[str, Any]) -> None:
    """One line on stdout: which of the solved plan and its deals ``--select-deals`` kept, and what each answered."""
    cands = deals["candidates"]
    kept = "the solved plan" if deals["kept"] is None else f"deal {deals['kept']}"
    answered = [c["probes_answered"] for c in cands[1:]]
    print(f"--select-deals: kept {kept} (probes answered exactly of {deals['probes']}: solved plan "
          f"{cands[0]['probes_answered']}, {len(answered)} deals {min(answered, default=0)}-{max(answered, default=0)}, "
          f"dense {deals['dense_probes_answered']}){_untold(cands[1:])}")


def select_under_budget(lm: LoadedModel, score: torch.Tensor, budget: float, under: tuple[float, ...],
                        target_len: int, span_value: torch.Tensor | None, full_share: float, n_probes: int,
                        quantize: Quantize = False, ranks: int = 1, fit_lengths: tuple[int, ...] = (),
                        lengths: tuple[int, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """The plan for ``budget`` that keeps the most retrieval: ``score`` solved at ``budget`` and at each budget in
    ``under`` (usually nested: a larger budget keeps every head at least as precisely; ``meta["selection"]["nested"]``
    says whether they are), each run on the held-in probes
    (``select.probe_set``'s seed, not the ablation's) at ``lengths`` (default: ``probe_lengths``); the one answering
    the most exactly wins, ties going to the one holding less KV (``select.choose_budget``). More KV is not always
    more retrieval: on the H200, SmolLM2's plan at 0.75 (52 full + 37 4-bit + 1 8-bit) kept 52/75 2K passkeys where the
    nested plan at 0.5 (15 full + 75 4-bit) kept 71/72 (docs/quality.md). Returns the solution and
    ``meta["selection"]``."""
    from headwise.profile.select import BudgetCandidate, choose_budget, nested

    check_select_under(budget, under, full_share)
    check_probe_lengths(lm, n_probes, lengths, "--select-under")
    spec = lm.spec
    cands = []
    for b in sorted({*under, budget}):
        try:
            sol = solve(spec, score, b, target_len, span_value, full_share=full_share, quantize=quantize, ranks=ranks,
                        fit_lengths=fit_lengths)
        except BudgetError as exc:
            if b == budget:
                raise
            raise BudgetError(f"--select-under {b:g}: {exc}; drop it from the list") from None
        cands.append(BudgetCandidate(b, sol))
    common = measure_on_probes(lm, cands, target_len, n_probes, lengths)
    best = choose_budget(cands)
    info = {"by": "budget", **common, "nested": nested([c.solution.policies for c in cands]), "full_share": full_share,
            "candidates": [c.info() for c in cands], "chosen": best.info()}
    return best.solution, info


def print_selection(selection: dict[str, Any]) -> None:
    """The budget selection's candidates as a short table on stdout (``--select-under``): probes answered exactly
    per length, in all, and in repeated filler (``cycle``, the evaluation's passkey regime)."""
    lengths = [str(L) for L in selection["lengths"]]
    cycle = selection.get("probes_by_haystack", {}).get("cycle", 0)
    print(f"budget  KV held  {'  '.join(f'{L:>6}' for L in lengths)}     all  cycle  plan "
          f"(probes answered exactly of {selection['probes_per_length']} per length, {cycle} in cycle; dense "
          f"{selection['dense_probes_answered']}/{selection['probes']})")
    for c in selection["candidates"]:
        mark = "*" if c["budget"] == selection["chosen"]["budget"] else " "
        by = "  ".join(f"{c['answered_by_length'].get(L, 0):>6}" for L in lengths)
        print(f"{c['budget']:<6g}{mark} {100 * c['kv_fraction']:6.1f}%  {by}  {c['probes_answered']:>6}  "
              f"{c['answered_by_haystack'].get('cycle', 0):>5}  {c['plan']}")


def resolve_from_scores(lm: LoadedModel, source: HeadPlan, budget: float, target_len: int, method: str,
                        command: str = "", full_share: float | None = FULL_SHARE, select_probes: int = 0,
                        quantize: Quantize = False, ranks: int = 1, fit_lengths: tuple[int, ...] = (),
                        select_under: tuple[float, ...] = (), select_lengths: tuple[int, ...] = (),
                        progress: bool = False, select_deals: int = 0, select_2bit: bool = False,
                        select_text_allowance: float | None = SELECT_TEXT_ALLOWANCE,
                        select_text_tokens: int = SELECT_TEXT_TOKENS) -> HeadPlan:
    """Re-solve a budget from the scores a previous profile recorded in its plan's metadata (no measuring but,
    with ``full_share`` None and ``select_probes``, the candidates' retrieval on held-in probes: ``_select``; with
    ``select_under``, the smaller budgets' plans on them: ``select_under_budget``; with ``select_2bit``, each head in
    2-bit values against the menu's ring on them, within ``select_text_allowance`` nats of the plan's text KL on
    ``select_text_tokens`` of held-in text: ``select_2bit_rings``; with ``select_deals``, that many
    re-deals of the solved plan's policies on them: ``select_among_deals``; and, when ``target_len`` is not
    the length the source's span recalls were measured at, those recalls again at ``target_len``).

    The measured scores, spans and timings are carried over; ``meta["scores_from"]`` names the profile run."""
    check_budget(budget)
    check_select_under(budget, select_under, full_share)
    check_select_deals(select_deals)
    check_text_allowance(select_text_allowance)
    source.check_model(lm.spec)
    meta = dict(source.meta)
    key = f"{method}_kv"
    if key not in meta.get("scores", {}):
        have = sorted(k[: -len("_kv")] for k in meta.get("scores", {}) if k.endswith("_kv"))
        raise HeadwiseError(f"the profile in --from-scores has no '{method}' scores (it has: {', '.join(have) or 'none'}); "
                            f"profile again with --method {method}")
    spans = Spans.from_meta(meta)
    if spans is not None and meta.get("span_recall_target_len") != target_len:
        # The ranking carries over; the streaming spans' recalls depend on the length, so they are measured
        # again here, with the source profile's settings (the attention-mass pass, not the ranking).
        was = meta.get("span_recall_target_len", "an unrecorded length")
        print(f"headwise profile: the span recalls in --from-scores were measured at {was} tokens; measuring them at "
              f"--target-len {target_len}", file=sys.stderr)
        known = source.meta.get("settings", {})
        spans = measure_spans(lm, target_len, bool(known.get("calibrate", True)), progress,
                              length=profile_length(lm.spec, target_len, int(known.get("mass_length", 0))))
        for k in ("span_error_kv", "layer_kl", "quant_error_kv", "quant_error_options"):
            meta.pop(k, None)
        meta.update({"span_recall_target_len": target_len, "span_recall_remeasured_from": was, **spans.meta()})
    selection: dict[str, Any] = {}
    if select_under:
        assert full_share is not None  # check_select_under
        sol, selection = select_under_budget(lm, torch.tensor(meta["scores"][key]), budget, select_under, target_len,
                                             None if spans is None else spans.value, full_share, select_probes,
                                             quantize, ranks, fit_lengths, select_lengths)
    elif full_share is None and select_probes > 0 and spans is not None:
        kv_scores = {k[: -len("_kv")]: torch.tensor(v) for k, v in meta["scores"].items() if k.endswith("_kv")}
        sol, method, full_share, selection = _select(lm, kv_scores, method, budget, target_len, spans, select_probes,
                                                     quantize, ranks, fit_lengths)
    else:
        full_share = FULL_SHARE if full_share is None else full_share
        sol = solve(lm.spec, torch.tensor(meta["scores"][key]), budget, target_len,
                    None if spans is None else spans.value, full_share=full_share, quantize=quantize, ranks=ranks,
                    fit_lengths=fit_lengths)
    for key in ("selection", "select_deals", "select_2bit"):
        meta.pop(key, None)
    if selection:
        meta["selection"] = selection
    if select_2bit:
        sol, meta["select_2bit"] = select_2bit_rings(lm, sol, quantize, budget, target_len, select_probes,
                                                     select_lengths, select_text_allowance, select_text_tokens)
    if select_deals:
        sol, meta["select_deals"] = select_among_deals(lm, sol, select_deals, budget, target_len, select_probes,
                                                       select_lengths, fit_lengths)
    meta.update({
        "created_by": command or f"headwise profile {lm.name} --budget {budget} --method {method}",
        "scores_from": {"created_by": source.meta.get("created_by"), "method": source.meta.get("method"),
                        "budget": source.meta.get("budget"), "target_len": source.meta.get("target_len")},
        "method": method,
        "budget": budget,
        "target_len": target_len,
        **({"fit_lengths": list(fit_lengths)} if fit_lengths else {}),
        "full_share": full_share,
        "solution": sol.info(),
    })
    for key in ("prefill_patterns", "seer_gates", "seer_training"):  # patterns (and their gates) are not re-solved
        meta.pop(key, None)
    return with_ranks(HeadPlan.from_policies(lm.spec, sol.policies, lm.name, **meta), lm.spec, ranks, target_len)


def draw_plan(plan: HeadPlan, spec: Any, path: str) -> str:
    """Heatmap PNG of the plan's recorded scores and its policies."""
    import numpy as np

    from headwise.profile.heatmap import draw

    s = plan.meta.get("scores", {})
    panels = {name: np.array(s[key]) for name, key in (
        ("retrieval (q heads)", "retrieval_q"), ("echo (q)", "echo_q"), ("induction (q)", "induction_q"),
        ("sink mass (q)", "sink_mass_q"), ("local mass (q)", "local_mass_q"), ("duo alpha (kv)", "duo_kv"),
    ) if key in s}
    pols = plan.policies()
    title = (f"{plan.model.get('name', '')}: method={plan.meta.get('method')} budget={plan.meta.get('budget')} "
             f"@ {plan.meta.get('target_len')} tok -> {plan.meta.get('solution', {}).get('kv_fraction')} of dense KV")
    return str(draw(path, panels, pols, list(spec.layer_windows), title))
