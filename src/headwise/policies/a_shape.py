"""``a_shape``: sink blocks + local blocks during prefill (MInference's A-shape pattern).

MInference 1.0 (Jiang et al., 2024, https://arxiv.org/abs/2407.02490), section 3: heads whose attention
concentrates on the first tokens and a recent band. A query in block ``a`` attends the first
``sink // block_size`` key blocks and the last ``local // block_size`` blocks up to and including its own
(token-causal inside the diagonal block). Defined at block level on absolute positions, so it is the same
whatever the chunking. Decode and storage are the ``decode`` policy's (default ``full``); see
``sparse_prefill.py`` for why that policy must keep the full cache.

Differs from the ``streaming`` policy: streaming's window is token-exact and its cache is constant; A-shape
is block-granular (what a block-sparse kernel computes fast) and only shapes prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.prefill_index import compact_rows, query_block_ids
from headwise.policies.base import Policy, check_positive
from headwise.policies.full import Full
from headwise.policies.sparse_prefill import PrefillPattern


@dataclass(frozen=True)
class AShape(PrefillPattern):
    name: ClassVar[str] = "a_shape"
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.02490"

    sink: int = 64
    """Initial tokens every query attends (a multiple of ``block_size``; 0 for none)."""
    local: int = 1024
    """Recent tokens attended, as whole blocks ending with the query's own (a multiple of ``block_size``)."""
    block_size: int = 64
    """Block granularity of the pattern (MInference uses 64; 128 suits the H100 kernel best)."""
    decode: Policy = field(default_factory=Full)
    """Policy for one-token steps and the cache; must keep every token (``full``, ``page_topk``)."""

    def validate(self) -> None:
        super().validate()
        check_positive(self, sink=self.sink, local=self.local)
        for key in ("sink", "local"):
            if getattr(self, key) % self.block_size:
                raise PlanError(f"policy 'a_shape': '{key}' ({getattr(self, key)}) must be a multiple of block_size ({self.block_size})")
        if self.local < self.block_size:
            raise PlanError(f"policy 'a_shape': 'local' must cover at least one block ({self.block_size} tokens)")

    def short(self) -> str:
        return f"A{self.sink}+{self.local}" + self.decode_suffix()

    def mask_mod(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The pattern token by token: broadcastable query and key positions -> bool (True = attend)."""
        qb, kb = q_pos // self.block_size, k_pos // self.block_size
        return (k_pos <= q_pos) & ((kb < self.sink // self.block_size) | (qb - kb < self.local // self.block_size))

    def build_index(self, q, keys, q_offset, scale):
        """Shared by batch and heads: block_idx [1, 1, n_q_blocks, M]. Sink blocks, then the local band."""
        rows = query_block_ids(q.shape[2], q_offset, self.block_size, q.device)[:, None]  # [n, 1]
        sink = torch.arange(self.sink // self.block_size, device=q.device)[None, :]
        local = rows - torch.arange(self.local // self.block_size, device=q.device)[None, :]
        cand = torch.cat([sink.expand(rows.shape[0], -1), local], dim=1)
        valid = (cand >= 0) & (cand <= rows)
        idx, count = compact_rows(cand, valid)
        return idx[None, None], count[None, None]
