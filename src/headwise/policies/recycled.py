"""``recycled``: Recycled Attention for decode.

Recycled Attention (Xu et al., 2024, https://arxiv.org/abs/2411.05787): every ``stride`` decode steps a head
does full attention and remembers the ``budget`` positions it attended to most; on the steps in between it
attends only to those positions plus every token generated since that full step. Prefill is exact full
attention.

How this differs from the paper, and why:
- GQA: positions are chosen per KV head from the attention probabilities summed over its query heads (the
  cache and the kernel read per KV head).
- The refresh schedule is fixed (every ``stride`` steps, counted by positions since the last full step);
  the paper's optional query-similarity trigger for refreshing is not implemented.
- The token of the full step itself is counted with "tokens since" rather than competing for the top-k,
  so no position is ever attended twice.

The full cache is kept (this saves reads, not memory). The store also holds the remembered positions
(``budget`` int64 per sequence and KV head), counted in KV bytes; ``kv_tokens`` counts the K/V slots only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy, causal_attention, check_positive
from headwise.policies.selection import attend_selected, group_attention_mass
from headwise.policies.stores import DenseStore


class RecycledStore(DenseStore):
    """``DenseStore`` + the positions remembered at the last full step (``selected: [B, H, k]``) and that
    step's position (``anchor``)."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__(batch, heads, head_dim, device, dtype)
        self.selected: torch.Tensor | None = None
        self.anchor = 0

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self.selected] if self.selected is not None else [])


@dataclass(frozen=True)
class Recycled(Policy):
    name: ClassVar[str] = "recycled"
    paper: ClassVar[str] = "https://arxiv.org/abs/2411.05787"
    keeps_every_token: ClassVar[bool] = True  # selects positions to read, drops nothing

    budget: int = 2048
    """K: positions remembered at each full step (tokens generated since are attended on top)."""
    stride: int = 10
    """S: a full-attention step every ``stride`` decode steps."""

    def validate(self) -> None:
        check_positive(self, budget=self.budget, stride=self.stride)
        if self.budget < 1 or self.stride < 1:
            raise PlanError("policy 'recycled': 'budget' and 'stride' must be at least 1")

    def kv_tokens(self, seq_len: int) -> int:
        return seq_len

    def short(self) -> str:
        return f"recycled{self.budget}/{self.stride}"

    def make_store(self, batch, heads, head_dim, device, dtype) -> RecycledStore:
        return RecycledStore(batch, heads, head_dim, device, dtype)

    def attend(self, q, k, v, store: RecycledStore, ctx: AttendContext) -> torch.Tensor:
        store.append(k, v)
        keys, values = store.view()
        if q.shape[2] != 1:
            store.selected = None  # new prompt tokens: the next decode step refreshes
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        p = ctx.start  # this token's position
        if store.selected is None or p - store.anchor >= self.stride:
            # Probabilities over every key (the current one included, as attention saw them); the current
            # token is then left out of the ranking because "tokens since" covers it.
            mass = group_attention_mass(q, keys, ctx.scale)[:, :, :p]
            store.selected = torch.topk(mass, min(self.budget, p), dim=-1, sorted=False).indices
            store.anchor = p
            return causal_attention(q, keys, values, ctx.start, ctx.scale)
        since = torch.arange(store.anchor, p + 1, device=q.device).expand(q.shape[0], k.shape[1], -1)
        table = torch.cat([store.selected, since], dim=2)
        return attend_selected(q, store, table, 1, ctx)
