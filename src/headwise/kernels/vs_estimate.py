"""Vertical-Slash's pattern estimate in two Triton passes over the last queries' scores (MInference, section 3.2).

What it computes
    ``vertical_slash``'s estimate (``policies/vertical_slash.py``): the causal softmax attention of a chunk's last
    ``R`` queries (rows at positions ``first ..``) to every key, summed per key column (vertical, ``[B, H, S]``) and per
    diagonal offset ``o = p - j`` (slash, ``[B, H, S]``), in fp32. The plain-PyTorch path
    (``last_query_attention`` then ``vertical_slash_scores``) is the reference.

Algorithm
    The scores ``q . k`` (already scaled) come from one matrix product in the model's dtype, made by the caller.
    Pass 1 (``_row_stats_kernel``): one program per (head, split of the keys) runs the online softmax statistics of
    its rows over its keys (max and sum of exponentials, causal: key ``j`` counts for row ``r`` if ``j <= first + r``).
    ``_lse_kernel``, one program per head, merges the splits' statistics into each row's log-sum-exp. Pass 2
    (``_sums_kernel``): one program per (head, block of ``BLOCK_N`` indices, 128 by default, 8 warps) reads the
    scores of its key columns for every row (vertical) and, for its diagonal offsets, the score each row puts on key
    ``first + r - o`` (slash: row ``r`` reads a contiguous, shifted run of keys), and writes ``exp(s - lse)`` summed
    over the rows. Every output element is owned by one program: no atomics. (Until 2026-12-05 every program of pass 2
    merged the statistics itself, in blocks of 64 indices with 4 warps: 255 registers a thread for sm_90, and 8.8 ms
    of a 32-layer 8192-token chunk on the H200 in run 15, ~0.7 TB/s, where pass 1 reads the same scores at ~1.3 TB/s;
    without the merge a program of 128 indices takes 64 registers with 8 warps, built ahead of time, no spills.)
    The index (``_index_kernel``, ``vertical_slash_index``): after ``torch.topk`` chose the columns and diagonals, one
    program per (head, query block) walks that row's key blocks a tile at a time, marks the listed ones and writes
    them in order (a prefix sum gives each its slot): the block-sparse kernel's format without the candidate tensor and
    the two sorts of ``prefill_index.compact_rows`` (``policies/vertical_slash.vertical_slash_blocks``, the reference).
    Both exist to cut the host's work per layer: a vertical-slash chunk step ran some 60 small operators per layer.
    With token columns the same program also writes the row's columns that its blocks do not hold (``col_idx``).

    The reference this replaces made an fp32 copy of the scores, a softmax, an int64 offset index of ``R x S``, a
    gather, a mask and two sums (about a dozen kernels and ten passes over ``R x S`` per layer and chunk); here the
    scores are read three times and nothing of their size is written.

Limits
    ``R`` (rows) up to 128; scores in any float dtype; keys past ``S`` do not exist (``first + R <= S``).

Tested
    tests/test_vs_estimate.py, under TRITON_INTERPRET=1 against the references on awkward shapes (one row, a row count
    that is no power of two, keys fewer than a block, rows at the very start; for the index duplicate columns and
    offsets, blocks before 0 and after the row, rows past the first tile, a query inside a block), and on the GPU at a
    real shape.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_ROWS = 128
# Ints that change with each prompt chunk's prefix length (its keys, the split count and sizes, the statistics'
# strides): left unspecialized, so a new value divisible by 16 or equal to 1 reuses the compiled kernel instead of
# compiling another in the middle of a serving step (two of the slowest prompt steps of run 20's mix on an H200, 608
# and 916 ms against a 451 ms median, loaded one or two). The scores' row stride stays specialized: it sets the loads'
# alignment, and a chunked prefix of whole chunks keeps it divisible by 16. The log-sum-exp kernel's block of splits
# is a constexpr: one block of ``_LSE_BLOCK_S`` (the most splits the default chooses) for every count, since one per
# power of two, which a short warm-up does not meet, still loaded a kernel mid-run (serving run 21: a 1.1 s prompt step).
_LSE_BLOCK_S = 64
_ROW_STATS_INTS = ["n_rows", "n_keys", "first", "iters", "stride_mh", "stride_mr"]
_LSE_INTS = ["n_rows", "n_splits", "stride_mh", "stride_mr"]
_SUMS_INTS = ["n_rows", "n_keys", "first"]


@triton.jit(do_not_specialize=_ROW_STATS_INTS)
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


@triton.jit(do_not_specialize=_LSE_INTS)
def _lse_kernel(
    M_PTR, L_PTR, LSE_PTR, n_rows, n_splits, stride_mh, stride_mr,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Each row's log-sum-exp (log2 units) from the splits' statistics: one program per head."""
    h = tl.program_id(0)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    sp = tl.arange(0, BLOCK_S)
    at = h * stride_mh + rows[:, None] * stride_mr + sp[None, :]
    ok = row_ok[:, None] & (sp[None, :] < n_splits)
    m = tl.load(M_PTR + at, mask=ok, other=float("-inf"))
    top = tl.max(m, 1)  # split 0 holds key 0, which every row sees: finite
    top = tl.where(row_ok, top, 0.0)
    part = tl.load(L_PTR + at, mask=ok, other=0.0) * tl.exp2(tl.where(ok, m - top[:, None], 0.0))
    lse = top + tl.log2(tl.where(row_ok, tl.sum(tl.where(ok, part, 0.0), 1), 1.0))
    tl.store(LSE_PTR + h * BLOCK_R + rows, lse)


