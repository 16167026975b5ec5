"""``vertical_slash``: a few key columns plus a few diagonals, estimated online (MInference's Vertical-Slash).

MInference 1.0 (Jiang et al., 2024, https://arxiv.org/abs/2407.02490), section 3.2: attend the last
``last_q`` queries to all keys, sum their attention per key column ("vertical") and per diagonal offset
``p - j`` ("slash"), keep the top ``vertical_size`` columns and top ``slash_size`` diagonals, and compute
attention only there. Here the estimate is made per chunk (from the chunk's last ``last_q`` queries, over
store + chunk), per query head.

How this differs from MInference's kernel: MInference computes the slashes as block ranges but gathers the
vertical columns *token by token* into dense tiles, so 1,000 scattered columns cost about 1,000 keys per
query. Here a diagonal at offset ``o`` selects, for query block ``a``, the key blocks ``a - o // block_size`` and
``a - ceil(o / block_size)`` (a superset of its entries), and the columns go one of two ways (``columns``):
``blocks`` (the default, and what every plan before 2026-12-05 ran) lists each column's whole block, up to
``block_size`` keys per chosen column when columns are scattered; ``tokens`` gathers the columns that no listed
block of the row holds one key at a time, as MInference does (the block-sparse kernel's ``col_idx``), so a
query attends exactly the chosen columns. Budgets here are smaller than MInference's (defaults 64 + 64 rather
than 1000 + 6096). The first block (sinks) and each query's own block are always kept, standing in for
MInference's forced first columns and last diagonals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.prefill_index import compact_rows, n_query_blocks, query_block_ids
from headwise.policies.base import AttendContext, Policy, check_positive
from headwise.policies.full import Full
from headwise.policies.sparse_prefill import PrefillPattern

COLUMNS = ("blocks", "tokens")
"""``VerticalSlash.columns``: a vertical column attends its whole block, or itself alone."""
VS_MAX_ROWS = 128  # rows the Triton estimate takes (kernels/vs_estimate.MAX_ROWS; that module imports Triton)


def last_query_scores(q: torch.Tensor, keys: torch.Tensor, scale: float, last_q: int) -> torch.Tensor:
    """Scaled scores ``q . k * scale`` of the chunk's last ``last_q`` queries to every key, in the model's dtype, with
    no causal mask: [B, Hq, R, S] (the input of ``kernels/vs_estimate.vertical_slash_sums``, which masks by position).
    GQA without copying keys: the query heads of one KV head are stacked as rows of one matrix product."""
    B, Hq, L, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    R = min(last_q, L)
    qs = (q[:, :, L - R :] * scale).reshape(B, Hkv, (Hq // Hkv) * R, D)
    return torch.matmul(qs, keys.transpose(-1, -2)).view(B, Hq, R, S)


def last_query_attention(q: torch.Tensor, keys: torch.Tensor, q_offset: int, scale: float, last_q: int) -> torch.Tensor:
    """Causal softmax attention of the chunk's last ``last_q`` queries to every key, fp32.

    q: [B, Hq, L, D] at positions ``q_offset ..``; keys: [B, Hkv, S, D]. Returns [B, Hq, R, S], R = min(last_q, L).
    GQA without copying keys: the query heads of one KV head are stacked as rows of one matrix product.
    """
    B, Hq, L, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    R = min(last_q, L)
    qs = q[:, :, L - R :].reshape(B, Hkv, (Hq // Hkv) * R, D)
    # Scores in the model's dtype (a ranking needs no more), softmax in fp32; no fp32 copy of all keys. One fp32
    # copy of the scores, scaled and masked in place: only keys after the first of these queries can lie after one.
    scores = torch.matmul(qs, keys.transpose(-1, -2)).view(B, Hq, R, S).float().mul_(scale)
    first = min(S, max(0, q_offset + L - R))
    q_pos = torch.arange(q_offset + L - R, q_offset + L, device=q.device)
    after = torch.arange(first, S, device=q.device)[None, :] > q_pos[:, None]  # [R, S - first]
    scores[..., first:].masked_fill_(after, float("-inf"))
    return torch.softmax(scores, dim=-1)


def vertical_slash_scores(probs: torch.Tensor, first_pos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Column and diagonal mass of an attention slice.

    probs: [B, H, R, S], rows at consecutive positions ``first_pos ..``. Returns vertical [B, H, S] (mass on
    key ``j``) and slash [B, H, S] (mass on offset ``o = p - j``, ``o`` from 0).
    """
    B, H, R, S = probs.shape
    vertical = probs.sum(dim=2)
    # Row r (position p = first_pos + r) puts offset o on key p - o: one gather for all rows (no loop over rows,
    # which launched two kernels per row in every layer of every chunk); keys before 0 count nothing.
    key = (first_pos + torch.arange(R, device=probs.device))[:, None] - torch.arange(S, device=probs.device)[None, :]
    taken = probs.gather(-1, key.clamp_min(0).expand(B, H, R, S))
    slash = taken.masked_fill_((key < 0).expand(B, H, R, S), 0.0).sum(dim=2)
    return vertical, slash


