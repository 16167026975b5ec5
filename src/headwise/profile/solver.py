"""From head scores to a plan that meets a KV-memory budget.

The budget is a fraction of the dense plan's KV bytes after ``target_len`` tokens (``ModelSpec.dense_kv_tokens``:
a native sliding-window layer holds at most its window, so its ``full`` costs ``min(T, W)``). Every KV head gets
either ``full`` or a streaming span; the solver

1. puts every head on its cheapest streaming span (if even that exceeds the budget: ``BudgetError``);
2. walks the heads by score, highest first, and makes a head ``full`` whenever the extra tokens still fit
   (a head that does not fit is skipped, the walk goes on to cheaper ones; heads scoring ``<= min_score`` are
   never made full); with ``quantize`` (below) this walk makes heads *whole* at their cheapest (4-bit), and a
   second walk by score upgrades each to the dearest whole option that still fits (``full``, else 8-bit, else
   8-bit keys over 4-bit values);
3. spends what is left on the streaming heads' spans: repeatedly the upgrade with the largest gain per extra
   token (gain = attention mass kept, from ``mass.py``'s elastic span recalls, MoA-style; without recall data,
   spans grow round-robin), until nothing more fits.

So the plan never exceeds the budget, and among heads of equal cost the full ones are the highest-scoring. A head
costs the most it holds at any moment while a request of ``target_len`` tokens is prefilled and decoded
(``Policy.peak_kv_bytes``): the same as after ``target_len`` tokens for every policy but ``quantized``, whose
full-precision residual cycles between ``residual`` and ``residual + group - 1`` tokens (CUDA-graph decode holds
the largest at every step), so a plan solved for ``b`` holds at most ``b`` of dense at ``target_len``
throughout, not only at the lengths where the residual is shortest.

With ``quantize=True`` (off by default: the solver then behaves exactly as above), a global-layer head also has
three ``quantized`` options (KIVI, ``policies/quantized.py``) between its streaming spans and ``full``: 8-bit codes,
8-bit keys over 4-bit values, and 4-bit codes, every token kept and reachable, at their bytes' worth of dense token
slots (about 0.56, 0.44 and 0.31 of ``full`` at long lengths with KIVI's group of 32; ``Quantized.peak_kv_bytes``).
Step 2 then first keeps as many of the top-ranked heads whole as fit at 4 bits, and only then spends what is left on
precision (8-bit keys, 8-bit, ``full``) in
score order: when there are too few slots for every head the ranking wants full, they stay reachable at about a
quarter or a half of the bytes (Gemma 3's three global KV heads hold 61% of its KV at 4K) rather than the top one
full and the rest streaming. Without ``quantize`` the cheapest whole option is ``full`` and step 2 is as above. On a
native sliding-window layer the quantized options keep exactly the model's window (``plan.resolve`` gives them the
layer's window, ``Quantized.for_native_window``), at 0.545 (4-bit) and 0.73 (8-bit) of the window's dense bytes
at their peak (0.48 and 0.67 where the residual is shortest) for Gemma 3's 512-token window, head_dim 256, KIVI's
residual of 128: a plan keeps every token the model sees
(Gemma 3's 15 sliding layers hold 56% of its dense KV at 2K, which streaming alone could only cut by hiding tokens).
``quantize=QuantMenu(global_key_bits=8)`` (``--quant-global-key-bits 8``) leaves 4-bit keys out on global layers
(unless that keeps fewer global heads whole than 4-bit keys would: ``solve``), ``QuantMenu(residual=R)``
(``--quant-residual``) changes every option's residual and ``QuantMenu(two_bit=True)`` (``--quant-2bit``) adds
KIVI-2 below 4 bits (``TWO_BIT_OPTIONS``: 2-bit codes, and 4-bit keys over 2-bit values; 2-bit keys on global layers
only with ``global_key_bits=2``).
Costs count bytes for 16-bit KV (``dtype_bytes=2``).

Streaming spans are MoA's elastic ``window = a + b*N`` (https://arxiv.org/abs/2406.14909) evaluated at
``N = target_len`` (a plan stores fixed windows; a longer input keeps the window chosen for the target).
Global layers stream with ``sink=64`` (DuoAttention); on a native sliding-window layer the span is a shorter
window with ``sink=0``, so the head never sees a token the model's own window hides. The smallest span holds 128
tokens; ``QuantMenu(min_ring=N)`` (``--min-ring``) adds a ring of ``N`` below it, valued below every span, for budgets
the spans cannot reach.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from headwise.errors import BudgetError, InputError
from headwise.kernels.kv_quant import BITS
from headwise.policies import Full, Policy, Quantized, Streaming
from headwise.profile.mass import SPAN_OPTIONS, STREAM_SINK, span_window, streaming_option
from headwise.spec import ModelSpec


def check_budget(budget: float) -> None:
    if not isinstance(budget, (int, float)) or not (0.0 < float(budget) <= 1.0):
        raise BudgetError(
            f"--budget is a fraction of the dense KV memory and must be in (0, 1], got {budget!r} "
            "(e.g. 0.25 keeps a quarter of the dense cache)"
        )


QUANT_OPTIONS: tuple[Quantized, ...] = (Quantized(bits=4), Quantized(bits=4, key_bits=8), Quantized(bits=8))
"""The quantized options offered with ``solve(quantize=True)``, cheapest first (KIVI's group 32, residual 128)."""
TWO_BIT_OPTIONS: tuple[Quantized, ...] = (Quantized(bits=2), Quantized(bits=2, key_bits=4))
"""Added below them with ``QuantMenu(two_bit=True)`` (``--quant-2bit``), cheapest first: KIVI-2 and 4-bit keys over
2-bit values, at about 0.19 and 0.25 of a 16-bit cache's bytes at long lengths (group 32)."""


@dataclass(frozen=True)
class QuantMenu:
    """Which ``quantized`` options ``solve`` offers (``quantize=QuantMenu(...)``; ``quantize=True`` is the default
    menu, ``QUANT_OPTIONS``).

    ``global_key_bits`` 8 leaves out 4-bit keys on global layers: a head there kept whole holds at least 8-bit keys
    over 4-bit values (``solve`` drops the floor where it would keep fewer global heads whole). Those heads are the
    ones that find a key anywhere in the context, and with several similar keys (the multi-key needle's
    distractors) 4-bit keys pick the wrong one (docs/quality-runs.md, run 19: Gemma 3's
    three global heads at 4 bits answered 9 of 20 needles they lost on the GPU, with 8-bit keys 17, as dense).
    Heads on native sliding-window layers keep every option. ``residual``: KIVI's full-precision residual of every
    option (128 as KIVI; a shorter one holds less at the peak, which matters on a 512-token window). ``two_bit``:
    offer ``TWO_BIT_OPTIONS`` too (KIVI-2 only where ``global_key_bits`` is 2 on global layers: by default a global
    head's keys keep at least 4 bits), a cheaper rung that keeps every token reachable below the budgets where 4-bit
    codes of the global heads fit."""

    global_key_bits: int = 4
    residual: int = 128
    two_bit: bool = False
    quantized: bool = True
    """False: no quantized option (a menu that only changes the streaming floor, ``min_ring``)."""
    min_ring: int = 0
    """A streaming option below the smallest span (whose ring holds 128 tokens: 64 sinks + 64 recent on a global
    layer, a 128-token window on a sliding one): every head may also stream with a ring of ``min_ring`` tokens (a
    window of ``min_ring`` on a native sliding-window layer; half sinks, half recent tokens on a global one), valued
    below every measured span, so the solver takes it only where the budget leaves nothing else. 0: none (the floor
    every plan before 2026-12-05 was solved with). Below ~0.19 of dense at 4K no plan with 128-token rings keeps two
    of Gemma 3's global heads (docs/quality-runs.md, run 23); with rings of 32 two fit in 2 bits at ~0.11."""

    def __post_init__(self) -> None:
        if not isinstance(self.min_ring, int) or isinstance(self.min_ring, bool) or not (
                self.min_ring == 0 or MIN_RING <= self.min_ring < SPAN_FLOOR):
            raise InputError(f"the smallest streaming ring must be 0 (none) or {MIN_RING} to {SPAN_FLOOR - 1} tokens "
                             f"(the spans' smallest ring holds {SPAN_FLOOR}), got {self.min_ring!r}")
        if self.global_key_bits not in BITS:
            raise InputError(f"the fewest key bits of a quantized head on a global layer must be 2, 4 or 8, got "
                              f"{self.global_key_bits!r}")
        if self.global_key_bits == 2 and not self.two_bit:
            raise InputError("2-bit keys on global layers need the 2-bit options (--quant-2bit)")
        if not isinstance(self.residual, int) or self.residual < 1:
            raise InputError(f"the quantized heads' residual must be a positive number of tokens, got {self.residual!r}")

    def options(self, global_layer: bool) -> tuple[Quantized, ...]:
        """The quantized options of a head, cheapest first."""
        if not self.quantized:
            return ()
        menu = (TWO_BIT_OPTIONS if self.two_bit else ()) + QUANT_OPTIONS
        opts = tuple(replace(q, residual=self.residual) for q in menu)
        return tuple(q for q in opts if q.k_bits >= self.global_key_bits) if global_layer else opts

    def flags(self) -> list[str]:
        """The ``headwise profile`` arguments that ask for this menu."""
        out = ["--min-ring", str(self.min_ring)] if self.min_ring else []
        if not self.quantized:
            return out
        out += ["--quantize"] + (["--quant-2bit"] if self.two_bit else [])
        out += [] if self.global_key_bits == 4 else ["--quant-global-key-bits", str(self.global_key_bits)]
        return out + ([] if self.residual == 128 else ["--quant-residual", str(self.residual)])

    def ring(self, native: int | None) -> Streaming:
        """The ``min_ring`` option's policy on a layer (``native``: its sliding window, None on a global layer)."""
        return ring_policy(self.min_ring, native)


def ring_policy(ring: int, native: int | None) -> Streaming:
    """A ``ring``-token streaming head on a layer (``native``: its sliding window, None on a global layer): half sinks,
    half recent tokens on a global layer, a window of ``ring`` on a sliding one."""
    if native is not None:
        return Streaming(sink=0, window=ring)
    return Streaming(sink=ring // 2, window=ring - ring // 2)


Quantize = bool | QuantMenu
"""``solve``'s ``quantize``: False (no quantized options), True (``QuantMenu()``) or a menu."""


MIN_RING = 8
"""The smallest ``QuantMenu.min_ring``."""
SPAN_FLOOR = min(a for a, _ in SPAN_OPTIONS) + STREAM_SINK
"""Tokens the smallest streaming span holds at any length (64 + ``mass.STREAM_SINK``: 128)."""


def quant_menu(quantize: Quantize) -> QuantMenu | None:
    """The menu ``quantize`` asks for (None: no quantized option and the spans' floor)."""
    if isinstance(quantize, QuantMenu):
        return quantize
    return QuantMenu() if quantize else None


@dataclass
class Option:
    policy: Policy
    cost: int
    """KV token slots at the target length."""
    value: float
    """What step 3 trades against cost: a span's ``1 - weighted output error`` or its mass kept (``runner.span_value``);
    1 for ``full`` and every ``quantized`` option (every token kept). No step compares a whole option's value with a
    span's: step 2 makes heads whole by score, and raises their precision by score while it fits. The quantized
    options' measured output errors (``mass.quant_error``) are recorded in the plan's meta: on SmolLM2 at 2K, 4-bit
    keys over 2-bit values err ~0.03 nats summed over every head, a seventh of every head at its smallest span
    (docs/quality.md), so valuing them on the spans' scale would not have kept fewer heads in 2 bits."""
    span: tuple[int, float] | None = None


@dataclass
class Solution:
    policies: list[list[Policy]]
    full_heads: list[tuple[int, int]]
    kv_tokens: int
    cap_tokens: int
    dense_tokens: int
    skipped: list[tuple[int, int]] = field(default_factory=list)
    """High-scoring heads that could not be made full (nor, with ``quantize``, quantized) within the budget."""
    quantized_heads: list[tuple[int, int]] = field(default_factory=list)
    """High-scoring heads kept whole as ``quantized`` because ``full`` did not fit (``solve(quantize=True)``)."""
    spent: float | None = None
    """The budget the solver spent: the one asked for, or less where ``fit_lengths`` needed it."""
    global_key_bits: int | None = None
    """With a menu asking for 8-bit keys on global layers: 8, or 4 where the 8-bit floor would have left global heads
    unreachable that 4-bit keys keep (``solve``)."""

    @property
    def fraction(self) -> float:
        return self.kv_tokens / max(1, self.dense_tokens)

    def info(self) -> dict[str, Any]:
        return {
            "kv_tokens": self.kv_tokens,
            "cap_tokens": self.cap_tokens,
            "dense_tokens": self.dense_tokens,
            "kv_fraction": round(self.fraction, 4),
            "full_heads": [list(h) for h in self.full_heads],
            "skipped_full": [list(h) for h in self.skipped],
            "quantized_heads": [list(h) for h in self.quantized_heads],
            **({"spent_budget": self.spent} if self.spent is not None else {}),
            **({"global_key_bits": self.global_key_bits} if self.global_key_bits is not None else {}),
        }


def slot_cost(policy: Policy, spec: ModelSpec, target_len: int, dtype_bytes: int = 2) -> int:
    """The most ``policy`` holds while a request of ``target_len`` tokens runs (``Policy.peak_kv_bytes``), in dense
    token slots (``kv_tokens`` for a dense store; bytes over a slot's bytes, rounded up, for a quantized one, whose
    full-precision residual is counted at its largest)."""
    slot = 2 * spec.head_dim * dtype_bytes
    return -(-policy.peak_kv_bytes(target_len, spec.head_dim, dtype_bytes) // slot)


def head_options(spec: ModelSpec, layer: int, target_len: int, recall: torch.Tensor | None,
                 quantize: Quantize = False) -> list[Option]:
    """Streaming options of one KV head, cheapest first, then (``quantize``) the quantized options cheaper than
    ``full``, cheapest first (their costs may fall among the spans'; on a sliding-window layer, costed as resolved
    to the window), then ``full`` last.

    recall: [len(SPAN_OPTIONS)] mass kept by each elastic span (the KV head's mean over its query heads), or None.
    """
    native = spec.native_window(layer)
    full_cost = min(target_len, native) if native is not None else target_len
    seen: dict[int, Option] = {}
    for o, span in enumerate(SPAN_OPTIONS):
        w = span_window(span, target_len)
        pol = streaming_option(native, w)
        cost = pol.kv_tokens(target_len)
        if cost >= full_cost:
            continue  # no cheaper than full: not a streaming option at this length
        value = float(recall[o]) if recall is not None else 0.0
        if cost not in seen or value > seen[cost].value:
            seen[cost] = Option(pol, cost, value, span)
    opts = sorted(seen.values(), key=lambda x: x.cost)
    menu = quant_menu(quantize)
    if menu is not None and menu.min_ring:
        pol = menu.ring(native)
        cost = pol.kv_tokens(target_len)
        if cost < full_cost and (not opts or cost < opts[0].cost):
            opts.insert(0, Option(pol, cost, 0.0))  # below every measured span's recall: the last resort
    # keep only options that buy something: with recall data a bigger span must keep more mass
    if recall is not None:
        pruned: list[Option] = []
        for opt in opts:
            if not pruned or opt.value > pruned[-1].value:
                pruned.append(opt)
        opts = pruned
    for pol in menu.options(native is None) if menu is not None else ():
        held = pol if native is None else pol.for_native_window(native, spec.head_dim)
        cost = slot_cost(held, spec, target_len)
        if cost < full_cost:
            opts.append(Option(pol, cost, 1.0))  # every token kept; which heads stay whole is step 2's, by score
    opts.append(Option(Full(), full_cost, 1.0))
    return opts


def _cheapest_whole(options: list[Option]) -> int:
    """Index of the cheapest option that keeps every token: the first quantized one, else ``full`` (the last)."""
    return next((k for k, o in enumerate(options) if isinstance(o.policy, Quantized)), len(options) - 1)


FIT_STEP = 0.001
"""How much less of the budget ``solve`` spends per try while the plan exceeds it at one of ``fit_lengths``."""


def held_fraction(spec: ModelSpec, policies: list[list[Policy]], length: int, dtype_bytes: int = 2) -> float:
    """The most KV a plan of ``policies`` holds while a request of ``length`` tokens runs (``HeadPlan.kv_tokens``
    with ``peak``), as a fraction of dense at ``length`` (native windows applied)."""
    from headwise.plan import HeadPlan

    plan = HeadPlan.from_policies(spec, policies, "fit")
    return plan.kv_tokens(spec, length, dtype_bytes, peak=True) / max(1, spec.dense_kv_tokens(length))


def solve(spec: ModelSpec, scores: torch.Tensor, budget: float, target_len: int,
          recall: torch.Tensor | None = None, min_score: float = 0.0, full_share: float = 1.0,
          quantize: Quantize = False, ranks: int = 1, fit_lengths: tuple[int, ...] = ()) -> Solution:
    """The plan for ``budget`` at ``target_len`` (``_fit_solve``). With a menu asking for 8-bit keys on global layers
    (``QuantMenu(global_key_bits=8)``), the floor gives way where it costs reach: if the plan solved with it keeps
    fewer global-layer heads whole (quantized or full) than the same menu with 4-bit keys allowed, the latter is
    returned (``Solution.global_key_bits`` says which). On Gemma 3 at budget 0.25 the floor kept one of its three
    global heads and streamed two, and that plan found no passkey on the H200 (docs/quality-runs.md, run 21); 4-bit keys
    keep two of them. Where every global head fits at 8 bits (Gemma 3 at 0.35 and up) nothing changes."""
    menu = quant_menu(quantize)
    sol = _fit_solve(spec, scores, budget, target_len, recall, min_score, full_share, quantize, ranks, fit_lengths)
    if menu is None or menu.global_key_bits <= 4:  # the give-way rule is for the 8-bit floor
        return sol
    sol.global_key_bits = menu.global_key_bits
    kept = _global_heads_kept(spec, sol)
    if kept == sum(spec.native_window(i) is None for i in range(spec.num_layers)) * spec.num_kv_heads:
        return sol
    alt = _fit_solve(spec, scores, budget, target_len, recall, min_score, full_share,
                     replace(menu, global_key_bits=4), ranks, fit_lengths)
    if _global_heads_kept(spec, alt) > kept:
        alt.global_key_bits = 4
        return alt
    return sol


def _global_heads_kept(spec: ModelSpec, sol: Solution) -> int:
    """Heads of global (not natively sliding) layers that ``sol`` keeps whole: ``full`` or ``quantized``."""
    return sum(isinstance(p, Full | Quantized) for i, row in enumerate(sol.policies) if spec.native_window(i) is None
               for p in row)


def _fit_solve(spec: ModelSpec, scores: torch.Tensor, budget: float, target_len: int,
              recall: torch.Tensor | None = None, min_score: float = 0.0, full_share: float = 1.0,
              quantize: Quantize = False, ranks: int = 1, fit_lengths: tuple[int, ...] = ()) -> Solution:
    """The plan for ``budget`` at ``target_len`` (``_solve``) that also holds at most ``budget`` of dense KV after
    each of ``fit_lengths`` tokens: while it does not, the solver spends ``FIT_STEP`` less of the budget and solves
    again. A plan solved at one length holds a different share at others (a native sliding-window layer costs the
    same at every length past its window, a global one grows with it): on Gemma 3, 4-bit heads solved for 50% at 4K
    held 50.35% at 2K. The kept spend is ``Solution.spent``."""
    spent = budget
    over: list[tuple[int, float]] = []
    while True:
        try:
            sol = _solve(spec, scores, spent, target_len, recall, min_score, full_share, quantize, ranks)
        except BudgetError:
            if not over:
                raise
            L, f = over[0]
            raise BudgetError(f"no plan holds at most {budget:g} of dense KV both at {target_len} tokens and at "
                              f"{', '.join(map(str, fit_lengths))} (the last tried held {f:.1%} at {L}); raise "
                              "--budget or drop a length") from None
        over = [(L, f) for L in fit_lengths if (f := held_fraction(spec, sol.policies, L)) > budget + 1e-9]
        if not over:
            sol.spent = spent
            return sol
        spent = round(spent - FIT_STEP, 6)


def _check_room(budget: float, cap: int, used: int, dense: int, target_len: int) -> None:
    if used > cap:
        raise BudgetError(
            f"budget {budget} ({cap} KV token slots at {target_len} tokens) is below the smallest streaming plan "
            f"({used} slots = {used / dense:.3f} of dense); raise --budget or --target-len"
        )


def check_room(spec: ModelSpec, budget: float, target_len: int, quantize: Quantize = False) -> None:
    """Refuse, before any measuring, a budget below the cheapest plan the solver can make at ``target_len`` (every
    head at its cheapest span): ``solve`` would refuse it after the profile's minutes of work."""
    check_budget(budget)
    if target_len < 1:
        raise BudgetError(f"--target-len must be a positive number of tokens, got {target_len}")
    used = sum(head_options(spec, i, target_len, None, quantize)[0].cost
               for i in range(spec.num_layers) for _ in range(spec.num_kv_heads))
    dense = spec.dense_kv_tokens(target_len)
    _check_room(budget, int(budget * dense), used, dense, target_len)


def _solve(spec: ModelSpec, scores: torch.Tensor, budget: float, target_len: int,
           recall: torch.Tensor | None = None, min_score: float = 0.0, full_share: float = 1.0,
           quantize: Quantize = False, ranks: int = 1) -> Solution:
    """scores: [layers, kv_heads] (higher = needs the whole context); recall: [layers, kv_heads, options] or None.

    ``quantize``: offer ``quantized`` 8- and 4-bit options to the heads whose ``full`` does not fit (module
    docstring); off, the solver is unchanged.

    ``ranks``: the plan will run over that many tensor-parallel ranks (``tp.py``). The lowest-scoring full heads
    beyond a multiple of ``ranks`` go back to their cheapest streaming span before step 3 (which spends what they
    freed), so that a placement (``placement.balance``) can give every rank the same number of full heads: 63 full
    heads over 4 ranks leave one rank a full head short, 6.5% fewer KV bytes than the others at 128K tokens.

    ``full_share`` caps the part of the budget above the cheapest spans that full heads may take; the rest is
    left to streaming spans. With 1.0, full heads come first and streaming heads may be left at their cheapest
    span (measured on SmolLM2: good needles, poor next-token agreement; see docs/profiling.md).
    """
    if not 0.0 <= full_share <= 1.0:
        raise BudgetError(f"full_share must be within [0, 1], got {full_share}")
    check_budget(budget)
    if target_len < 1:
        raise BudgetError(f"--target-len must be a positive number of tokens, got {target_len}")
    L, H = spec.num_layers, spec.num_kv_heads
    if tuple(scores.shape) != (L, H):
        raise ValueError(f"scores must be [layers={L}, kv_heads={H}], got {tuple(scores.shape)}")
    dense = spec.dense_kv_tokens(target_len)
    cap = int(budget * dense)
    opts = [[head_options(spec, i, target_len, None if recall is None else recall[i, j], quantize) for j in range(H)]
            for i in range(L)]
    choice = [[0] * H for _ in range(L)]  # index into opts: cheapest streaming span (or full if nothing cheaper)
    used = sum(opts[i][j][0].cost for i in range(L) for j in range(H))
    _check_room(budget, cap, used, dense, target_len)
    full_cap = used + int(full_share * (cap - used))
    order = sorted(((float(scores[i, j]), i, j) for i in range(L) for j in range(H)), key=lambda t: (-t[0], t[1], t[2]))
    reached: list[tuple[int, int]] = []  # heads kept whole (full or quantized), in score order
    skipped: list[tuple[int, int]] = []
    for s, i, j in order:
        if s <= min_score:
            break
        o, cur = opts[i][j], choice[i][j]
        k = _cheapest_whole(o)
        extra = o[k].cost - o[cur].cost
        if extra <= 0 or used + extra <= full_cap:
            choice[i][j] = k
            used += max(0, extra)
            reached.append((i, j))
        else:
            skipped.append((i, j))
    for i, j in reached:  # then, by score, each whole head to the dearest whole option that fits (full first)
        o, cur = opts[i][j], choice[i][j]
        for k in range(len(o) - 1, cur, -1):
            extra = o[k].cost - o[cur].cost
            if used + extra <= full_cap:
                choice[i][j] = k
                used += extra
                break
    full = [(i, j) for i, j in reached if isinstance(opts[i][j][choice[i][j]].policy, Full)]
    if ranks < 1:
        raise BudgetError(f"ranks must be at least 1, got {ranks}")
    for i, j in full[len(full) - len(full) % ranks :]:  # the lowest-scoring extra full heads stream again
        used -= opts[i][j][choice[i][j]].cost - opts[i][j][0].cost
        choice[i][j] = 0
        reached.remove((i, j))
        skipped.append((i, j))
    full = full[: len(full) - len(full) % ranks]
    quantized = [(i, j) for i, j in reached if isinstance(opts[i][j][choice[i][j]].policy, Quantized)]
    full_set = set(reached)
    while True:  # spend the rest on spans: best gain per extra token first
        best: tuple[float, int, int, int, int] | None = None
        for i in range(L):
            for j in range(H):
                if (i, j) in full_set:
                    continue
                cur = opts[i][j][choice[i][j]]
                for k in range(choice[i][j] + 1, len(opts[i][j]) - 1):  # streaming upgrades only
                    if opts[i][j][k].span is None:
                        break
                    extra = opts[i][j][k].cost - cur.cost
                    if used + extra > cap:
                        break
                    gain = (opts[i][j][k].value - cur.value) if recall is not None else 1.0 / (1 + choice[i][j])
                    key = gain / extra
                    if best is None or key > best[0]:
                        best = (key, i, j, k, extra)
        if best is None:
            break
        _, i, j, k, extra = best
        choice[i][j] = k
        used += extra
    policies = [[opts[i][j][choice[i][j]].policy for j in range(H)] for i in range(L)]
    return Solution(policies, sorted(full), used, cap, dense, skipped, sorted(quantized))
