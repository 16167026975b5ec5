"""Batched varlen decode over a paged KV pool, in Triton: one launch per (layer, head group) for the whole batch.

Layout
    The pool holds pages of ``page_size`` token slots of one KV head: ``k_pool, v_pool: [num_pages, page_size, D]``
    (views of one allocation: ``pool.PagePool.keys`` and ``.values``; any page and slot strides, D contiguous),
    written through ``PagePool.write``. Batch row ``b`` is one sequence; the group's KV head ``h`` of that sequence keeps its token
    slots in the pages of its table: ``table: int32 [B, H, max_pages]``, logical page ``i`` (slots
    ``i * page_size ..``) lives in physical page ``table[b, h, i]``, in any order over the pool (pages are handed
    out by ``pool.PagePool``). ``lengths: int32 [B]`` on the device are the tokens each sequence holds (0: an
    empty row, whose output is zero); ``max_len``, a host int, bounds them and sizes the launch (grid, splits,
    trip counts), so a CUDA graph captured at a limit replays whatever the lengths are (a length past
    ``max_len`` is read as ``max_len``).

Modes (the same kernel; what changes is which of a row's slots are attended)
    full        slots ``< lengths[b]``: every token.
    streaming   ``ring = sink + window``: ``SinkWindowStore``'s layout, position ``p`` in slot ``p`` below
                ``sink`` and in slot ``sink + (p - sink) % window`` after (``PagedLayout.slots``). The slots held are
                the first ``min(lengths[b], ring)``, and at decode every held slot is visible: the ring holds
                exactly the last ``window`` positions, the query's own included (StreamingLLM's pattern for the
                newest token), in whatever rotation, and softmax over a set does not care about order.
    page_topk   ``selected: int32 [B, H, k]`` logical pages to attend per (sequence, head) (-1 padded, any order,
                no duplicates; Quest's choice): read through the table; slots past ``lengths[b]`` (a partial
                newest page) and pages past the sequence's end are masked, so a stale or padded choice reads
                nothing it must not.

Algorithm
    Flash-decoding (Dao et al., 2023) as ``paged_decode.sparse_decode``: the page list of every (sequence, KV head)
    is cut into ``num_splits`` runs, one program per run on a 1-D grid (split fastest); a program loads the
    ``GROUP`` query heads sharing the KV head (GQA packing: each K/V row is read once for all of them), walks its
    pages ``tokens_per_iter`` slots at a time, reading K/V rows straight from the pool through the table (no
    gathered copy), with an online softmax. Splits are sized for the longest row: a short row's programs past its
    end find nothing and write an empty partial. The split epilogue and the split-K merge are
    ``paged_decode.store_split`` and ``paged_decode.merge_splits``, shared with every decode kernel.

Limits
    As ``sparse_decode``: ``page_size`` a power of two in [1, 128], ``head_dim`` up to 256, at most 64 query heads
    per KV head; fp32, fp16 or bf16 with fp32 accumulation (fp32 pools multiply in full fp32). Under
    TRITON_INTERPRET=1 bf16 products are done in fp32 (the interpreter checks indexing and softmax).

Tested
    tests/test_kernels_batch_decode.py, under TRITON_INTERPRET=1 against ``batch_decode_reference`` (fp32, a
    Python loop over rows that gathers each row's pages; ``kernels/decode_reference.py``) and against the policies' own semantics
    (StreamingLLM's mask over positions, Quest's selected pages): ragged lengths with partial pages, a zero-length
    row, an empty batch, ring wrap, GQA 4:1 and 1:1, pages shuffled over the pool, one and several splits; on a GPU,
    that new lengths, split sizes and table widths reuse one compiled kernel (``_PER_STEP_INTS``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headwise.kernels.common import INTERPRET
from headwise.kernels.paged_decode import (
    _LOG2E,
    _MAX_SPLITS,
    _TOKENS_PER_ITER,
    _dot,
    _num_splits,
    load_query_group,
    merge_splits,
    store_split,
)


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _attend_pool_block(
    q, k_pool, v_pool, table_row, sel_row, p0, page_hi, n_tok, scale_log2e,
    stride_kp, stride_kt, stride_vp, stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d,
    PAGE: tl.constexpr, SELECT: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over entries ``p0 ..`` (``BLOCK_N // PAGE`` of them) of a row's page list."""
    entry = p0 + offs_n // PAGE
    valid = entry < page_hi
    if SELECT:
        logical = tl.load(sel_row + entry, mask=valid, other=-1)
        valid = valid & (logical >= 0)
    else:
        logical = entry
    within = offs_n % PAGE
    valid = valid & (logical * PAGE + within < n_tok)  # also keeps ``logical`` inside the row's table
    phys = tl.load(table_row + logical, mask=valid, other=0).to(tl.int64)
    mask = valid[:, None] & mask_d[None, :]
    k = tl.load(k_pool + phys[:, None] * stride_kp + within[:, None] * stride_kt + offs_d[None, :], mask=mask, other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e  # [BLOCK_H, BLOCK_N], log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_pool + phys[:, None] * stride_vp + within[:, None] * stride_vt + offs_d[None, :], mask=mask, other=0.0)
    acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
    return m_new, l_i, acc


# Host ints that change from one step to the next where a mixed step runs this kernel eagerly (the rows' longest
# length, the split sizes, the tables' widths): left unspecialized, so a new length never compiles a new kernel in
# the middle of a serving run (Triton specializes an int that equals 1 or is divisible by 16; with a few such ints a
# run met new combinations for minutes: docs/serving.md, run 19).
_PER_STEP_INTS = ["max_len", "pages_per_split", "iters_per_split", "n_splits",
                  "stride_tb", "stride_th", "stride_sb", "stride_sh", "stride_lb", "stride_lh"]


@triton.jit(do_not_specialize=_PER_STEP_INTS)
def _batch_decode_kernel(
    Q, K, V, TABLE, SEL, LENGTHS, O_PART, LSE_PART, Out,
    n_heads, max_len, ring, n_sel, pages_per_split, iters_per_split, n_splits, scale_log2e,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_vp, stride_vt,
    stride_tb, stride_th, stride_sb, stride_sh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, SELECT: tl.constexpr, SINGLE_SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    BLOCK_N: tl.constexpr = PAGE * PAGES_PER_ITER
    pid = tl.program_id(0)
    split = pid % n_splits
    bh = pid // n_splits
    b = bh // n_heads
    h = bh % n_heads
    # The slots this row attends: its length (read now, on the device), at most the launch's limit, and for a
    # ring at most the ring's slots.
    n_tok = tl.minimum(tl.load(LENGTHS + b).to(tl.int32), max_len)
    if ring > 0:
        n_tok = tl.minimum(n_tok, ring)
    if SELECT:
        n_pages = n_sel
    else:
        n_pages = (n_tok + PAGE - 1) // PAGE
    page_lo = split * pages_per_split
    page_hi = tl.minimum(page_lo + pages_per_split, n_pages)

    q, q_rows, offs_d, mask_h, mask_d, m_i, l_i, acc = load_query_group(Q, b, h * GROUP, stride_qb, stride_qh, GROUP,
                                                                         HEAD_DIM, BLOCK_H, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    table_row = TABLE + b * stride_tb + h * stride_th
    sel_row = SEL + b * stride_sb + h * stride_sh
    # A fixed trip count from the host; the interpreter takes no runtime ``range`` bound, hence its ``while``.
    if INTERPRET:
        it = 0
        while it < iters_per_split:
            m_i, l_i, acc = _attend_pool_block(
                q, K, V, table_row, sel_row, page_lo + it * PAGES_PER_ITER, page_hi, n_tok, scale_log2e,
                stride_kp, stride_kt, stride_vp, stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d,
                PAGE, SELECT, INTERPRET, IEEE)
            it += 1
    else:
        for it in range(0, iters_per_split):
            m_i, l_i, acc = _attend_pool_block(
                q, K, V, table_row, sel_row, page_lo + it * PAGES_PER_ITER, page_hi, n_tok, scale_log2e,
                stride_kp, stride_kt, stride_vp, stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d,
                PAGE, SELECT, INTERPRET, IEEE)
    store_split(acc, m_i, l_i, Out, O_PART, LSE_PART, b, q_rows, split, offs_d, mask_h, mask_d,
                stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SINGLE_SPLIT)


# ----------------------------------------------------------------------------------------------- public API
def batch_decode(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    max_len: int,
    page_size: int,
    *,
    ring: int = 0,
    selected: torch.Tensor | None = None,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    tokens_per_iter: int = _TOKENS_PER_ITER,
    num_warps: int = 4,
    num_stages: int = 2,
    programs_per_sm: int = 4,
) -> torch.Tensor:
    """Attention of one new token per sequence over a head group's pages in the pool, the whole batch in one launch.

    q: [B, H * group, D] (GQA order); k_pool, v_pool: [num_pages, page_size, D]; table: int32/int64 [B, H, pages]
    (logical -> physical page); lengths: int [B] on q's device, bounded by the host int ``max_len``. ``ring``
    (``sink + window``, 0 = none): a streaming group, whose rows hold ``min(length, ring)`` slots. ``selected``
    (int32/int64 [B, H, k], -1 padded): a ``page_topk`` group's logical pages. Returns [B, H * group, D] (into
    ``out`` when given, e.g. a slice of a layer's output). ``num_splits`` and the rest only change speed.
    """
    B, Hq, D = q.shape
    H = table.shape[1]
    assert k_pool.shape == v_pool.shape and k_pool.dim() == 3 and k_pool.shape[1:] == (page_size, D), \
        "k_pool, v_pool must be [num_pages, page_size, D] like q"
    assert table.dim() == 3 and table.shape[0] == B and table.dtype in (torch.int32, torch.int64), \
        "table must be int [B, H, pages]"
    assert lengths.shape == (B,) and not lengths.is_floating_point() and lengths.device == q.device, \
        "lengths must be integer [B] on q's device"
    assert Hq % max(1, H) == 0 and Hq // max(1, H) <= 64, "query heads must be a multiple (<= 64) of KV heads"
    assert k_pool.stride(2) == 1 and v_pool.stride(2) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    assert page_size >= 1 and page_size & (page_size - 1) == 0 and page_size <= 128, "page_size: power of 2 <= 128"
    assert D <= 256, "head_dim up to 256"
    assert max_len >= 0 and ring >= 0
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if B == 0 or H == 0:
        return out
    group = Hq // H
    if selected is not None:
        assert selected.shape[:2] == (B, H) and selected.dtype in (torch.int32, torch.int64)
        max_pages = n_sel = selected.shape[2]
        sel = selected
    else:
        n_sel = 0
        held = min(max_len, ring) if ring else max_len
        max_pages = -(-held // page_size)
        sel = table  # unused pointer
    assert selected is not None or table.shape[2] >= max_pages, \
        f"table holds {table.shape[2]} pages per row, {max_pages} needed for {max_len} tokens"
    pages_per_iter = max(1, tokens_per_iter // page_size)
    splits = min(num_splits or _num_splits(B * H, max_pages, pages_per_iter, q.device, programs_per_sm), _MAX_SPLITS)
    pages_per_split = math.ceil(max(1, max_pages) / splits)
    pages_per_split = math.ceil(pages_per_split / pages_per_iter) * pages_per_iter
    splits = max(1, math.ceil(max(1, max_pages) / pages_per_split))
    if splits > 1:
        o_part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    scale = D**-0.5 if scale is None else scale
    _batch_decode_kernel[(B * H * splits,)](
        q, k_pool, v_pool, table, sel, lengths, o_part, lse_part, out,
        H, max_len, ring, n_sel, pages_per_split, pages_per_split // pages_per_iter, splits, scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        table.stride(0), table.stride(1), sel.stride(0), sel.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2) if splits > 1 else 0,
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        PAGE=page_size, PAGES_PER_ITER=pages_per_iter, SELECT=selected is not None, SINGLE_SPLIT=splits == 1,
        INTERPRET=INTERPRET, IEEE=k_pool.dtype == torch.float32, num_warps=num_warps, num_stages=num_stages,
    )
    if splits > 1:
        merge_splits(o_part, lse_part, out, splits)
    return out


__all__ = ["batch_decode"]
