"""``headwise eval``: several plans, the same generated tasks, one results file.

    headwise eval smollm2-135m --plans dense,plans/smollm2-135m.json,streaming@equal,quest@equal \\
        --tasks passkey,needle,mqar,fidelity --lengths 1k,2k --samples 4 --out eval-out

Plan specs (``--plans``, comma-separated):

- ``dense``: every head full attention.
- a plan file (``plans/x.json``): must have been made for this model (checked against its fingerprint).
- ``streaming@equal`` / ``streaming@F``: StreamingLLM on every KV head, all heads holding the same number of
  tokens (``streaming_baseline``), chosen per length so the KV token slots held at that length equal the most
  the first plan file given holds while a request of that length runs (``@equal``: ``HeadPlan.kv_tokens`` with
  ``peak``, a quantized head's largest residual included) or the fraction ``F`` of dense (``@0.25``).
- ``random@equal`` / ``random@equal:SEED``: the first plan file's own policies dealt to the KV heads in a seeded random order (within
  global layers and within native sliding layers apart), so it holds exactly the same KV at every length and
  differs only in *which* heads keep what: the test of whether the profiler found the heads that matter (a deal
  that gives the plan back is drawn again: ``random_baseline``). ``random@equal*N``: draws 0 to N-1
  (``expand_plan_items``); the accuracy table then also has their samples pooled (``pooled_random_rows``), the
  expected accuracy of random placement, where one draw is a lottery.
- ``knorm@equal`` / ``knorm@F``: KNorm (``policies/knorm.py``, Devoto et al. 2024; kvpress's KnormPress's ranking
  inside headwise's engine, cut after each prompt chunk rather than before the last prompt token) on every KV head,
  each holding as many tokens as the streaming baseline's: the keys of smallest norm and the newest 64.
- ``random-full@equal[:SEED]`` / ``random-full@F[:SEED]``: DuoAttention's random baseline: as many global-layer KV
  heads as the memory allows, drawn at random, keep every token and the rest stream (``random_full_baseline``); at
  the same KV slots as ``streaming@…``. Where no full head fits it is the streaming baseline.
- ``kivi@equal`` / ``kivi@F``: KIVI on every KV head (``kivi_baseline``): the most bits (8, 4, 2) and then the longest
  full-precision residual whose peak fits the same KV as the plan's: its bytes spread evenly, every token kept.
- ``quest@equal`` / ``quest@F``: Quest page selection (policy ``page_topk``) on every global-layer KV head,
  attending as many tokens per decode step as the streaming baseline holds per head. Quest keeps the whole
  cache (it selects pages to read, it does not drop them), so its KV bytes are dense plus page bounds: it
  matches the budget of *attended* tokens, not memory.

Every sample's result is appended to ``OUT/samples.jsonl`` under a key (model, plan digest, task, length,
depth, seed, sample index) as soon as it is scored; a rerun with the same arguments reads them back and only
runs what is missing, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headwise.bench.record import device_name, git_commit
from headwise.errors import ContextLengthError, HeadwiseError, InputError, PlanError
from headwise.eval.scoring import score, wilson
from headwise.eval.tasks import LENGTH_TOLERANCE, TASKS, make_sample, task_info
from headwise.models import default_dtype, dtype_name
from headwise.plan import HeadPlan, deal_heads

FIDELITY = "fidelity"
"""Pseudo-task: KL(dense ‖ plan), top-1 agreement and perplexity by position on Shakespeare (fidelity.py)."""
DEFAULT_TASKS = (*TASKS, FIDELITY)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
STREAMING_SINK = 64  # DuoAttention's streaming heads use 64 sinks with a 256-token window
QUEST_PAGE = 16  # Quest's page size


# ------------------------------------------------------------------------------------------ parsing
def parse_length(text: str) -> int:
    """``"4k"`` -> 4096, ``"1500"`` -> 1500."""
    m = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not m:
        raise InputError(f"cannot read length '{text}': use a number of tokens such as 1500, 1k or 8K")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def parse_list(text: str | None, what: str) -> list[str]:
    items = [t.strip() for t in (text or "").split(",") if t.strip()]
    if not items:
        raise InputError(f"--{what} is empty")
    return items


def parse_tasks(text: str | None) -> list[str]:
    if text is None or text.strip() == "all":
        return list(DEFAULT_TASKS)
    tasks = parse_list(text, "tasks")
    for t in tasks:
        if t != FIDELITY and t not in TASKS:
            raise InputError(f"unknown task '{t}'; valid tasks: {', '.join(DEFAULT_TASKS)} (or 'all')")
    return list(dict.fromkeys(tasks))


def parse_depths(text: str | None) -> list[float]:
    if text is None:
        return list(DEFAULT_DEPTHS)
    out = []
    for t in parse_list(text, "depths"):
        try:
            d = float(t)
        except ValueError:
            raise InputError(f"cannot read depth '{t}': use fractions between 0 and 1, e.g. 0,0.5,1") from None
        if not 0.0 <= d <= 1.0:
            raise InputError(f"depth {d} is outside [0, 1]")
        out.append(d)
    return out


# ------------------------------------------------------------------------------------------ plans
@dataclass
class PlanEntry:
    """One ``--plans`` item: a label and, per length, the plan to run (or why it cannot run)."""

    label: str
    source: str
    make: Callable[[int], HeadPlan]

    def plan_for(self, length: int) -> HeadPlan:
        return self.make(length)


def _water_level(caps: Sequence[int], tokens: float, length: int) -> int:
    """The largest ``b <= length`` with ``sum(min(b, cap)) <= tokens`` over heads that can hold ``caps`` tokens
    each (0 where even that is too much)."""
    lo, hi = 0, length
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(mid, c) for c in caps) <= tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _head_caps(spec: Any, length: int) -> dict[tuple[int, int], int]:
    """Tokens each (layer, KV head) can hold at ``length``: all of them, or a native sliding layer's window."""
    return {(i, j): min(length, w) if w is not None else length
            for i, w in enumerate(spec.layer_windows) for j in range(spec.num_kv_heads)}


def _head_budget(spec: Any, target_tokens: float, length: int, label: str, least: int) -> int:
    """The per-head token count ``b`` that spreads ``target_tokens`` evenly over all KV heads, each holding
    ``min(b, cap)`` where ``cap`` is what it can hold at ``length`` (a native sliding layer never holds more
    than its window): the largest ``b`` with ``sum(min(b, cap)) <= target_tokens`` (water filling)."""
    lo = _water_level(list(_head_caps(spec, length).values()), target_tokens, length)
    if lo < least:
        raise PlanError(f"{label}: a budget of {target_tokens:.0f} KV slots at {length} tokens leaves {lo} per "
                        f"KV head; it needs at least {least}")
    return lo


