"""Quest page scores of a batch of rows over their bound pages in the KV page pool, in Triton.

Layout
    A ``page_topk`` head in the engine's pool (``paged_cache.PagedQuestStore``) keeps page ``i``'s channel-wise min key
    in slot ``i % page_size`` of the key half of bound page ``bound_table[r, 0, i // page_size]``, and its max key in
    the same slot of the value half: ``k_pool, v_pool: [num_pages, page_size, D]`` (``PagePool.keys``, ``.values``).
    Row ``r`` is one (sequence, KV head) pair with ``lengths[r]`` tokens (read on the device; 0 for a padding row).

Algorithm
    Quest's criticality estimate (Tang et al., 2024, https://arxiv.org/abs/2406.10774), as ``quest.quest_page_scores``:
    ``relu(q) . max + min(q, 0) . min`` with ``q`` summed over the group's query heads (pages are chosen per KV head),
    in fp32; the first and the newest page score +inf (always kept), the columns past a row's pages -inf. One program
    per (row, block of ``BLOCK_P`` pages) reads the bound rows straight from the pool through the bound table, so no
    gathered copy of the bounds is made (the plain-PyTorch path, ``paged_cache.pool_page_scores_reference``, gathers
    them into fp32 first). The scores then go to ``torch.topk`` (``paged_cache.select_pool_pages``).

Limits
    ``head_dim`` up to 256, up to 64 query heads per KV head, ``page_size`` a power of two; any pool dtype.

Tested
    tests/test_paged_cache.py, under TRITON_INTERPRET=1 against ``pool_page_scores_reference`` (ragged rows, a
    zero-length row, bound pages shuffled over the pool), and through the engine's kernel path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pool_quest_scores_kernel(
    Q, K, V, BTABLE, LENGTHS, SCORES, n_cols,
    stride_qr, stride_qh, stride_kp, stride_kt, stride_vp, stride_vt, stride_tr, stride_sr,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, PAGE: tl.constexpr,
):
    r = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    n_pages = tl.minimum((tl.load(LENGTHS + r).to(tl.int32) + PAGE - 1) // PAGE, n_cols)
    valid = offs_p < n_pages
    q = tl.load(Q + r * stride_qr + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h < GROUP)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), 0)  # [BLOCK_D]: the group's relu(q), summed
    q_neg = tl.sum(tl.minimum(q, 0.0), 0)
    phys = tl.load(BTABLE + r * stride_tr + offs_p // PAGE, mask=valid, other=0).to(tl.int64)
    within = offs_p % PAGE
    m2 = valid[:, None] & mask_d[None, :]
    low = tl.load(K + phys[:, None] * stride_kp + within[:, None] * stride_kt + offs_d[None, :], mask=m2,
                  other=0.0).to(tl.float32)
    high = tl.load(V + phys[:, None] * stride_vp + within[:, None] * stride_vt + offs_d[None, :], mask=m2,
                   other=0.0).to(tl.float32)
    score = tl.sum(high * q_pos[None, :] + low * q_neg[None, :], 1)
    score = tl.where((offs_p == 0) | (offs_p == n_pages - 1), float("inf"), score)
    score = tl.where(valid, score, float("-inf"))
    tl.store(SCORES + r * stride_sr + offs_p, score, mask=offs_p < n_cols)


def pool_page_scores(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, page_size: int,
                     bound_table: torch.Tensor, lengths: torch.Tensor, n_cols: int, block_p: int = 32,
                     ) -> torch.Tensor:
    """q: [rows, group, D]; k_pool, v_pool: [num_pages, page_size, D]; bound_table: int [rows, 1, bound pages];
    lengths: int [rows] on q's device; ``n_cols`` (host int) columns of scores, ``ceil(max_len / page_size)``.
    Returns fp32 [rows, n_cols], as ``paged_cache.pool_page_scores_reference``."""
    R, G, D = q.shape
    assert k_pool.shape == v_pool.shape and k_pool.shape[1:] == (page_size, D), "pool pages must be [n, page_size, D]"
    assert k_pool.stride(2) == 1 and v_pool.stride(2) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    assert bound_table.shape[:2] == (R, 1) and lengths.shape == (R,) and lengths.device == q.device
    assert G <= 64 and D <= 256 and page_size & (page_size - 1) == 0
    scores = torch.empty(R, n_cols, device=q.device, dtype=torch.float32)
    if R == 0 or n_cols == 0:
        return scores
    _pool_quest_scores_kernel[(R, triton.cdiv(n_cols, block_p))](
        q, k_pool, v_pool, bound_table, lengths, scores, n_cols,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        bound_table.stride(0), scores.stride(0),
        GROUP=G, BLOCK_H=max(2, triton.next_power_of_2(G)), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_P=block_p, PAGE=page_size,
    )
    return scores


__all__ = ["pool_page_scores"]
