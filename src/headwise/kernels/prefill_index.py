"""Block indices for sparse prefill: the format the Triton kernel reads, and what can be done with it
without Triton (plan side of the plan/run split).

An index lists, for each absolute query block of a chunk, the absolute key blocks its queries may attend
(``kernels/block_sparse.py`` documents the format). Here: the row count for a chunk, turning candidate block
lists into that format (``compact_rows``), the dense token mask an index means (``indices_to_mask``: the
reference's and the pictures' source of truth), a FlexAttention ``BlockMask`` with the same meaning, and the
density of an index.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch


def n_query_blocks(q_len: int, q_offset: int, block_size: int) -> int:
    """Rows of the block index for ``q_len`` queries starting at absolute position ``q_offset``."""
    return -(-(q_offset + q_len) // block_size) - q_offset // block_size


def query_block_ids(q_len: int, q_offset: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Absolute block number of each index row, ``[n_q_blocks]`` (long)."""
    first = q_offset // block_size
    return torch.arange(first, first + n_query_blocks(q_len, q_offset, block_size), device=device)


def compact_rows(cand: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate key blocks -> the kernel's index: sorted, deduplicated, -1 padded.

    cand: [..., C] block numbers (any int dtype, duplicates allowed); valid: bool [..., C] (False entries are
    dropped). Returns block_idx int32 [..., C] (C candidates, at least 1; each row's ``block_count`` entries first,
    then -1) and block_count int32 [...]. One sort, a neighbour comparison and a second sort: no Python loop over
    rows, and no read of the counts on the host (a width cut to the largest count cost a device sync in every
    layer of every prompt chunk).
    """
    big = torch.iinfo(torch.int32).max
    x = torch.where(valid, cand.to(torch.int64), big).sort(dim=-1).values
    dup = torch.zeros_like(valid)
    dup[..., 1:] = x[..., 1:] == x[..., :-1]
    x = torch.where(dup, big, x).sort(dim=-1).values
    count = (x < big).sum(-1)
    if x.shape[-1] == 0:
        x = torch.full((*x.shape[:-1], 1), big, dtype=x.dtype, device=x.device)
    idx = torch.where(x < big, x, -1).to(torch.int32).contiguous()
    return idx, count.to(torch.int32).contiguous()


def indices_to_mask(
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    q_offset: int = 0,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense token mask of an index: bool [Bi, Hi, q_len, k_len], True where query row ``r`` (position
    ``q_offset + r``) may attend key ``j``: ``j``'s block is listed for ``r``'s absolute block and ``j <= q_offset + r``;
    with token columns (``col_idx`` / ``col_count``, ``columns_to_mask``) also where ``j`` is one of them.
    """
    Bi, Hi, nqb, mb = block_idx.shape
    nkb = -(-k_len // block_size)
    valid = torch.arange(mb, device=block_idx.device) < block_count[..., None]
    listed = torch.zeros(Bi, Hi, nqb, nkb + 1, dtype=torch.bool, device=block_idx.device)
    # Invalid entries (padding, or blocks past the keys) go to a spare column that is dropped.
    col = torch.where(valid & (block_idx >= 0) & (block_idx < nkb), block_idx.long(), nkb)
    listed.scatter_(-1, col, True)
    listed = listed[..., :nkb]
    q_pos = torch.arange(q_offset, q_offset + q_len, device=block_idx.device)
    k_pos = torch.arange(k_len, device=block_idx.device)
    row_block = q_pos // block_size - q_offset // block_size  # index row of each query
    mask = listed[:, :, row_block][..., k_pos // block_size]  # [Bi, Hi, q_len, k_len]
    mask = mask & (k_pos[None, :] <= q_pos[:, None])
    if col_idx is not None and col_count is not None:
        mask = mask | columns_to_mask(col_idx, col_count, block_size, q_len, k_len, q_offset)
    return mask


def columns_to_mask(
    col_idx: torch.Tensor,
    col_count: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    q_offset: int = 0,
) -> torch.Tensor:
    """Dense token mask of token columns: bool [Bi, Hi, q_len, k_len], True where key ``j`` is one of the columns
    listed for query row ``r``'s absolute block (``col_idx`` int32 [Bi, Hi, n_q_blocks, max_cols], -1 padded,
    ``col_count`` valid entries first) and ``j <= q_offset + r``: ``kernels/block_sparse.py``'s token columns."""
    Bi, Hi, nqb, mc = col_idx.shape
    valid = torch.arange(mc, device=col_idx.device) < col_count[..., None]
    listed = torch.zeros(Bi, Hi, nqb, k_len + 1, dtype=torch.bool, device=col_idx.device)
    col = torch.where(valid & (col_idx >= 0) & (col_idx < k_len), col_idx.long(), k_len)
    listed.scatter_(-1, col, True)
    q_pos = torch.arange(q_offset, q_offset + q_len, device=col_idx.device)
    k_pos = torch.arange(k_len, device=col_idx.device)
    row_block = q_pos // block_size - q_offset // block_size
    return listed[:, :, row_block, :k_len] & (k_pos[None, :] <= q_pos[:, None])


def expand_index_heads(x: torch.Tensor, q_heads: int, kv_heads: int) -> torch.Tensor:
    """Map an index-like tensor ``[Bi, Hi, ...]`` with Hi in {1, kv_heads, q_heads} to query heads ``[Bi, q_heads, ...]``."""
    Hi = x.shape[1]
    if Hi == q_heads:
        return x
    if Hi == 1:
        return x.expand(x.shape[0], q_heads, *x.shape[2:])
    assert Hi == kv_heads, f"index heads {Hi} must be 1, {kv_heads} or {q_heads}"
    return x.repeat_interleave(q_heads // kv_heads, dim=1)


# ---------------------------------------------------------------------------------------------- FlexAttention
def flex_block_mask(
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_len: int,
    k_len: int,
    q_heads: int,
    kv_heads: int,
    batch: int,
    q_offset: int = 0,
    exact_mask_mod: bool = False,
) -> Any:
    """FlexAttention ``BlockMask`` with exactly the kernel's semantics, from the same index.

    Listed blocks wholly before a query block's first position become Flex's *full* blocks (no mask_mod);
    the rest (the diagonal) are *partial* blocks with the causal ``mask_mod``. Compiled flex_attention
    visits only listed blocks, so this is the pattern exactly (the benchmark's setting). Eager (uncompiled)
    flex_attention ignores block sparsity and applies ``mask_mod`` to every score: pass
    ``exact_mask_mod=True`` to make ``mask_mod`` also check block membership (a dense ``[B, H, nqb, nkb]``
    bool lookup). Needs ``q_offset`` aligned to ``block_size`` (Flex's query blocks start at the first
    query). Shapes as ``block_sparse_attention``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    assert q_offset % block_size == 0, "FlexAttention's query blocks start at query 0: align q_offset"
    idx = block_idx.expand(batch, -1, -1, -1) if block_idx.shape[0] == 1 else block_idx
    cnt = block_count.expand(batch, -1, -1) if block_count.shape[0] == 1 else block_count
    idx = expand_index_heads(idx, q_heads, kv_heads)
    cnt = expand_index_heads(cnt, q_heads, kv_heads)
    nqb, mb = idx.shape[2], idx.shape[3]
    nkb = -(-k_len // block_size)
    row_start = q_offset + torch.arange(nqb, device=idx.device) * block_size  # first query of each block
    limit = (torch.clamp(row_start + 1, max=k_len) // block_size)[:, None]
    pos = torch.arange(mb, device=idx.device)
    valid = pos < cnt[..., None]
    full = valid & (idx < limit)
    n_full = full.sum(-1).to(torch.int32)
    n_part = (cnt - n_full).to(torch.int32)
    # Sorted rows: full entries are the prefix, partial ones the suffix; shift the suffix to the front.
    shift = (pos + n_full[..., None].long()).clamp(max=mb - 1)
    part_idx = torch.gather(idx, -1, shift)
    part_idx = torch.where(pos < n_part[..., None], part_idx, 0).to(torch.int32)
    full_idx = torch.where(pos < n_full[..., None], idx, 0).to(torch.int32)
    # Pad the lists to one row per key block, as Flex's own masks are: equal shapes for every index, so a
    # compiled flex_attention is not recompiled for each index width.
    if mb < nkb:
        pad = (0, nkb - mb)
        part_idx = torch.nn.functional.pad(part_idx, pad)
        full_idx = torch.nn.functional.pad(full_idx, pad)
    part_idx, full_idx = part_idx.contiguous(), full_idx.contiguous()

    def causal(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        return kv_idx <= q_idx + q_offset

    mask_mod = causal
    if exact_mask_mod:
        listed = torch.zeros(*idx.shape[:3], nkb + 1, dtype=torch.bool, device=idx.device)
        listed.scatter_(-1, torch.where(valid, idx.long(), nkb), True)

        def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
            return (kv_idx <= q_idx + q_offset) & listed[b, h, q_idx // block_size, kv_idx // block_size]

    kwargs: dict[str, Any] = {}
    if "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters:
        kwargs["compute_q_blocks"] = False  # forward only: skip building the transposed index
    return BlockMask.from_kv_blocks(
        n_part.contiguous(), part_idx, n_full.contiguous(), full_idx,
        BLOCK_SIZE=block_size, mask_mod=mask_mod, seq_lengths=(q_len, k_len), **kwargs,
    )


def density(block_count: torch.Tensor, block_size: int, q_len: int, k_len: int, q_offset: int = 0) -> float:
    """Listed key blocks as a share of the causal blocks (lower triangle incl. diagonal), averaged over rows."""
    nqb = block_count.shape[-1]
    first = q_offset // block_size
    causal = (torch.arange(first, first + nqb, device=block_count.device) + 1).clamp(max=math.ceil(k_len / block_size))
    return float((block_count.float() / causal).mean())
