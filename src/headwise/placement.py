"""Where KV heads go under tensor parallelism, and how even that is.

Tensor parallelism (``tp.py``) gives rank ``r`` of ``N`` the KV heads ``r*k .. r*k + k - 1`` of every layer
(``k = num_kv_heads / N``), with their query heads: transformers' column-wise split of the q/k/v projections.
Under a head plan those heads hold very different KV: a ``full`` head grows with the context, a ``streaming``
head stays at its window. Sliced naively, one rank can hold all of a layer's ``full`` heads: its memory runs out
first and, since every layer ends in an all-reduce, every step waits for it.

A *placement* re-indexes each layer's KV heads before the split: ``order[l][p]`` is the original KV head that
position ``p`` of layer ``l`` holds, so rank ``r`` holds ``order[l][r*k : r*k + k]``. Applying it to the
weights (``tp.permute_kv_heads``: rows of q/k/v, columns of o) and to the plan (``HeadPlan.permuted``) is an
exact re-indexing: the model computes the same function.

``balance`` picks the order in two steps, both on each head's KV bytes after ``at`` tokens (``Policy.kv_bytes``):

1. per layer, split the heads into ``N`` groups of ``k`` that make the largest group as small as possible
   (greedy largest-first into the lightest group with room, then pairwise swaps while they lower the largest
   group: a heuristic, optimal when a layer has two kinds of heads, as full/streaming plans do). This evens
   the layer's attention work, since a decode step reads what a head holds (except for heads that read a
   subset of what they hold: ``page_topk``, ``tidal``, ``recycled``, whose reads this does not model);
2. across layers, hand each layer's groups to ranks, largest group to the rank holding least so far, layers
   with the widest spread first, then re-assign one layer's groups at a time while that draws the ranks' totals
   together, so that every rank holds the same KV bytes in total.

Neither step can beat the plan itself: a layer with one ``full`` head at TP 2 keeps a straggler whatever the
order, and 63 full heads over 4 ranks leave one rank a full head short (the solver's ``ranks`` avoids the latter:
``headwise profile --tp N``).
``tidal`` plans are not re-indexed (``check_permutable``): their selections follow KV head indices across layers.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from headwise.errors import InputError, PlanError

if TYPE_CHECKING:
    from headwise.plan import HeadPlan
    from headwise.spec import ModelSpec

Order = list[list[int]]


def check_tp(spec: ModelSpec, tp: int) -> None:
    """Raise ``InputError`` unless ``tp`` ranks can split the model's query and KV heads evenly."""
    if tp < 1:
        raise InputError(f"--tp must be at least 1, got {tp}")
    if spec.num_kv_heads % tp or spec.num_q_heads % tp:
        raise InputError(
            f"tensor parallelism over {tp} ranks splits whole heads: the model has {spec.num_q_heads} query and "
            f"{spec.num_kv_heads} KV heads, which {tp} does not divide; use a --tp that divides {spec.num_kv_heads}"
        )


def identity(spec: ModelSpec) -> Order:
    return [list(range(spec.num_kv_heads)) for _ in range(spec.num_layers)]


def is_identity(order: Order) -> bool:
    return all(row == list(range(len(row))) for row in order)


def check_order(order: Any, num_layers: int, num_kv_heads: int, where: str = "placement") -> Order:
    """``order`` as a list of per-layer permutations of ``range(num_kv_heads)``, else ``PlanError``."""
    if not isinstance(order, list) or len(order) != num_layers:
        raise PlanError(f"{where}: 'order' must list {num_layers} layers")
    for i, row in enumerate(order):
        if not isinstance(row, list) or sorted(row) != list(range(num_kv_heads)) or \
                not all(isinstance(h, int) and not isinstance(h, bool) for h in row):
            raise PlanError(f"{where}: layer {i} must be a permutation of the KV heads 0..{num_kv_heads - 1}, "
                            f"got {row!r}")
    return [list(row) for row in order]


def check_permutable(plan: HeadPlan, order: Order) -> None:
    """Raise ``PlanError`` if re-indexing by ``order`` would change what ``plan`` computes (``tidal``)."""
    if is_identity(order):
        return
    if any(h["policy"] == "tidal" for row in plan.layers for h in row):
        raise PlanError("a 'tidal' plan cannot be re-indexed: its heads reuse the positions of the same KV head "
                        "index across layers; run it with --placement naive")


def head_bytes(plan: HeadPlan, spec: ModelSpec, at: int, dtype_bytes: int = 2) -> list[list[int]]:
    """KV bytes of every (layer, KV head) after ``at`` tokens (native sliding windows applied)."""
    from headwise.plan import resolve

    return [[p.kv_bytes(at, spec.head_dim, dtype_bytes) for p in row] for row in resolve(plan.policies(), spec)]


def _split_layer(costs: list[int], tp: int) -> list[list[int]]:
    """Heads of one layer in ``tp`` groups of ``len(costs) // tp``, the largest group's cost made small (module
    docstring, step 1). The naive split is kept when the search does no better, so even layers stay in place."""
    n = len(costs)
    k = n // tp
    naive = [list(range(r * k, (r + 1) * k)) for r in range(tp)]
    groups: list[list[int]] = [[] for _ in range(tp)]
    loads = [0] * tp
    for h in sorted(range(n), key=lambda h: (-costs[h], h)):
        r = min((r for r in range(tp) if len(groups[r]) < k), key=lambda r: (loads[r], r))
        groups[r].append(h)
        loads[r] += costs[h]
    while (swap := _lowering_swap(costs, groups, loads)) is not None:
        # each swap lowers the largest group and the sum of squared loads, so this ends
        hi, a, r, b = swap
        groups[hi][groups[hi].index(a)], groups[r][groups[r].index(b)] = b, a
        loads[hi] -= costs[a] - costs[b]
        loads[r] += costs[a] - costs[b]
    if max(loads) >= max(sum(costs[h] for h in g) for g in naive):
        return naive
    return [sorted(g) for g in groups]