@triton.jit(do_not_specialize=_SUMS_INTS)
def _sums_kernel(
    S_PTR, LSE_PTR, V_PTR, D_PTR, n_rows, n_keys, first,
    stride_sh, stride_sr, stride_oh,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    h = tl.program_id(0)
    idx = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    lse = tl.load(LSE_PTR + h * BLOCK_R + rows)
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


def _vertical_slash_both(scores: torch.Tensor, first: int, splits: int | None = None, block_n: int = 64,
                        sums_block_n: int | None = None) -> torch.Tensor:
    """``vertical_slash_sums``'s two outputs in one fp32 buffer [2, B, H, S] (vertical, then slash)."""
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
    if splits is None:  # enough programs to fill the device for the statistics, each over >= 1024 keys (<= 64 splits)
        splits = max(1, min(triton.cdiv(S, 1024), triton.cdiv(264, BH), _LSE_BLOCK_S))
    per = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    splits = triton.cdiv(S, per)
    m = torch.empty(BH, R, splits, device=scores.device, dtype=torch.float32)
    sumexp = torch.empty_like(m)
    _row_stats_kernel[(BH, splits)](
        flat, m, sumexp, R, S, first, per // block_n, flat.stride(0), flat.stride(1), m.stride(0), m.stride(1),
        BLOCK_R=block_r, BLOCK_N=block_n, num_warps=8,  # 4 warps: 255 registers and spills for sm_90 (ptxas)
    )
    lse = torch.empty(BH, block_r, device=scores.device, dtype=torch.float32)
    _lse_kernel[(BH,)](m, sumexp, lse, R, splits, m.stride(0), m.stride(1), BLOCK_R=block_r,
                       BLOCK_S=max(_LSE_BLOCK_S, triton.next_power_of_2(splits)))
    both = torch.empty(2, BH, S, device=scores.device, dtype=torch.float32)  # one buffer: one topk may take both
    sums_n = sums_block_n or max(block_n, 128)
    _sums_kernel[(BH, triton.cdiv(S, sums_n))](
        flat, lse, both[0], both[1], R, S, first, flat.stride(0), flat.stride(1), both.stride(1),
        BLOCK_R=block_r, BLOCK_N=sums_n, num_warps=8 if sums_n >= 128 else 4,
    )
    return both.view(2, B, H, S)


def vertical_slash_sums(scores: torch.Tensor, first: int, splits: int | None = None, block_n: int = 64,
                        sums_block_n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Vertical and slash mass of the causal softmax of ``scores`` (Triton). ``block_n``: keys per step of pass 1;
    ``sums_block_n``: indices per program of pass 2 (default ``max(block_n, 128)``).

    scores: [B, H, R, S], already scaled, rows at positions ``first ..`` (``first + R <= S``; entries after a row's
    position are ignored, whatever they hold); the last dimension contiguous. Returns vertical and slash, fp32
    [B, H, S] each, as ``vertical_slash_scores(torch.softmax(masked scores), first)``.
    """
    B, H, _, S = scores.shape
    both = _vertical_slash_both(scores, first, splits, block_n, sums_block_n)
    return both[0].view(B, H, S), both[1].view(B, H, S)


def vertical_slash_top(scores: torch.Tensor, first: int, n_vertical: int, n_slash: int) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The estimate's chosen key columns [B, H, n_vertical] and diagonal offsets [B, H, n_slash], in no particular
    order: ``vertical_slash_sums`` (arguments as there), then the top of each. The two sums share one buffer, so
    equal budgets (``vertical_slash``'s defaults, 64 and 64) take one ``topk`` launch over both instead of two (each
    a radix select of four kernels, ~60 us at a 90K prefix on the H200 in run 15, for 8 rows)."""
    both = _vertical_slash_both(scores, first)
    if n_vertical == n_slash:
        idx = both.topk(n_vertical, dim=-1, sorted=False).indices
        return idx[0], idx[1]
    return (both[0].topk(n_vertical, dim=-1, sorted=False).indices,
            both[1].topk(n_slash, dim=-1, sorted=False).indices)


@triton.jit
def _index_kernel(
    COLS, OFFS, IDX, COUNT, CIDX, CCOUNT, nv, ns, first_block, n_rows, width,
    BS: tl.constexpr, NV: tl.constexpr, NS: tl.constexpr, TILE: tl.constexpr, WIDTH: tl.constexpr,
    TOKENS: tl.constexpr,
):
    h = tl.program_id(0)
    r = tl.program_id(1)
    a = first_block + r  # this row's query block
    cols = tl.load(COLS + h * nv + tl.arange(0, NV), mask=tl.arange(0, NV) < nv, other=-BS)
    offs = tl.load(OFFS + h * ns + tl.arange(0, NS), mask=tl.arange(0, NS) < ns, other=-1)
    vert = cols // BS  # a column's block (padding: -1, never a block)
    near = tl.where(offs >= 0, a - offs // BS, -1)  # a diagonal's two blocks in this row
    far = tl.where(offs >= 0, a - (offs + BS - 1) // BS, -1)
    out = IDX + (h * n_rows + r).to(tl.int64) * width
    count = 0
    t0 = 0
    while t0 <= a:  # key blocks 0 .. a, a tile at a time: listed once each, in order
        t = t0 + tl.arange(0, TILE)
        hit = (t == 0) | (t == a)
        if not TOKENS:  # token columns are not blocks (below)
            hit = hit | (tl.max((vert[:, None] == t[None, :]).to(tl.int32), 0) > 0)
        hit = hit | (tl.max((near[:, None] == t[None, :]).to(tl.int32), 0) > 0)
        hit = hit | (tl.max((far[:, None] == t[None, :]).to(tl.int32), 0) > 0)
        hit = hit & (t <= a)
        n = hit.to(tl.int32)
        slot = count + tl.cumsum(n, 0) - 1
        tl.store(out + slot, t, mask=hit)
        count += tl.sum(n, 0)
        t0 += TILE
    rest = tl.arange(0, WIDTH)  # -1 after the listed blocks (WIDTH: width, to a power of two)
    tl.store(out + rest, -1, mask=(rest >= count) & (rest < width))
    tl.store(COUNT + h * n_rows + r, count)
    if TOKENS:  # the columns (sorted by the caller) before block a that no listed block holds, each once, in order
        j = tl.arange(0, NV)
        prev = tl.load(COLS + h * nv + j - 1, mask=(j > 0) & (j < nv), other=-1)
        listed = (vert == 0) | (tl.max((near[None, :] == vert[:, None]).to(tl.int32), 1) > 0)
        listed = listed | (tl.max((far[None, :] == vert[:, None]).to(tl.int32), 1) > 0)
        keep = (j < nv) & (cols >= 0) & (vert < a) & ~listed & (cols != prev)
        n = keep.to(tl.int32)
        slot = tl.cumsum(n, 0) - 1
        cout = CIDX + (h * n_rows + r).to(tl.int64) * nv
        tl.store(cout + slot, cols.to(tl.int32), mask=keep)
        kept = tl.sum(n, 0)
        tl.store(cout + j, -1, mask=(j >= kept) & (j < nv))
        tl.store(CCOUNT + h * n_rows + r, kept)


def vertical_slash_index(cols: torch.Tensor, offs: torch.Tensor, first_block: int, n_rows: int,
                         block_size: int, token_columns: bool = False) -> tuple[torch.Tensor, ...]:
    """The block-sparse kernel's index of a vertical-slash pattern (Triton), as ``VerticalSlash.build_index`` makes it
    with candidates and ``compact_rows``: for query block ``a = first_block + r`` of each head, the sorted key blocks
    ``{0, a} | {c // bs for c in cols} | {a - o // bs, a - ceil(o / bs) for o in offs}`` within ``0 .. a``.

    cols: int [B, H, nv] (key columns), offs: int [B, H, ns] (diagonal offsets), both >= 0. Returns block_idx int32
    [B, H, n_rows, nv + 2 ns + 2] (2 ns + 2 with token columns; -1 padded) and block_count int32 [B, H, n_rows]. One
    program per (head, row) walks the row's key blocks a tile at a time and writes the listed ones in order: no sort,
    no candidate tensor.

    ``token_columns``: the columns are single keys, not blocks (``policies/vertical_slash.vertical_slash_blocks``,
    the reference): the blocks leave them out, and col_idx int32 [B, H, n_rows, nv] / col_count [B, H, n_rows] list
    per row the columns before block ``a`` that no listed block holds, sorted, once each (the columns are sorted
    here first, one launch)."""
    B, H, nv = cols.shape
    ns = offs.shape[-1]
    width = (0 if token_columns else nv) + 2 * ns + 2
    idx = torch.empty(B, H, n_rows, width, device=cols.device, dtype=torch.int32)
    count = torch.empty(B, H, n_rows, device=cols.device, dtype=torch.int32)
    if token_columns:
        cols = cols.sort(dim=-1).values
        col_idx = torch.empty(B, H, n_rows, nv, device=cols.device, dtype=torch.int32)
        col_count = torch.empty(B, H, n_rows, device=cols.device, dtype=torch.int32)
    else:
        col_idx, col_count = idx, count  # not written (TOKENS=False)
    if n_rows:
        _index_kernel[(B * H, n_rows)](
            cols.contiguous(), offs.contiguous(), idx, count, col_idx, col_count, nv, ns, first_block, n_rows, width,
            BS=block_size, NV=max(2, triton.next_power_of_2(nv)), NS=max(2, triton.next_power_of_2(ns)), TILE=128,
            WIDTH=triton.next_power_of_2(width), TOKENS=token_columns,
            num_warps=8,  # 4 warps spill 1 KB a thread for sm_90 (ptxas)
        )
    return (idx, count, col_idx, col_count) if token_columns else (idx, count)