def vertical_slash_blocks(cols: torch.Tensor, offs: torch.Tensor, q_offset: int, q_len: int,
                          block_size: int, token_columns: bool = False) -> tuple[torch.Tensor, ...]:
    """The kernel's index of chosen columns cols [B, H, nv] and diagonal offsets offs [B, H, ns] for a chunk of
    ``q_len`` queries at ``q_offset``: per query block ``a``, the key blocks ``{0, a}``, each column's block, and each
    diagonal's blocks ``a - o // bs`` and ``a - ceil(o / bs)``, within ``0 .. a`` (candidates, then ``compact_rows``;
    ``kernels/vs_estimate.vertical_slash_index`` is the same in one Triton kernel).

    ``token_columns``: the columns are not blocks but single keys (MInference's gather): the blocks are ``{0, a}`` and
    the diagonals', and each row also gets ``col_idx`` int32 [B, H, n, nv] / ``col_count`` [B, H, n], the columns
    before its block ``a`` that no listed block of the row holds, sorted, -1 padded (a key listed twice would count
    twice). Returns (block_idx, block_count) or (block_idx, block_count, col_idx, col_count)."""
    bs = block_size
    diags = torch.cat([offs // bs, (offs + bs - 1) // bs], dim=-1)  # block diagonals a - kb
    rows = query_block_ids(q_len, q_offset, bs, cols.device)  # [n]
    B, H = cols.shape[:2]
    n = rows.shape[0]
    r = rows[None, None, :, None]
    vert = (cols // bs)[:, :, None, :].expand(B, H, n, -1)
    slsh = r - diags[:, :, None, :]
    fixed = torch.stack([torch.zeros_like(rows), rows], dim=-1)[None, None].expand(B, H, n, 2)
    cand = torch.cat([slsh, fixed] if token_columns else [vert, slsh, fixed], dim=-1)
    valid = (cand >= 0) & (cand <= r)
    idx, count = compact_rows(cand, valid)
    if not token_columns:
        return idx, count
    listed = (idx[..., None, :].long() == vert[..., :, None]).any(-1)  # [B, H, n, nv]: padding (-1) never a block
    col_idx, col_count = compact_rows(cols[:, :, None, :].expand(B, H, n, -1), (vert < r) & ~listed)
    return idx, count, col_idx, col_count


@dataclass(frozen=True)
class VerticalSlash(PrefillPattern):
    name: ClassVar[str] = "vertical_slash"
    paper: ClassVar[str] = "https://arxiv.org/abs/2407.02490"

    vertical_size: int = 64
    """Key columns kept (top by attention of the last queries); each costs its whole block (``columns="blocks"``) or
    itself (``"tokens"``)."""
    slash_size: int = 64
    """Diagonals kept (top by attention of the last queries); each costs one or two blocks per query block."""
    last_q: int = 64
    """Queries at the end of each chunk used to estimate the pattern (MInference: 64)."""
    block_size: int = 64
    """Block granularity for the kernel (MInference: 64)."""
    decode: Policy = field(default_factory=Full)
    """Policy for one-token steps and the cache; must keep every token (``full``, ``page_topk``)."""
    columns: str = "blocks"
    """How the vertical columns are attended: ``blocks`` (each column's whole block, in the block-sparse kernel's
    block list) or ``tokens`` (each column alone, gathered by the kernel as MInference's kernel does: the same
    pattern as MInference's, a subset of ``blocks``'s)."""

    def validate(self) -> None:
        super().validate()
        check_positive(self, vertical_size=self.vertical_size, slash_size=self.slash_size, last_q=self.last_q)
        if self.last_q < 1:
            raise PlanError("policy 'vertical_slash': 'last_q' must be at least 1")
        if self.columns not in COLUMNS:
            raise PlanError(f"policy 'vertical_slash': 'columns' must be one of {', '.join(COLUMNS)}, got "
                            f"{self.columns!r}")

    def params(self) -> dict[str, Any]:
        """Without token columns, the parameters plans wrote before they existed (so their digests stay the same)."""
        out = super().params()
        if self.columns == "blocks":
            del out["columns"]
        return out

    def short(self) -> str:
        return f"VS{self.vertical_size}/{self.slash_size}" + ("t" if self.columns == "tokens" else "") + \
            self.decode_suffix()

    def index(self, q: torch.Tensor, keys: torch.Tensor, ctx: AttendContext) -> tuple[torch.Tensor, ...]:
        return self.build_index(q, keys, ctx.start, ctx.scale, kernel=ctx.use_kernels and q.is_cuda)

    def build_index(self, q, keys, q_offset, scale, kernel: bool = False):
        """Per query head: block_idx [B, Hq, n_q_blocks, M] and block_count, and with ``columns="tokens"`` also
        col_idx [B, Hq, n_q_blocks, nv] and col_count (``vertical_slash_blocks``). ``kernel``: the estimate and the
        index in Triton (``kernels/vs_estimate.py``), else in plain PyTorch (their reference)."""
        L, S, bs = q.shape[2], keys.shape[2], self.block_size
        R = min(self.last_q, L)
        kernel = kernel and R <= VS_MAX_ROWS
        tokens = self.columns == "tokens"
        if kernel:
            from headwise.kernels.vs_estimate import vertical_slash_index, vertical_slash_top  # Triton

            # The Triton index takes the columns and offsets in any order (it tests each key block against all of
            # them), so topk skips its sort, and one topk takes both when their sizes match.
            cols, offs = vertical_slash_top(last_query_scores(q, keys, scale, self.last_q), q_offset + L - R,
                                            min(self.vertical_size, S), min(self.slash_size, S))
            return vertical_slash_index(cols, offs, q_offset // bs, n_query_blocks(L, q_offset, bs), bs, tokens)
        probs = last_query_attention(q, keys, q_offset, scale, self.last_q)
        vertical, slash = vertical_slash_scores(probs, q_offset + L - R)
        cols = vertical.topk(min(self.vertical_size, S), dim=-1).indices  # [B, Hq, nv]
        offs = slash.topk(min(self.slash_size, S), dim=-1).indices  # [B, Hq, ns]
        return vertical_slash_blocks(cols, offs, q_offset, L, bs, tokens)
