"""``tidal``: position-persistent sparse decode (TidalDecode).

TidalDecode (Yang et al., 2024, https://arxiv.org/abs/2410.05076) observes that the tokens a head attends
to most overlap strongly from one layer to the next. A few *token selection layers* do full attention and
pick the top-k token positions; every other layer attends only to the positions picked by the latest
selection layer below it ("position persistence"), so selection is paid a few times per step, not per layer.

How it is expressed in a plan (every head of the model that takes part carries ``"policy": "tidal"``):
- ``{"policy": "tidal", "params": {"select": true, "budget": 2048}}`` marks a head of a token selection
  layer: full attention, then it (re)selects the top ``budget`` positions *for its KV head index*. A whole
  layer is a selection layer when all its heads say ``select: true`` (``tidal_policies`` builds such plans;
  the paper's Llama-3-8B setting is full attention in layers 0-1, selection in layer 2 and re-selection in
  layer 13 of 32).
- ``{"policy": "tidal", "params": {"budget": 2048}}`` (``select`` false) reuses the positions most recently
  selected, in this decode step, for the same KV head index, keeping the top ``budget`` of them.
- A head with nothing to reuse (a layer before the first selection layer, or no selection head with its
  KV head index in the layers below) does exact full attention: that is the paper's dense first layers.

GQA mapping: positions are selected per *KV head* from the attention probabilities summed over that KV
head's query heads (the cache and the kernel read per KV head), and KV head ``h`` of a later layer reuses the
selection of KV head ``h`` (the paper's code keeps one selection per head index, with MHA-style indices).
Prefill is exact full attention. The selected positions live in the cache's ``shared`` dict (``ctx.shared``),
replaced every decode step; they are not counted in KV bytes (``budget`` int64 per sequence and KV head).
The full cache is kept: this saves reads, not memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy, causal_attention, check_positive
from headwise.policies.selection import attend_selected, group_attention_mass
from headwise.policies.stores import DenseStore

_KEY = "tidal"


@dataclass(frozen=True)
class Tidal(Policy):
    name: ClassVar[str] = "tidal"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.05076"
    keeps_every_token: ClassVar[bool] = True  # selects positions to read, drops nothing

    budget: int = 2048
    """Token positions attended by reusing heads (and selected by selection heads) per decode step."""
    select: bool = False
    """True: a token selection head (full attention, then selects positions for its KV head index)."""

    def validate(self) -> None:
        check_positive(self, budget=self.budget)
        if self.budget < 1:
            raise PlanError("policy 'tidal': 'budget' must be at least 1 token")
        if not isinstance(self.select, bool):
            raise PlanError(f"policy 'tidal': 'select' must be true or false, got {self.select!r}")

    def kv_tokens(self, seq_len: int) -> int:
        return seq_len

    def short(self) -> str:
        return f"tidal{'*' if self.select else ''}{self.budget}"

    def make_store(self, batch, heads, head_dim, device, dtype) -> DenseStore:
        return DenseStore(batch, heads, head_dim, device, dtype)

    def attend(self, q, k, v, store: DenseStore, ctx: AttendContext) -> torch.Tensor:
        store.append(k, v)
        keys, values = store.view()
        if q.shape[2] != 1:
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        heads = ctx.kv_heads or tuple(range(k.shape[1]))
        state = _step_state(ctx)
        if self.select:
            mass = group_attention_mass(q, keys, ctx.scale)  # [B, Hkv, S]
            top = torch.topk(mass, min(self.budget, store.length), dim=-1, sorted=True).indices
            for i, h in enumerate(heads):
                state["selected"][h] = top[:, i]
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        rows = [state["selected"].get(h) for h in heads]
        if all(r is None for r in rows):
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        table = _table(rows, self.budget, store.length, q.device)
        return attend_selected(q, store, table, 1, ctx)


def _step_state(ctx: AttendContext) -> dict[str, Any]:
    """This decode step's selections (``{"position": p, "selected": {kv_head: [B, k] positions}}``); the
    first layer to run at a new position starts an empty one, so nothing leaks from the previous step."""
    state = ctx.shared.get(_KEY)
    if state is None or state["position"] != ctx.start:
        state = {"position": ctx.start, "selected": {}}
        ctx.shared[_KEY] = state
    return state


def _table(rows: list[torch.Tensor | None], budget: int, length: int, device: torch.device) -> torch.Tensor:
    """Per-head position lists -> one table ``[B, Hkv, n]`` padded with -1 (a head without a selection
    lists every position: full attention)."""
    B = next(r for r in rows if r is not None).shape[0]
    lists = [r[:, :budget] if r is not None else torch.arange(length, device=device).expand(B, length) for r in rows]
    n = max(x.shape[1] for x in lists)
    table = torch.full((B, len(lists), n), -1, dtype=torch.long, device=device)
    for i, x in enumerate(lists):
        table[:, i, : x.shape[1]] = x
    return table


def tidal_policies(
    num_layers: int, num_kv_heads: int, budget: int, selection_layers: tuple[int, ...] = (2, 13)
) -> list[list[Policy]]:
    """A whole-model TidalDecode plan body: every head ``tidal``, selection heads in ``selection_layers``
    (layers below the first one attend fully). Pass it to ``HeadPlan.from_policies``."""
    return [
        [Tidal(budget=budget, select=i in selection_layers) for _ in range(num_kv_heads)]
        for i in range(num_layers)
    ]
