"""Vertical-Slash's pattern estimate in two Triton passes over the last queries' scores (MInference, section 3.2).

What it computes
    ``vertical_slash``'s estimate (``policies/vertical_slash.py``): the causal softmax attention of a chunk's last
    ``R`` queries (rows at positions ``first ..``) to every key, summed per key column (vertical, ``[B, H, S]``) and per
    diagonal offset ``o = p - j`` (slash, ``[B, H, S]``), in fp32. The plain-PyTorch path
    (``last_query_attention`` then ``vertical_slash_scores``) is the reference.

Algorithm
    The scores ``q . k`` (already scaled) come from one matrix product in the model's dtype, made by the caller.
    Pass 1 (``_row_stats_kernel``): one program per (head, split of the keys) runs the online softmax statistics of
    its rows over its keys (max and sum of exponentials, causal: key ``j`` counts for row ``r`` if ``j <= first + r``);
    the splits are merged on the host side (a few hundred numbers per head) into each row's log-sum-exp.
    Pass 2 (``_sums_kernel``): one program per (head, block of ``BLOCK_N`` indices) reads the scores of its key
    columns for every row (vertical) and, for its diagonal offsets, the score each row puts on key ``first + r - o``
    (slash: row ``r`` reads a contiguous, shifted run of keys), and writes ``exp(s - lse)`` summed over the rows.
    Every output element is owned by one program: no atomics.

    The reference this replaces made an fp32 copy of the scores, a softmax, an int64 offset index of ``R x S``, a
    gather, a mask and two sums (about a dozen kernels and ten passes over ``R x S`` per layer and chunk); here the
    scores are read three times and nothing of their size is written.

Limits
    ``R`` (rows) up to 128; scores in any float dtype; keys past ``S`` do not exist (``first + R <= S``).

Tested
    tests/test_vs_estimate.py, under TRITON_INTERPRET=1 against the reference on awkward shapes (one row, a row count
    that is no power of two, keys fewer than a block, rows at the very start), and on the GPU at real shapes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 128


@triton.jit
def _row_stats_kernel(
    S_PTR, M_PTR, L_PTR, n_rows, n_keys, first, iters,
    stride_sh, stride_sr, stride_mh, stride_mr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    start = split * iters * BLOCK_N
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    sumexp = tl.zeros([BLOCK_R], tl.float32)
    base = S_PTR + h.to(tl.int64) * stride_sh + rows[:, None].to(tl.int64) * stride_sr
    it = 0
    while it < iters:  # a while loop: Triton's interpreter runs no range() over a runtime bound
        cols = start + it * BLOCK_N + tl.arange(0, BLOCK_N)
        it += 1
        ok = row_ok[:, None] & (cols[None, :] < n_keys) & (cols[None, :] <= first + rows[:, None])
        s = tl.load(base + cols[None, :], mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634  # log2(e): exp2 below
        m_new = tl.maximum(m, tl.max(s, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: no inf - inf
        sumexp = sumexp * tl.exp2(m - safe) + tl.sum(tl.exp2(s - safe[:, None]), 1)
        m = m_new
    out = h * stride_mh + rows * stride_mr + split
    tl.store(M_PTR + out, m, mask=row_ok)
    tl.store(L_PTR + out, sumexp, mask=row_ok)


@triton.jit
def _sums_kernel(
    S_PTR, LSE_PTR, V_PTR, D_PTR, n_rows, n_keys, first,
    stride_sh, stride_sr, stride_lh, stride_oh,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    lse = tl.load(LSE_PTR + h * stride_lh + rows, mask=row_ok, other=0.0)  # log2 units
    base = S_PTR + h.to(tl.int64) * stride_sh + rows[:, None].to(tl.int64) * stride_sr
    pos = first + rows[:, None]  # each row's position
    # Vertical: the rows' probabilities on key columns ``idx``.
    ok = row_ok[:, None] & (idx[None, :] < n_keys) & (idx[None, :] <= pos)
    s = tl.load(base + idx[None, :], mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634  # log2(e): exp2 below
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    tl.store(V_PTR + h * stride_oh + idx, tl.sum(p, 0), mask=idx < n_keys)
    # Slash: offset o of row r is key first + r - o (never after the row; before key 0 it is nothing).
    key = pos - idx[None, :]
    ok = row_ok[:, None] & (idx[None, :] < n_keys) & (key >= 0)
    s = tl.load(base + key, mask=ok, other=float("-inf")).to(tl.float32) * 1.4426950408889634  # log2(e): exp2 below
    p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
    tl.store(D_PTR + h * stride_oh + idx, tl.sum(p, 0), mask=idx < n_keys)


def vertical_slash_sums(scores: torch.Tensor, first: int, splits: int | None = None,
                        block_n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash mass of the causal softmax of ``scores`` (Triton).

    scores: [B, H, R, S], already scaled, rows at positions ``first ..`` (``first + R <= S``; entries after a row's
    position are ignored, whatever they hold); the last dimension contiguous. Returns vertical and slash, fp32
    [B, H, S] each, as ``vertical_slash_scores(torch.softmax(masked scores), first)``.
    """
    B, H, R, S = scores.shape
    if not 1 <= R <= MAX_ROWS:
        raise ValueError(f"vertical_slash_sums takes 1 to {MAX_ROWS} rows, got {R}")
    if first < 0 or first + R > S:
        raise ValueError(f"rows at positions {first}..{first + R - 1} need keys up to there, got {S} keys")
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    flat = scores.reshape(B * H, R, S)  # a view where B and H are one stride apart (the caller's matmul output)
    BH = B * H
    block_r = max(16, triton.next_power_of_2(R))
    if splits is None:  # enough programs to fill the device for the statistics, each over >= 1024 keys
        splits = max(1, min(triton.cdiv(S, 1024), triton.cdiv(264, BH)))
    per = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, per)
    m = torch.empty(BH, R, splits, device=scores.device, dtype=torch.float32)
    sumexp = torch.empty_like(m)
    _row_stats_kernel[(BH, splits)](
        flat, m, sumexp, R, S, first, per // block_n, flat.stride(0), flat.stride(1), m.stride(0), m.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )
    top = m.amax(dim=-1, keepdim=True)  # every row sees key 0, so top is finite
    lse = (top.squeeze(-1) + torch.log2((sumexp * torch.exp2(m - top)).sum(-1))).contiguous()  # [BH, R], log2 units
    vertical = torch.empty(BH, S, device=scores.device, dtype=torch.float32)
    slash = torch.empty_like(vertical)
    _sums_kernel[(BH, triton.cdiv(S, block_n))](
        flat, lse, vertical, slash, R, S, first, flat.stride(0), flat.stride(1), lse.stride(0), vertical.stride(0),
        BLOCK_R=block_r, BLOCK_N=block_n,
    )
    return vertical.view(B, H, S), slash.view(B, H, S)