def streaming_baseline(spec: Any, name: str, target_tokens: float, length: int, label: str) -> HeadPlan:
    """StreamingLLM on every KV head, all heads holding the same ``b`` tokens (``_head_budget``) so the cache
    holds ``target_tokens`` slots after ``length`` tokens. Global layers: ``b`` = 64 sinks (fewer for tiny
    budgets) + a recent window. Native sliding layers: their own window, cut to ``b`` with no sink when ``b`` is
    smaller (a sink outside the native window would show the layer tokens it was never trained to see)."""
    b = _head_budget(spec, target_tokens, length, label, 2)
    sink = min(STREAMING_SINK, b // 4) or 1
    head = {"policy": "streaming", "params": {"sink": sink, "window": b - sink}}
    return _plan(spec, _rows(spec, head, b, length), name, f"streaming baseline ({label}) at {length} tokens")


def _rows(spec: Any, head: dict[str, Any], b: int, length: int) -> list[list[dict[str, Any]]]:
    """``head`` on every KV head of the global layers; on a native sliding layer its own window (``full``), cut to
    ``b`` (no sink) when ``b`` is smaller: a sink outside the native window would show the layer tokens it was never
    trained to see."""
    rows = []
    for w in spec.layer_windows:
        if w is None:
            layer_head = head
        elif b >= min(length, w):
            layer_head = {"policy": "full"}  # resolves to the native window
        else:
            layer_head = {"policy": "streaming", "params": {"sink": 0, "window": b}}
        rows.append([dict(layer_head) for _ in range(spec.num_kv_heads)])
    return rows


RANDOM_FULL_SEED = "headwise-random-full"
"""Prefix of the ``random-full@…:SEED`` draws' seeds (``random_full_baseline``)."""
RANDOM_FULL_LEAST = STREAMING_SINK + 256
"""The fewest tokens a streaming head of ``random_full_baseline`` holds beside full heads: DuoAttention's streaming
heads (64 sinks and a 256-token window)."""


def random_full_baseline(spec: Any, name: str, target_tokens: float, length: int, label: str,
                         seed: int = 0) -> HeadPlan:
    """DuoAttention's random baseline at a memory: ``k`` global-layer KV heads drawn at random (seeded) keep every
    token, every other head streams, all streaming heads holding the same ``b`` tokens (64 sinks and a window, as
    ``streaming_baseline``'s; native sliding layers their own window, cut to ``b`` when ``b`` is smaller), so the
    cache holds ``target_tokens`` slots after ``length`` tokens. ``k`` is the most full heads that leave each
    streaming head at least ``RANDOM_FULL_LEAST`` tokens; where no full head fits, this is ``streaming_baseline``."""
    import random

    globals_ = [(i, j) for i, w in enumerate(spec.layer_windows) if w is None for j in range(spec.num_kv_heads)]
    random.Random(f"{RANDOM_FULL_SEED}:{seed}").shuffle(globals_)
    caps = _head_caps(spec, length)
    for k in range(len(globals_), 0, -1):
        full = set(globals_[:k])
        b = _water_level([c for h, c in caps.items() if h not in full], target_tokens - k * length, length)
        if b >= min(RANDOM_FULL_LEAST, length):
            break
    else:  # no full head fits
        return streaming_baseline(spec, name, target_tokens, length, label)
    sink = min(STREAMING_SINK, b // 4) or 1
    rows = _rows(spec, {"policy": "streaming", "params": {"sink": sink, "window": b - sink}}, b, length)
    for i, j in full:
        rows[i][j] = {"policy": "full"}
    return _plan(spec, rows, name, f"random full heads ({label}, draw {seed}: {k} full, the rest streaming "
                                   f"{b} tokens) at {length} tokens")


def quest_baseline(spec: Any, name: str, target_tokens: float, length: int, label: str) -> HeadPlan:
    """Quest (``page_topk``) on every global-layer KV head, attending ``b`` tokens per decode step (whole
    pages; ``b`` as for the streaming baseline). Native sliding layers keep their window: Quest keeps the full
    cache, and on a sliding layer it would attend past the window."""
    from headwise.policies import policy_names

    if "page_topk" not in policy_names():
        raise PlanError(f"{label}: the Quest policy 'page_topk' is not available in this build")
    b = _head_budget(spec, target_tokens, length, label, 2 * QUEST_PAGE)
    head = {"policy": "page_topk", "params": {"page_size": QUEST_PAGE, "budget": (b // QUEST_PAGE) * QUEST_PAGE}}
    rows = [[dict(head) if w is None else {"policy": "full"} for _ in range(spec.num_kv_heads)]
            for w in spec.layer_windows]
    return _plan(spec, rows, name, f"Quest baseline ({label}) at {length} tokens")


def knorm_baseline(spec: Any, name: str, target_tokens: float, length: int, label: str) -> HeadPlan:
    """KNorm (``policies/knorm.py``: the keys of smallest norm + the newest ``knorm.DEFAULT_WINDOW`` tokens, fewer
    for tiny budgets) on every KV head, all holding the same ``b`` tokens as the streaming baseline. Native sliding
    layers as there (``_rows``)."""
    from headwise.policies.knorm import DEFAULT_WINDOW

    b = _head_budget(spec, target_tokens, length, label, 2)
    window = min(DEFAULT_WINDOW, b // 4) or 1
    head = {"policy": "knorm", "params": {"tokens": b - window, "window": window}}
    return _plan(spec, _rows(spec, head, b, length), name, f"KNorm baseline ({label}) at {length} tokens")


KIVI_MENU = ((8, 128), (8, 32), (4, 128), (4, 64), (4, 32), (2, 128), (2, 64), (2, 32))
"""The uniform KIVI baseline's candidates, best first: (bits, residual tokens), groups of 32 (KIVI's and transformers'
``QuantizedCache``'s 2 and 4 bits, 8 bits as the profiler offers them)."""


def kivi_baseline(spec: Any, name: str, target_tokens: float, length: int, label: str, itemsize: int) -> HeadPlan:
    """KIVI on every KV head (``policies/quantized.py``; as transformers' quantized cache quantizes every layer): the
    first of ``KIVI_MENU`` (most bits, then the longest residual) whose peak while decoding a request of ``length``
    tokens fits ``target_tokens`` (KV slots of ``itemsize``-byte elements, as ``HeadPlan.kv_tokens`` counts them).
    Every token stays reachable, so it tells whether a plan's choice of heads beats spreading its bytes evenly. Where
    not even the last fits, the last, which then holds more than the target (its KV fraction in the results says so).
    Native sliding layers quantize their window (``quantized``'s ``window``), as the profiled plans' heads do there."""
    def kivi(bits: int, residual: int) -> HeadPlan:
        head = {"policy": "quantized", "params": {"bits": bits, "group": 32, "residual": residual}}
        return HeadPlan.uniform(spec, head, name, created_by=f"KIVI baseline ({label}) at {length} tokens")

    for bits, residual in KIVI_MENU[:-1]:
        plan = kivi(bits, residual)
        if plan.kv_tokens(spec, length, itemsize, peak=True) <= target_tokens:
            return plan
    return kivi(*KIVI_MENU[-1])


def _plan(spec: Any, rows: list[list[dict[str, Any]]], name: str, created_by: str) -> HeadPlan:
    plan = HeadPlan.uniform(spec, {"policy": "full"}, name, created_by=created_by)
    plan.layers = rows
    plan.policies()  # validate
    return plan


_BASELINE = re.compile(r"(streaming|quest|knorm|kivi|random-full)@(equal|[0-9.]+)(?::([0-9]+))?|random@equal(?::[0-9]+)?")
_RANDOM_DRAWS = re.compile(r"random@equal\*([0-9]+)")
_RANDOM_LABEL = re.compile(r"random@equal(?::([0-9]+))?")
MAX_DRAWS = 20
POOLED = "random@equal, {n} draws pooled"
"""Label of the accuracy rows that pool the samples of several ``random@equal`` draws."""


def expand_plan_items(items: Sequence[str]) -> list[str]:
    """``--plans`` with each ``random@equal*N`` replaced by its N draws ``random@equal:0`` ... ``random@equal:N-1``."""
    out: list[str] = []
    for item in items:
        if m := _RANDOM_DRAWS.fullmatch(item):
            n = int(m.group(1))
            if not 2 <= n <= MAX_DRAWS:
                raise InputError(f"{item}: the number of random draws must be between 2 and {MAX_DRAWS}, got {n}")
            out += [f"random@equal:{seed}" for seed in range(n)]
        else:
            out.append(item)
    return out


_LONGHEADS = re.compile(r"longheads(-bound|-max)?(-qhead)?(?:@([0-9]+)(?:/([0-9]+))?)?")
_OFFLOAD = re.compile(r"offload(?:-(ivf|hnsw|exact))?(?:@([0-9]+)(?:/([0-9.]+))?)?")


def longheads_plan(spec: Any, name: str, window: int | None = None, chunk_size: int = 256,
                   chunk_score: str = "paper", choose_per: str = "kv_head") -> HeadPlan:
    """LongHeads on every KV head (native sliding layers keep their window): chunks of ``chunk_size``, ``window``
    attended tokens per query (default the paper's 4096: ``top_k = window / chunk_size - 3``), chunks scored the
    paper's way, by Quest's bound (``chunk_score="bound"``, spec ``longheads-bound``) or by their best key
    (``"max"``, ``longheads-max``), chosen per KV head or per query head (``-qhead``; policies/longheads.py)."""
    window = 4096 if window is None else window
    label = "longheads" + ("" if chunk_score == "paper" else f"-{chunk_score}") + (
        "-qhead" if choose_per == "query_head" else "")
    if chunk_size < 1 or window % chunk_size or window < 4 * chunk_size:
        raise InputError(f"{label}@{window}/{chunk_size}: the window must be a multiple of the chunk ({chunk_size} "
                         f"tokens), at least 4 chunks (the first, one chosen, the previous and the own chunk)")
    params: dict[str, Any] = {"chunk_size": chunk_size, "top_k": window // chunk_size - 3, "chunk_score": chunk_score}
    if choose_per != "kv_head":
        params["choose_per"] = choose_per
    return HeadPlan.uniform(spec, {"policy": "longheads", "params": params}, name,
                            created_by=f"headwise eval {label}@{window}/{chunk_size}")


RANDOM_SEED = "headwise-random-baseline"
"""Prefix of the ``random@equal:SEED`` draws' seeds (``deal_heads``); the profiler's ``--select-deals`` uses another."""


def random_baseline(spec: Any, reference: HeadPlan, name: str, seed: int = 0) -> HeadPlan:
    """``reference``'s per-head policies dealt to the KV heads in a seeded random order, global layers and native
    sliding layers apart (a policy means something else on a sliding layer): the same KV bytes at every length,
    other heads. A draw that deals every head the policy it has in ``reference`` is no baseline, so the deal is
    drawn again (up to 100 times) until some head differs, where any arrangement differs at all (``deal_heads``)."""
    rows = [[dict(h) for h in row] for row in deal_heads(spec, reference.layers, f"{RANDOM_SEED}:{seed}")]
    plan = _plan(spec, rows, name, f"random placement of {reference.meta.get('created_by', 'the plan')}'s policies")
    plan.gates = reference.gates  # a SeerAttention gate covers every head of its layer, wherever a seer head lands
    return plan


def _load_plan_file(item: str, lm: Any) -> HeadPlan:
    plan = HeadPlan.load(item)
    try:
        plan.check_model(lm.spec)
    except PlanError as exc:
        raise PlanError(f"plan file {item} does not fit {lm.name}: {exc}") from None
    return plan


def check_plan_specs(items: Sequence[str]) -> None:
    """Fail on an unknown spec or an unreadable plan file before any model is loaded."""
    for item in expand_plan_items(items):
        if item.endswith(".json") or os.path.exists(item):
            HeadPlan.load(item)
        elif item != "dense" and not any(r.fullmatch(item) for r in (_BASELINE, _LONGHEADS, _OFFLOAD)):
            raise InputError(
                f"unknown plan '{item}': give 'dense', a plan file (.json), or a baseline "
                "streaming@equal, streaming@FRACTION, quest@equal, quest@FRACTION, knorm@equal, knorm@FRACTION, "
                "kivi@equal, kivi@FRACTION, "
                "random@equal[:SEED], random@equal*N, random-full@equal[:SEED], random-full@FRACTION[:SEED], "
                "longheads, "
                "longheads@WINDOW[/CHUNK], longheads-bound|-max[-qhead][@WINDOW[/CHUNK]], offload[-ivf|-hnsw|-exact][@TOP_K[/EF|/PROBE]]"
            )


def _prompt_room(length: int, new_tokens: int) -> int:
    """Tokens a prompt of nominal ``length`` and its answer may take: a task's prompt may run ``LENGTH_TOLERANCE``
    over its length."""
    return int(length * (1 + LENGTH_TOLERANCE)) + new_tokens


def _longest_fitting(limit: int, new_tokens: int) -> int:
    """The longest nominal prompt length whose prompts and ``new_tokens`` fit a context of ``limit`` tokens."""
    fits = max(0, int((limit - new_tokens) / (1 + LENGTH_TOLERANCE)))  # then exact, either way
    while _prompt_room(fits + 1, new_tokens) <= limit:
        fits += 1
    while fits and _prompt_room(fits, new_tokens) > limit:
        fits -= 1
    return fits


def resolve_plans(items: Sequence[str], lm: Any) -> list[PlanEntry]:
    """Turn ``--plans`` items into ``PlanEntry``s, in order. Plan files are loaded and checked against the
    model now; the first one is the reference that ``@equal`` baselines match."""
    spec = lm.spec
    items = expand_plan_items(items)
    check_plan_specs(items)
    files = {item: _load_plan_file(item, lm) for item in items if item.endswith(".json") or os.path.exists(item)}
    reference = next(iter(files), None)
    entries: list[PlanEntry] = []
    for item in items:
        m = _BASELINE.fullmatch(item)
        if item == "dense":
            dense = HeadPlan.dense(spec, lm.name)
            entries.append(PlanEntry("dense", "dense", lambda _L, p=dense: p))
        elif item in files:
            stem = Path(item).stem
            label = item if any(e.label == stem for e in entries) else stem
            entries.append(PlanEntry(label, item, lambda _L, p=files[item]: p))
        elif lm_match := _LONGHEADS.fullmatch(item):
            window = int(lm_match.group(3)) if lm_match.group(3) else None
            lh = longheads_plan(spec, lm.name, window, int(lm_match.group(4) or 256),
                                (lm_match.group(1) or "-paper")[1:], "query_head" if lm_match.group(2) else "kv_head")
            entries.append(PlanEntry(item, f"LongHeads on every head, {item}", lambda _L, p=lh: p))
        elif off_match := _OFFLOAD.fullmatch(item):
            head: dict[str, Any] = {"policy": "retrieval_offload"}
            index, top_k, width = off_match.groups()
            params = ({"index": index} if index else {}) | ({"top_k": int(top_k)} if top_k else {})
            if width is not None:  # the search's width: HNSW's ef, or the share of the inverted lists probed
                if index not in ("hnsw", "ivf"):
                    raise InputError(f"'{item}': a search width (/EF or /PROBE) goes with offload-hnsw or offload-ivf")
                try:
                    params |= {"ef": int(width)} if index == "hnsw" else {"probe": float(width)}
                except ValueError:
                    raise InputError(f"'{item}': HNSW's width is a whole number of candidates, e.g. "
                                     "offload-hnsw@100/1024") from None
            if params:
                head["params"] = params
            off = HeadPlan.uniform(spec, head, lm.name, created_by=f"headwise eval {item}")
            entries.append(PlanEntry(item, f"RetrievalAttention on every head, {item}", lambda _L, p=off: p))
        elif item.startswith("random@equal"):
            if reference is None:
                raise InputError("random@equal deals a plan file's policies to random heads: list a plan file in --plans")
            seed = int(item.partition(":")[2] or 0)  # random@equal:SEED, another draw (one draw is a lottery)
            rnd = random_baseline(spec, files[reference], lm.name, seed)
            entries.append(PlanEntry(item, f"{reference}'s policies on random heads (draw {seed})",
                                     lambda _L, p=rnd: p))
        elif m:
            kind, amount, draw = m.groups()
            if draw is not None and kind != "random-full":
                raise InputError(f"'{item}': only random-full@… takes a draw (:SEED)")
            if amount == "equal":
                if reference is None:
                    raise InputError(f"{item} matches the memory of a plan file: list a plan file in --plans, "
                                     f"or give a fraction of dense such as {kind}@0.25")

                def target(L: int, ref: HeadPlan = files[reference]) -> float:
                    # in the run's element size: a quantized head's codes are a smaller share of fp32 KV than of bf16;
                    # at the plan's peak, what it holds while it decodes (a streaming head's count never cycles)
                    return ref.kv_tokens(spec, L, lm.dtype.itemsize, peak=True)

                desc = f"{kind} at the KV slots of {reference}"
            else:
                try:
                    frac = float(amount)
                except ValueError:
                    raise InputError(f"cannot read the fraction in '{item}'") from None
                if not 0 < frac <= 1:
                    raise InputError(f"'{item}': the fraction of dense KV must be in (0, 1]")

                def target(L: int, frac: float = frac) -> float:
                    return frac * spec.dense_kv_tokens(L)

                desc = f"{kind} at {frac:g} of dense KV slots"
            if kind == "random-full":
                desc = f"random full heads (draw {int(draw or 0)}), the rest streaming, " + desc.partition(" ")[2]
                entries.append(PlanEntry(item, desc, lambda L, t=target, lab=item, d=int(draw or 0):
                                         random_full_baseline(spec, lm.name, t(L), L, lab, d)))
                continue
            if kind == "kivi":
                desc = "KIVI on every head, " + desc.partition(" ")[2]
                entries.append(PlanEntry(item, desc, lambda L, t=target, lab=item, n=lm.dtype.itemsize:
                                         kivi_baseline(spec, lm.name, t(L), L, lab, n)))
                continue
            build = {"streaming": streaming_baseline, "quest": quest_baseline, "knorm": knorm_baseline}[kind]
            entries.append(PlanEntry(item, desc, lambda L, b=build, t=target, lab=item: b(spec, lm.name, t(L), L, lab)))
    labels = [e.label for e in entries]
    if len(set(labels)) != len(labels):
        raise InputError(f"--plans lists the same plan twice: {', '.join(labels)}")
    return entries


# ------------------------------------------------------------------------------------------ cache
DEFAULT_CHUNK = 512
"""The prefill chunk of ``headwise eval`` (``--chunk-size``) unless told otherwise."""


def model_key(name: str, num_layers: int, num_kv_heads: int, head_dim: int, chunk_size: int = DEFAULT_CHUNK,
              dtype: str | None = None) -> str:
    """The model part of the sample keys: the model, its layer shape, the prefill chunk when it is not the default
    (the chunk changes what a plan computes: a knorm head compresses after every chunk, a quantized head attends its
    chunk unrounded) and ``dtype`` when given (``dtype_tag``: a dtype that is not its device's default), so rows of
    another chunk size or of a float32 run on a GPU are not reused, while rows of the defaults keep their old keys."""
    key = f"{name}:{num_layers}x{num_kv_heads}x{head_dim}"
    if chunk_size != DEFAULT_CHUNK:
        key += f":chunk{chunk_size}"
    return f"{key}:{dtype}" if dtype else key


def dtype_tag(dtype: str, on_gpu: bool) -> str | None:
    """``dtype`` (a name: float32, bfloat16, float16) for the sample keys, or None where it is what a model loads in
    on that device unless told (``models.default_dtype``: bfloat16 on a GPU, float32 on the CPU). A SmolLM2 passkey is
    decided at a first token within a logit (docs/quality.md), so a run in one dtype must never resume from rows of
    another."""
    return None if dtype == dtype_name(default_dtype("cuda" if on_gpu else "cpu")) else dtype


class SampleCache:
    """Per-sample results in JSONL files, one line per result, appended to ``path`` as soon as it exists; the
    rows of every ``samples*.jsonl`` beside it are read too (shards of one run, ``--shard``)."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[str, dict[str, Any]] = {}
        for f in sorted(path.parent.glob("samples*.jsonl")) if path.parent.is_dir() else []:
            for n, line in enumerate(f.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    self.rows[row["key"]] = row
                except (json.JSONDecodeError, KeyError):
                    # A line cut by an interrupt: the sample is simply run again.
                    print(f"headwise eval: ignoring unreadable line {n} of {f}", file=sys.stderr)

    @staticmethod
    def key(model: str, digest: str, task: str, length: int, depth: float | None, seed: int, idx: int) -> str:
        return json.dumps([model, digest, task, length, depth, seed, idx])

    def get(self, key: str) -> dict[str, Any] | None:
        return self.rows.get(key)

    def put(self, row: dict[str, Any]) -> None:
        self.rows[row["key"]] = row
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()


# ------------------------------------------------------------------------------------------ run
@dataclass
class EvalConfig:
    model: str
    plans: list[str]
    tasks: list[str]
    lengths: list[int]
    depths: list[float] = field(default_factory=lambda: list(DEFAULT_DEPTHS))
    samples: int = 4
    seed: int = 0
    out: Path = Path("eval-out")
    max_new_tokens: int | None = None
    on_too_long: str = "skip"
    device: str | None = None
    dtype: str | None = None
    chunk_size: int = DEFAULT_CHUNK
    command: str = ""
    progress: bool = True
    collect_only: bool = False
    """Generate nothing: write the results from the rows already in ``out`` (fidelity and memory rows that are
    missing are still measured: a few forwards per plan)."""
    fp32_logits: bool = False
    """Compute the logits in float32 (``models.fp32_logits``); rows are kept apart from a run without it."""
    shard: tuple[int, int] | None = None
    """``(i, n)``: run only every ``n``-th sample from the ``i``-th (several processes share a GPU), writing
    ``samples-shard-i-of-n.jsonl``; a run without a shard then finds every row and writes the results."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/8"`` -> (2, 8)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise InputError(f"cannot read shard '{text}': use I/N with 0 <= I < N, e.g. 0/8")
    return int(m.group(1)), int(m.group(2))


def cell_samples(task: str, depths: Sequence[float], samples: int) -> list[tuple[float | None, int]]:
    """The (depth, index) pairs of one task × length cell: ``samples`` in all, spread evenly over ``depths`` for
    tasks with a depth (each depth gets ``ceil(samples / len(depths))``)."""
    if not task_info(task).uses_depth:
        return [(None, i) for i in range(samples)]
    per = -(-samples // len(depths))
    return [(d, i) for d in depths for i in range(per)]


def job_order(lengths: Sequence[int], tasks: Sequence[str], depths: Sequence[float],
              samples: int) -> list[tuple[int, str, float | None, int]]:
    """Every (length, task, depth, index) to run, in rounds: the k-th sample of every depth of every cell before any
    (k+1)-th, so a run (or a shard: every n-th job) cut short leaves each cell with its depths balanced. Ordered
    cell by cell, a cut H200 run had kept its 2K cells at depths 0.1-0.5 only, where streaming fails most: 6% there
    against 35% over all depths."""
    ranked = []
    for L in lengths:
        for t in tasks:
            seen: dict[float | None, int] = defaultdict(int)
            for d, i in cell_samples(t, depths, samples):
                ranked.append((seen[d], L, t, d, i))
                seen[d] += 1
    ranked.sort(key=lambda r: r[0])  # stable: within a round, lengths, tasks and depths keep their order
    return [(L, t, d, i) for _, L, t, d, i in ranked]


def sample_seed(seed: int, idx: int) -> int:
    return seed * 100_003 + idx


def _tqdm(enabled: bool, **kw: Any) -> Any:
    from tqdm import tqdm

    return tqdm(disable=not enabled, dynamic_ncols=True, **kw)


def run_eval(cfg: EvalConfig, lm: Any = None) -> dict[str, Any]:
    """Run every plan on every task × length (× depth) sample; write ``OUT/results.json``; return it. With
    ``cfg.fp32_logits`` the model's logits are computed in float32 for the run (``models.fp32_logits``)."""
    from headwise.models import fp32_logits

    tasks = parse_tasks(",".join(cfg.tasks)) if cfg.tasks else list(DEFAULT_TASKS)
    if cfg.samples < 1:
        raise InputError(f"--samples must be at least 1, got {cfg.samples}")
    if cfg.on_too_long not in ("skip", "stop"):
        raise InputError(f"--on-too-long must be 'skip' or 'stop', got '{cfg.on_too_long}'")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1, got {cfg.max_new_tokens}")
    check_plan_specs(cfg.plans)
    if lm is None:
        from headwise.models import load_model

        lm = load_model(cfg.model, device=cfg.device, dtype=cfg.dtype)
    with fp32_logits(lm) if cfg.fp32_logits else contextlib.nullcontext():
        return _run_loaded(cfg, lm, tasks)


def _run_loaded(cfg: EvalConfig, lm: Any, tasks: list[str]) -> dict[str, Any]:
    """``run_eval`` once its arguments are checked and ``lm`` is loaded."""
    from headwise.engine import Engine

    entries = resolve_plans(cfg.plans, lm)
    spec = lm.spec
    notes: list[str] = []

    # Plans per length (baselines depend on it); a baseline that cannot be built is skipped with a note, and so is a
    # plan at a length past what it may run (prompt + the longest answer over ``HeadPlan.max_context``: the model's
    # context, or none for a plan such as longheads). A length no plan can run is dropped.
    longest_answer = max([cfg.max_new_tokens or task_info(t).max_new_tokens for t in tasks if t in TASKS] or [0])
    plans: dict[tuple[str, int], HeadPlan] = {}
    lengths: list[int] = []
    for L in cfg.lengths:
        need = _prompt_room(L, longest_answer)
        for e in entries:
            try:
                plan = e.plan_for(L)
            except PlanError as exc:
                notes.append(f"{e.label} at {L}: skipped: {exc}")
                print(f"headwise eval: {e.label} at {L} tokens skipped: {exc}", file=sys.stderr)
                continue
            limit = plan.max_context(spec)
            if limit and need > limit:
                fits = _longest_fitting(limit, longest_answer)
                msg = (f"length {L} (+{longest_answer} new tokens) exceeds {lm.name}'s context of {limit} tokens: "
                       + (f"a prompt may run {LENGTH_TOLERANCE:.0%} over its length, so the longest that fits is {fits}" if fits
                          else "no prompt fits beside the answer"))
                if cfg.on_too_long == "stop":
                    raise ContextLengthError(f"{e.label}: {msg}; drop it from --lengths or pass --on-too-long skip")
                notes.append(f"{e.label}: {msg}: skipped")
                print(f"headwise eval: {e.label}: {msg}: skipped", file=sys.stderr)
                continue
            plans[(e.label, L)] = plan
        if any((e.label, L) in plans for e in entries):
            lengths.append(L)
        same: dict[str, list[str]] = {}  # e.g. random-full@equal where no whole head fits: streaming@equal itself
        for e in entries:
            if (e.label, L) in plans:
                same.setdefault(plans[(e.label, L)].digest(), []).append(e.label)
        for labels in same.values():
            if len(labels) > 1:
                notes.append(f"at {L} tokens {' and '.join(labels)} are one plan "
                             f"({plans[(labels[0], L)].summary(spec, L)}): their rows are the same runs")

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "samples.jsonl" if cfg.shard is None else f"samples-shard-{cfg.shard[0]}-of-{cfg.shard[1]}.jsonl"
    cache = SampleCache(out / name)
    mkey = model_key(lm.name, spec.num_layers, spec.num_kv_heads, spec.head_dim, cfg.chunk_size,
                     dtype_tag(dtype_name(lm.dtype), lm.device.type == "cuda"))
    if cfg.fp32_logits and dtype_name(lm.dtype) != "float32":  # float32 logits break greedy ties: rows of their own
        mkey += ":logits32"
    gen_tasks = [t for t in tasks if t in TASKS]
    jobs = job_order(lengths, gen_tasks, cfg.depths, cfg.samples)
    if cfg.shard is not None:
        jobs = jobs[cfg.shard[0] :: cfg.shard[1]]
    if cfg.collect_only:
        jobs = []
    engines: dict[str, Any] = {}
    ran = 0
    bar = _tqdm(cfg.progress, total=len(jobs) * len(entries), desc="eval", unit="run")
    try:
        for L, t, d, i in jobs:
            sample = None
            for e in entries:
                plan = plans.get((e.label, L))
                if plan is None:
                    bar.update(1)
                    continue
                digest = plan.digest()
                key = SampleCache.key(mkey, digest, t, L, d, cfg.seed, i)
                if cache.get(key) is not None:
                    bar.update(1)
                    continue
                if sample is None:
                    sample = make_sample(t, lm.tokenizer, L, d, sample_seed(cfg.seed, i))
                if digest not in engines:
                    engines[digest] = Engine(lm, plan, chunk_size=cfg.chunk_size)
                bar.set_postfix_str(f"{e.label} {t} {L}")
                row = _run_sample(engines[digest], sample, cfg.max_new_tokens)
                row.update(key=key, plan=e.label, digest=digest, task=t, length=L, depth=d, seed=cfg.seed, idx=i)
                cache.put(row)
                ran += 1
                bar.update(1)
        if cfg.shard is not None:
            return {"shard": list(cfg.shard), "runs_this_time": ran}
        fid_rows = _run_fidelity(cfg, lm, entries, plans, lengths, cache, mkey) if FIDELITY in tasks else []
        _measure_memory(cfg, lm, entries, plans, lengths, cache, mkey)
    finally:
        bar.close()
    results = _collect(cfg, lm, entries, plans, lengths, tasks, cache, mkey, notes)
    results["runs_this_time"] = ran + len(fid_rows)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)
    return results


def _run_sample(engine: Any, sample: Any, max_new_tokens: int | None) -> dict[str, Any]:
    """Greedy generation of one sample; returns its output, score and the engine's statistics."""
    n_new = max_new_tokens or sample.max_new_tokens
    text, stats = [], None
    for ev in engine.generate(sample.prompt, max_new_tokens=n_new, temperature=0.0):
        if ev.stats is not None:
            stats = ev.stats
        else:
            text.append(ev.text)
    assert stats is not None
    output = "".join(text)
    return {
        "output": output,
        "answers": sample.answers,
        "score": score(sample.meta["scoring"], output, sample.answers),
        "prompt_tokens": stats.prompt_tokens,
        "stats": stats.to_dict(),
    }


MEMORY = "memory"
"""Pseudo-task row: the KV bytes a plan's cache holds after a prompt of the evaluated length and at its peak while
the new tokens are decoded, counted by the tensors' sizes and, on CUDA, by the allocator."""
MEMORY_NEW_TOKENS = 16
"""Tokens the memory row generates after its prompt (the cache is reserved for ``length + 15``, as ``generate``
reserves): enough decode steps for a CUDA graph (``engine.GRAPH_MIN_STEPS``), as the tasks' answers take."""


def measure_kv(engine: Any, length: int, new: int = MEMORY_NEW_TOKENS, cuda: bool = False) -> dict[str, Any]:
    """The KV bytes one request holds as the engine runs it: a ``length``-token prompt (random ids: the bytes depend
    on the length, not the ids) added to ``engine`` (``Engine.add``: its cache reserved for ``length + new - 1``
    tokens) and stepped (``Engine.step``) until it has generated ``new`` greedy tokens, EOS ignored: the prompt's
    chunks, then ``new - 1`` decode steps, from a CUDA graph where the engine uses one. Returns the tensors' bytes
    after the step that ends the prompt (``kv_bytes_tensors``) and their largest after it or any later step
    (``kv_bytes_tensors_peak``: a quantized head's residual cycles, and graph decode holds its largest at every
    step). With ``cuda``, also what the allocator gave out since before the cache was made, at the same moments
    (the step's logits are freed when it returns), except after steps replayed from a CUDA graph: then once the
    steps are done and the engine has freed the graph with its output and input buffers (the sequence keeps its
    cache, ``keep_cache``: what is left is the cache as the replays held it). ``engine`` must have no live
    sequence (they would step with this one)."""
    import torch

    if engine.live:
        raise InputError(f"measuring the KV of one request needs an engine with no live sequences; it has "
                         f"{len(engine.live)}")
    lm = engine.lm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        m0 = torch.cuda.memory_allocated(lm.device)

    def allocator() -> int:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(lm.device) - m0

    ids = torch.randint(0, min(1000, lm.model.config.vocab_size), (length,))
    seq = engine.add(ids, max_new_tokens=new, stop_token_ids=[], keep_cache=True)  # EOS ignored
    out: dict[str, Any] = {}
    peak: list[int | None] = [None, None]  # tensors, allocator
    while not seq.finished:
        info = engine.step()
        if seq.error is not None:
            raise seq.error
        if seq.prefilled < len(seq.prompt_ids):
            continue  # the prompt's earlier chunks: the readings start once it is all in the cache
        tensors = engine.kv_bytes(seq.cache)
        # Under a graph the allocator also counts the graph's pool: read once the engine has freed it, at the end.
        allocated = allocator() if cuda and (seq.finished or not info.graph) else None
        if not out:
            out = {"kv_bytes_tensors": tensors, "kv_bytes_allocator": allocated}
        peak[0] = max(peak[0] or 0, tensors)
        if allocated is not None:
            peak[1] = max(peak[1] or 0, allocated)
    return out | {"kv_bytes_tensors_peak": peak[0], "kv_bytes_allocator_peak": peak[1],
                  "cuda_graph": seq.stats.cuda_graph, "tokens": seq.max_tokens}


def _measure_memory(cfg: EvalConfig, lm: Any, entries: list[PlanEntry], plans: dict[tuple[str, int], HeadPlan],
                    lengths: list[int], cache: SampleCache, model_key: str) -> None:
    """For each plan and length, ``measure_kv``: after the prompt and at the peak while decoding. On CUDA twice:
    the first round also allocates what lives on after it and is not this cache's (kernel workspaces, lazily
    built tables); measured first in a run, a 4-bit plan read 165-215% of dense at 1K."""
    from headwise.engine import Engine

    for L in lengths:
        for e in entries:
            plan = plans.get((e.label, L))
            if plan is None:
                continue
            key = SampleCache.key(model_key, plan.digest(), MEMORY, L, None, cfg.seed, 0)
            if "kv_bytes_tensors_peak" in (cache.get(key) or {}):
                continue  # measured (a row from before the peak was measured is measured again)
            engine = Engine(lm, plan, chunk_size=cfg.chunk_size)
            cuda = lm.device.type == "cuda"
            for _ in range(2 if cuda else 1):
                got = measure_kv(engine, L, MEMORY_NEW_TOKENS, cuda)
            dense = lm.spec.dense_kv_bytes(got["tokens"], lm.dtype.itemsize)
            cache.put({"key": key, "plan": e.label, "digest": plan.digest(), "task": MEMORY, "length": L,
                       "depth": None, "seed": cfg.seed, "idx": 0, **got, "dense_kv_bytes": dense})


def _run_fidelity(cfg: EvalConfig, lm: Any, entries: list[PlanEntry], plans: dict[tuple[str, int], HeadPlan],
                  lengths: list[int], cache: SampleCache, model_key: str) -> list[dict[str, Any]]:
    from headwise.eval.fidelity import fidelity, text_ids

    rows = []
    for L in lengths:
        todo: dict[str, HeadPlan] = {}
        keys: dict[str, str] = {}
        for e in entries:
            plan = plans.get((e.label, L))
            if plan is None:
                continue
            key = SampleCache.key(model_key, plan.digest(), FIDELITY, L, None, cfg.seed, 0)
            if cache.get(key) is None:
                todo[e.label], keys[e.label] = plan, key
        if not todo:
            continue
        if lm.spec.max_context and lm.spec.max_context < L:  # fidelity is against dense, which cannot run there
            continue
        ids = text_ids(lm, L, cfg.seed)
        bar = _tqdm(cfg.progress, total=L, desc=f"fidelity {L}", unit="tok")
        try:
            res = fidelity(lm, todo, ids, progress=bar)
        finally:
            bar.close()
        for label, plan in todo.items():
            row = {
                "key": keys[label], "plan": label, "digest": plan.digest(), "task": FIDELITY, "length": L,
                "depth": None, "seed": cfg.seed, "idx": 0,
                "overall": {"ppl_dense": res["overall"]["ppl_dense"]} | res["overall"]["plans"][label],
                "buckets": [
                    {"range": b["range"], "label": b["label"], "tokens": b["tokens"], "ppl_dense": b["ppl_dense"]}
                    | b["plans"][label]
                    for b in res["buckets"]
                ],
            }
            cache.put(row)
            rows.append(row)
    return rows


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _rate(stats: list[dict[str, Any]], tokens: str, seconds: str) -> float | None:
    total_s = sum(s[seconds] for s in stats)
    return round(sum(s[tokens] for s in stats) / total_s, 2) if stats and total_s > 0 else None


def score_tables(rows: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The results' ``accuracy`` rows (mean score, n and Wilson 95% interval per plan × task × length) and
    ``accuracy_by_depth`` rows of per-sample ``rows`` (each with plan, task, length, depth and score)."""
    acc: dict[tuple[str, str, int], list[float]] = defaultdict(list)
    by_depth: dict[tuple[str, str, int, float], list[float]] = defaultdict(list)
    for r in rows:
        acc[(r["plan"], r["task"], r["length"])].append(r["score"])
        if r["depth"] is not None:
            by_depth[(r["plan"], r["task"], r["length"], r["depth"])].append(r["score"])
    accuracy = [
        {"plan": p, "task": t, "length": L, "score": round(_mean(v), 4), "n": len(v),
         "ci95": [round(x, 4) for x in wilson(_mean(v), len(v))]}
        for (p, t, L), v in acc.items()
    ]
    depth_rows = [
        {"plan": p, "task": t, "length": L, "depth": d, "score": round(_mean(v), 4), "n": len(v)}
        for (p, t, L, d), v in by_depth.items()
    ]
    return accuracy + pooled_random_rows(rows), depth_rows


def pooled_random_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task × length where two or more ``random@equal`` draws ran, one accuracy row over all their samples
    (label ``POOLED``, ``pooled``: the draws): random placement's accuracy averaged over the draws. Its Wilson
    interval counts samples, not draws, so it says how well the mean over *these* draws is known."""
    draws: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        m = _RANDOM_LABEL.fullmatch(r["plan"])
        if m:  # random@equal and random@equal:0 are the same draw
            draws[(r["task"], r["length"])][f"random@equal:{m.group(1) or 0}"].append(r["score"])
    out = []
    for (t, L), by_draw in draws.items():
        if len(by_draw) < 2:
            continue
        v = [x for scores in by_draw.values() for x in scores]
        out.append({"plan": POOLED.format(n=len(by_draw)), "task": t, "length": L, "score": round(_mean(v), 4),
                    "n": len(v), "ci95": [round(x, 4) for x in wilson(_mean(v), len(v))], "pooled": sorted(by_draw)})
    return out


def _measured(mem: dict[str, Any], suffix: str) -> float | None:
    """A memory row's KV over dense: ``kv_bytes_allocator{suffix}``, else ``kv_bytes_tensors{suffix}`` (None: the row
    is missing, or from before the peak was measured)."""
    held = mem.get(f"kv_bytes_allocator{suffix}") or mem.get(f"kv_bytes_tensors{suffix}")
    return None if held is None else round(held / mem["dense_kv_bytes"], 4)


def _collect(cfg: EvalConfig, lm: Any, entries: list[PlanEntry], plans: dict[tuple[str, int], HeadPlan],
             lengths: list[int], tasks: list[str], cache: SampleCache, model_key: str,
             notes: list[str]) -> dict[str, Any]:
    """Aggregate the cached rows of this configuration into the results document."""
    spec = lm.spec
    rows: list[dict[str, Any]] = []
    fid: list[dict[str, Any]] = []
    for e in entries:
        for L in lengths:
            plan = plans.get((e.label, L))
            if plan is None:
                continue
            digest = plan.digest()
            for t in tasks:
                if t == FIDELITY:
                    r = cache.get(SampleCache.key(model_key, digest, FIDELITY, L, None, cfg.seed, 0))
                    if r is not None:
                        fid.append(r | {"plan": e.label})
                    continue
                for d, i in cell_samples(t, cfg.depths, cfg.samples):
                    r = cache.get(SampleCache.key(model_key, digest, t, L, d, cfg.seed, i))
                    if r is not None:
                        rows.append(r | {"plan": e.label})
    accuracy, depth_rows = score_tables(rows)
    perf: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        perf[(r["plan"], r["length"])].append(r["stats"])
    dtype_bytes = lm.dtype.itemsize
    perf_rows = []
    for e in entries:
        for L in lengths:
            plan = plans.get((e.label, L))
            if plan is None:
                continue
            st = perf.get((e.label, L), [])
            # Rows reused from a results file that kept no timings (slim rows: KV counts only) count for the KV
            # held, not for speed: the times and rates are over the timed rows, ``runs`` counts them.
            timed = [s for s in st if "prefill_s" in s]
            sized = [s for s in st if "kv_bytes" in s]  # rows carried from a file that kept the fraction only
            mem = cache.get(SampleCache.key(model_key, plan.digest(), MEMORY, L, None, cfg.seed, 0)) or {}
            perf_rows.append({
                "plan": e.label, "length": L,
                "kv_bytes": round(_mean([s["kv_bytes"] for s in sized])) if sized else None,
                "dense_kv_bytes": round(_mean([s["dense_kv_bytes"] for s in sized])) if sized else None,
                "kv_fraction": round(_mean([s["kv_fraction"] for s in st]), 4) if st else None,
                # The plan's count: the most it holds while a request of L tokens runs, and after exactly L tokens.
                "planned_kv_fraction": round(plan.kv_fraction(spec, L, dtype_bytes, peak=True), 4),
                "planned_kv_fraction_after": round(plan.kv_fraction(spec, L, dtype_bytes), 4),
                "measured_tokens": mem.get("tokens"),
                "measured_cuda_graph": mem.get("cuda_graph"),
                "kv_bytes_tensors": mem.get("kv_bytes_tensors"),
                "kv_bytes_allocator": mem.get("kv_bytes_allocator"),
                "kv_bytes_tensors_peak": mem.get("kv_bytes_tensors_peak"),
                "kv_bytes_allocator_peak": mem.get("kv_bytes_allocator_peak"),
                # Measured (the allocator where there is one, else the tensors) over dense at the cache's reserved
                # length: at the peak while decoding (``measure_kv``), and after the prompt.
                "kv_fraction_measured": _measured(mem, "_peak"),
                "kv_fraction_measured_prefill": _measured(mem, ""),
                "planned_kv_bytes": plan.kv_bytes(spec, L, dtype_bytes, peak=True),
                "prefill_s": round(_mean([s["prefill_s"] for s in timed]), 4) if timed else None,
                "decode_s": round(_mean([s["decode_s"] for s in timed]), 4) if timed else None,
                # Rates over totals (tokens / seconds), not means of per-sample rates, so they agree with the
                # mean times above.
                "prefill_tokens_per_s": _rate(timed, "prompt_tokens", "prefill_s"),
                "decode_tokens_per_s": _rate(timed, "new_tokens", "decode_s"),
                "runs": len(timed),
            })
    plan_info = []
    for e in entries:
        digests = {str(L): plans[(e.label, L)].digest() for L in lengths if (e.label, L) in plans}
        summaries = {str(L): plans[(e.label, L)].summary(spec, L) for L in lengths if (e.label, L) in plans}
        plan_info.append({"label": e.label, "source": e.source, "digest": digests, "summary": summaries})
    return {
        "format": "headwise-eval",
        "version": 1,
        "model": lm.name,
        "model_source": lm.source,
        "spec": spec.to_dict(),
        "dtype": dtype_name(lm.dtype),
        **({"logits_dtype": "float32"} if cfg.fp32_logits else {}),
        "device": device_name(lm.device),
        "commit": git_commit(),
        "seed": cfg.seed,
        "command": cfg.command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "tasks": tasks,
        "lengths": lengths,
        "depths": list(cfg.depths),
        "samples": cfg.samples,
        "max_new_tokens": cfg.max_new_tokens,
        "plans": plan_info,
        "accuracy": accuracy,
        "accuracy_by_depth": depth_rows,
        "performance": perf_rows,
        "fidelity": fid,
        "notes": notes,
        "rows": [{k: v for k, v in r.items() if k != "key"} for r in rows],
    }


def command_line(argv: Sequence[str] | None = None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return "headwise " + " ".join(shlex.quote(a) for a in args)


__all__ = ["EvalConfig", "HeadwiseError", "PlanEntry", "SampleCache", "resolve_plans", "run_eval"]
