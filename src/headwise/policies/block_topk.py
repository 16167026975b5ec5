"""``block_topk``: top-k key blocks per query block from mean-pooled queries and keys.

MInference 1.0's Block-Sparse pattern (Jiang et al., 2024, https://arxiv.org/abs/2407.02490, section 3.2):
mean-pool Q and K over blocks of ``block_size`` tokens, score every (query block, key block) pair by the
pooled dot product, keep the top ``topk`` key blocks of each query block. The first block (sinks) and the
query's own block are always kept on top of the ``topk``. Per query head.

``hierarchical=True`` is in the spirit of HiP (Lee et al., 2024, https://arxiv.org/abs/2406.09827): instead
of scoring all ``n`` key blocks, the causal key range of each query block is split into ``2 * topk``
branches, each branch is scored by one representative (the pooled key of its middle block), the ``topk``
best branches are kept and halved, and so on until the branches are single blocks: ``O(topk log n)`` scores
per query block instead of ``O(n)``. How it differs from HiP: HiP prunes *tokens* per query (representative
tokens, per query row) and pairs this with KV offloading and a custom kernel; here the units are blocks and
pooled query blocks, chosen for the block-sparse kernel, with no offloading.
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


def pool_blocks(x: torch.Tensor, start: int, block_size: int) -> torch.Tensor:
    """Mean of ``x: [B, H, N, D]`` (positions ``start .. start+N-1``) over absolute blocks, fp32
    ``[B, H, n_blocks, D]``; partial first/last blocks average the tokens present."""
    B, H, N, D = x.shape
    front = start % block_size
    total = front + N
    back = -total % block_size
    padded = torch.nn.functional.pad(x.float(), (0, 0, front, back))
    sums = padded.view(B, H, -1, block_size, D).sum(dim=3)
    counts = torch.full((total + back,), 1.0, device=x.device)
    counts[:front] = 0
    counts[total:] = 0
    counts = counts.view(-1, block_size).sum(dim=1).clamp(min=1)
    return sums / counts[:, None]


@dataclass(frozen=True)
class BlockTopK(PrefillPattern):
    name: ClassVar[str] = "block_topk"
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.02490"

    topk: int = 16
    """Key blocks kept per query block, besides the always-kept first and own blocks."""
    hierarchical: bool = False
    """Find the top blocks by HiP-style branch halving instead of scoring every block (module docstring)."""
    block_size: int = 64
    """Pooling and kernel block size (MInference: 64)."""
    decode: Policy = field(default_factory=Full)
    """Policy for one-token steps and the cache; must keep every token (``full``, ``page_topk``)."""

    def validate(self) -> None:
        super().validate()
        check_positive(self, topk=self.topk)
        if not isinstance(self.hierarchical, bool):
            raise PlanError(f"policy 'block_topk': 'hierarchical' must be true or false, got {self.hierarchical!r}")

    def short(self) -> str:
        return f"{'H' if self.hierarchical else ''}top{self.topk}" + self.decode_suffix()

    def build_index(self, q, keys, q_offset, scale):
        """Per query head: block_idx [B, Hq, n_q_blocks, M]."""
        B, Hq, L = q.shape[:3]
        Hkv = keys.shape[1]
        qp = pool_blocks(q, q_offset, self.block_size)  # [B, Hq, n, D]
        kp = pool_blocks(keys, 0, self.block_size).repeat_interleave(Hq // Hkv, dim=1)  # [B, Hq, nk, D]
        rows = query_block_ids(L, q_offset, self.block_size, q.device)
        if self.hierarchical:
            chosen, ok = self._hierarchical(qp, kp, rows)
        else:
            chosen, ok = self._flat(qp, kp, rows)
        n = rows.shape[0]
        fixed = torch.stack([torch.zeros_like(rows), rows], dim=-1)[None, None].expand(B, Hq, n, 2)
        cand = torch.cat([chosen, fixed], dim=-1)
        valid = torch.cat([ok, torch.ones_like(fixed, dtype=torch.bool)], dim=-1)
        return compact_rows(cand, valid)

    def _flat(self, qp, kp, rows):
        """Score every causal key block strictly between the first and the own block; keep the top ones."""
        scores = torch.matmul(qp, kp.transpose(-1, -2))  # [B, Hq, n, nk]
        kb = torch.arange(kp.shape[2], device=qp.device)
        eligible = (kb[None, :] > 0) & (kb[None, :] < rows[:, None])
        scores = scores.masked_fill(~eligible, float("-inf"))
        top = scores.topk(min(self.topk, kp.shape[2]), dim=-1)
        return top.indices, top.values > float("-inf")

    def _hierarchical(self, qp, kp, rows):
        """Branch halving over blocks ``1 .. a-1`` of each query block ``a``: ``2*topk`` branches, keep the best
        ``topk`` by their middle block's pooled key, halve, repeat until branches are single blocks."""
        B, H, n, D = qp.shape
        k = self.topk
        lo = torch.ones_like(rows)
        span = (rows - 1).clamp(min=0)  # eligible blocks per row
        i = torch.arange(2 * k, device=qp.device)
        starts = (lo[:, None] + (i[None, :] * span[:, None]) // (2 * k)).expand(B, H, n, 2 * k)
        ends = (lo[:, None] + ((i[None, :] + 1) * span[:, None]) // (2 * k)).expand(B, H, n, 2 * k)
        while True:
            ok = ends > starts
            rep = ((starts + ends - 1) // 2).clamp(min=0)
            reps = torch.gather(kp, 2, rep.reshape(B, H, -1)[..., None].expand(-1, -1, -1, D)).view(B, H, n, -1, D)
            score = torch.einsum("bhnd,bhncd->bhnc", qp, reps).masked_fill(~ok, float("-inf"))
            keep = score.topk(min(k, score.shape[-1]), dim=-1).indices
            starts, ends = starts.gather(-1, keep), ends.gather(-1, keep)
            if bool(((ends - starts) <= 1).all()):
                return starts, ends > starts
            mid = (starts + ends) // 2
            starts, ends = torch.cat([starts, mid], dim=-1), torch.cat([mid, ends], dim=-1)