def _lowering_swap(costs: list[int], groups: list[list[int]], loads: list[int]) -> tuple[int, int, int, int] | None:
    """A swap of head ``a`` of the largest group ``hi`` with a lighter head ``b`` of group ``r`` that leaves
    both groups below ``hi``'s load, as ``(hi, a, r, b)``; None when there is none."""
    hi = max(range(len(groups)), key=lambda r: loads[r])
    for r, group in enumerate(groups):
        if r == hi:
            continue
        for a in groups[hi]:
            for b in group:
                if 0 < costs[a] - costs[b] < loads[hi] - loads[r]:
                    return hi, a, r, b
    return None


def balance(plan: HeadPlan, spec: ModelSpec, tp: int, at: int, dtype_bytes: int = 2) -> Order:
    """A placement of ``plan``'s KV heads over ``tp`` ranks that evens KV bytes after ``at`` tokens per layer
    and in total (module docstring). Identity for a plan whose heads all hold the same."""
    check_tp(spec, tp)
    costs = head_bytes(plan, spec, at, dtype_bytes)
    splits = [_split_layer(row, tp) for row in costs]

    def load(i: int, g: list[int]) -> int:
        return sum(costs[i][h] for h in g)

    totals = [0] * tp
    owner: list[list[list[int]]] = [[] for _ in costs]
    spread = [max(load(i, g) for g in s) - min(load(i, g) for g in s) for i, s in enumerate(splits)]
    for i in sorted(range(len(costs)), key=lambda i: -spread[i]):  # stable: equal spreads keep layer order
        if spread[i] == 0:
            owner[i] = splits[i]  # nothing to even out: keep the groups where they are
        else:
            groups = sorted(splits[i], key=lambda g: -load(i, g))
            ranks = sorted(range(tp), key=lambda r: (totals[r], r))
            owner[i] = [[] for _ in range(tp)]
            for g, r in zip(groups, ranks):
                owner[i][r] = g
        for r, g in enumerate(owner[i]):
            totals[r] += load(i, g)
    _settle(owner, costs)
    order = [[h for g in row for h in g] for row in owner]
    check_permutable(plan, order)
    return order


def _settle(owner: list[list[list[int]]], costs: list[list[int]]) -> None:
    """Improve the hand-out of step 2 in place: per layer, any re-assignment of its groups to ranks that lowers
    the sum of squared rank totals (so the totals draw together), until none does (``tp!`` tries per layer:
    fine for the 2-8 ranks of one host)."""
    tp = len(owner[0])
    loads = [[sum(costs[i][h] for h in g) for g in row] for i, row in enumerate(owner)]
    totals = [sum(col) for col in zip(*loads)]
    perms = list(itertools.permutations(range(tp)))
    improved = True
    while improved:
        improved = False
        for i in range(len(owner)):
            base = [t - x for t, x in zip(totals, loads[i])]
            best = min(perms, key=lambda p: sum((base[r] + loads[i][p[r]]) ** 2 for r in range(tp)))
            if sum((base[r] + loads[i][best[r]]) ** 2 for r in range(tp)) < sum(t * t for t in totals):
                owner[i] = [owner[i][best[r]] for r in range(tp)]
                loads[i] = [loads[i][best[r]] for r in range(tp)]
                totals = [base[r] + loads[i][r] for r in range(tp)]
                improved = True


@dataclass
class Balance:
    """How evenly ``tp`` ranks hold a plan's KV after ``at`` tokens, under one placement."""

    tp: int
    at: int
    rank_bytes: list[int]
    """KV bytes each rank holds, summed over layers."""
    layer_rank_bytes: list[list[int]]
    """``[layer][rank]`` KV bytes."""

    @property
    def spread(self) -> float:
        """How much more the fullest rank holds than the emptiest: ``max / min - 1`` (0: even)."""
        return max(self.rank_bytes) / max(1, min(self.rank_bytes)) - 1

    @property
    def layer_excess(self) -> float:
        """Extra attention time of a step whose layers each wait for their slowest rank, reading time taken as
        bytes held: ``sum over layers of the max rank / sum over layers of the mean rank - 1`` (0: even)."""
        worst = sum(max(row) for row in self.layer_rank_bytes)
        mean = sum(sum(row) / len(row) for row in self.layer_rank_bytes)
        return worst / max(1e-9, mean) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"tp": self.tp, "at": self.at, "rank_bytes": self.rank_bytes, "spread": round(self.spread, 4),
                "layer_excess": round(self.layer_excess, 4)}


def measure(plan: HeadPlan, spec: ModelSpec, tp: int, at: int, order: Order | None = None,
            dtype_bytes: int = 2) -> Balance:
    """Per-rank KV bytes of ``plan`` over ``tp`` ranks under ``order`` (None: the naive split)."""
    check_tp(spec, tp)
    costs = head_bytes(plan, spec, at, dtype_bytes)
    order = order or identity(spec)
    k = spec.num_kv_heads // tp
    per_layer = [[sum(row[h] for h in order[i][r * k : (r + 1) * k]) for r in range(tp)] for i, row in enumerate(costs)]
    return Balance(tp, at, [sum(col) for col in zip(*per_layer)], per_layer)


def default_at(spec: ModelSpec) -> int:
    """The context length placements are balanced at unless told: the model's context, at most 128K tokens
    (full heads and windows rank the same at any length past the longest window)."""
    return min(spec.max_context or 131072, 131072)
