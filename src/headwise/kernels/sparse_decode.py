"""Paged sparse decode attention (flash-decoding over selected pages) and Quest page scoring, in Triton.

Algorithm
    One new query token per sequence. The cache of each KV head is contiguous, ``k, v: [B, Hkv, S_cap, D]``;
    a *page* is a run of ``page_size`` consecutive token slots (page ``p`` = slots ``p*page_size ..``). A page
    table ``[B, Hkv, max_pages]`` lists, per KV head, the pages to attend (any order, no duplicates; entries
    past ``counts[b, h]`` are ignored). Only slots ``< length`` exist, so the newest page may be partial.

    ``sparse_decode`` is flash-decoding (Dao et al., 2023): the page list of each (sequence, KV head) is cut
    into ``num_splits`` contiguous runs, one program per run (a 1-D grid, the splits of a head consecutive
    and the first group's long programs first, so the hardware deals them out evenly); a program loads the
    ``GROUP`` query heads that share the KV head (GQA packing: K/V are read once for all of them), walks its pages
    ``BLOCK_N`` tokens at a time, reading K/V rows straight from the cache through the page table (no
    gather into a temporary: a gathered copy costs more than dense attention), and keeps an online softmax.
    Each program writes its normalised partial output and log-sum-exp; a second small kernel merges the
    splits with log-sum-exp weights (or, ``fused_merge=1``, the last program of each head to finish merges
    them, found by an acq_rel atomic counter that it resets). With one split the first kernel writes the
    output directly.

    ``page_table=None`` means "every page below ``length``": the same kernel serves full heads and the
    ring buffer of streaming heads (at decode every stored token is visible, whatever its position), and
    ``second=`` runs a second such group (its own cache, e.g. the streaming heads' ring buffers) in the same
    launch, so a layer of full + streaming heads is one launch and one merge. ``page_size=1`` makes the
    table a list of token positions (TidalDecode, Recycled Attention).

    ``quest_page_scores`` is Quest's criticality estimate (Tang et al., 2024, https://arxiv.org/abs/2406.10774):
    with the per-page channel-wise min and max key, ``score = sum_d max(q_d * min_d, q_d * max_d)``, an upper
    bound of ``q . k`` for every key ``k`` of the page. For GQA we sum the bound over the query heads of the KV
    head (pages are selected per KV head, since the cache and the kernel are per KV head), which bounds
    ``sum_r q_r . k``. Written as ``relu(q) . max + min(q, 0) . min`` it is one pass over the page bounds. The
    bounds may be 8-bit e4m3 codes with one fp32 scale per page row (``PageTopK(bounds="e4m3")``, rounded outward
    by ``policies.stores.quantize_bounds``): half the bytes, the scale applied to each row's dot product.
    ``select_pages`` keeps the top pages within a token budget, always with the first page (attention sinks)
    and the newest page; its Triton path finds the k-th largest score bit by bit on the float bits (stopping
    once exactly k scores lie above the prefix) in one program per (sequence, KV head); ties go to the lower
    page index, so exactly k pages (or, ``bins``/``select_bins`` > 0, with the same result from a histogram of
    the keys, the k-th largest's bin, and a short bisection inside that bin: ~1 us less at 256 bins on an H100,
    slower with 1024 or more bins). ``topk_sparse_decode`` does that selection inside the attention kernel:
    every program of a head finds the same k pages from the scores and attends its share of them, so Quest
    decode is score -> attend (-> merge) instead of score -> top-k -> attend -> merge.

Limits
    ``page_size`` is a power of two in [1, 128]; ``head_dim`` is any size up to 256 (padded to a power of
    two inside the kernel); the group of query heads per KV head is at most 64. A (sequence, head) with
    zero pages gets a zero output. K/V may be fp32, fp16 or bf16 (q the same dtype); accumulation is fp32
    (fp32 caches multiply in full fp32, not TF32). ``second=`` needs both groups "all pages". The Triton
    top-k holds a row of up to 32768 page scores in registers (longer rows fall back to ``torch.topk``).
    Under TRITON_INTERPRET=1 bf16 products are done in fp32 (the interpreter's bf16 dot and rounding are
    wrong), so the interpreter checks indexing and softmax, and the GPU run checks bf16 numerics.

Tested
    tests/test_kernels_decode.py: kernel vs fp32 reference under TRITON_INTERPRET=1 (S=97, page 16 with a
    partial last page, GQA 4:1 and 1:1, different page counts per head, pages listed in a random order,
    D 64, 80 and 128, several splits with empty ones, two groups in one launch, both merges, top-k with ties
    and -0.0, in-kernel selection against ``top_pages_reference``, the histogram selection on crowded bins,
    ties, +inf runs and -inf/huge ranges, scoring from 8-bit bounds); the same file
    passes on an H100 with real kernels. At Llama-3-8B shapes, 128K tokens, on an H100
    (``src/headwise/bench/decode.py``, bench/results/decode_2026-11-23.json): max error vs the fp32 reference
    at most half of PyTorch-in-bf16's; dense over all pages runs at SDPA's speed (2.7 TB/s).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton.jit does
_MAX_SPLITS = 512  # the merge kernel holds all splits of a column block in registers
_TOKENS_PER_ITER = 64  # K/V rows per inner iteration: enough for a tensor-core tile, small enough for registers


# ----------------------------------------------------------------------------------------------- kernels
@dataclass(frozen=True)
class DeviceLength:
    """A cache length that lives on the device, for decode steps replayed from a CUDA graph: the valid slots
    are ``min(count[0] + add, limit)``, read by the kernel when it runs; the launch (grid, splits) is sized for
    ``limit`` slots, and programs past the valid ones find nothing to attend. ``count`` is a one-element
    integer tensor on the kernel's device (e.g. the position of the token being decoded, with ``add=1``)."""

    count: torch.Tensor
    add: int
    limit: int


def _length_args(length: int | DeviceLength) -> tuple[int, torch.Tensor | None, int]:
    """(limit, device tensor or None, add) of a length argument."""
    if isinstance(length, DeviceLength):
        assert length.count.numel() == 1 and not length.count.is_floating_point(), "count: one integer element"
        return int(length.limit), length.count, int(length.add)
    return int(length), None, 0


@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` on tensor cores in ``b``'s dtype with fp32 accumulation. Triton's interpreter gets bf16 dots
    wrong and truncates (rather than rounds) fp32 -> bf16, so there both operands are multiplied in fp32
    (``a`` unrounded): the interpreter checks the indexing and the softmax, not bf16 rounding."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:  # fp32 caches: full fp32 products, not TF32
        return tl.dot(a.to(b.dtype), b, input_precision="ieee")
    return tl.dot(a.to(b.dtype), b)


@triton.jit
def _attend_block(
    q, k_base, v_base, table_row, p0, page_hi, length, scale_log2e, stride_kn, stride_vn,
    m_i, l_i, acc, offs_n, offs_d, mask_d,
    PAGE: tl.constexpr, ALL_PAGES: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over the ``PAGES_PER_ITER`` page slots starting at ``p0`` of the page list."""
    slot = p0 + offs_n // PAGE
    valid = slot < page_hi
    if ALL_PAGES:
        page = slot.to(tl.int64)
    else:
        page = tl.load(table_row + slot, mask=valid, other=0).to(tl.int64)
        valid = valid & (page >= 0)
    tok = page * PAGE + offs_n % PAGE
    valid = valid & (tok < length)
    k = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e  # [BLOCK_H, BLOCK_N], log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None] & mask_d[None, :], other=0.0)
    acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
    return m_new, l_i, acc


@triton.jit
def _order_keys(x, valid):
    """fp32 -> int32 keys with the same order (signed int order == float order, -0.0 == 0.0); ``INT_MIN`` where
    not valid."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return tl.where(valid, key, -2147483648)


@triton.jit
def _top_k_mask(key, k, n_valid):
    """Which entries of the int32 ``key`` row (``INT_MIN`` padding, ``1 <= k <= n_valid`` real entries) are its
    ``k`` largest: every key above the k-th largest, then keys equal to it in index order until ``k`` are taken.

    The threshold ``t`` is built a bit at a time on the unsigned view ``u = key ^ INT_MIN``, most significant
    first, keeping each bit while ``count(u >= t) >= k``; after 32 bits ``t`` is the k-th largest ``u``. The
    reductions bound this loop, so it stops as soon as ``count(u >= t) == k``: then the ``k`` keys ``>= t``
    are the answer (no tie across ``t``), usually well before the 32nd bit."""
    INT_MIN: tl.constexpr = -2147483648
    t = tl.full([], 0, tl.int32)  # unsigned prefix, as int32 bits
    n_t = n_valid  # count(u >= t)
    bit = 31
    while (bit >= 0) & (n_t != k):
        cand = t | (tl.full([], 1, tl.int32) << bit)
        n = tl.sum((key >= (cand ^ INT_MIN)).to(tl.int32), 0)
        t = tl.where(n >= k, cand, t)
        n_t = tl.where(n >= k, n, n_t)
        bit -= 1
    kth = t ^ INT_MIN
    above = key > kth
    tie = key == kth
    room = k - tl.sum(above.to(tl.int32), 0)
    return above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))


@triton.jit
def _minmax_combine(lo_a, hi_a, lo_b, hi_b):
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b)


@triton.jit
def _top_k_mask_hist(key, k, n_valid, valid, NBINS: tl.constexpr):
    """``_top_k_mask`` by a histogram: the same set (every key above the k-th largest, then ties by index),
    in a fixed handful of block-wide steps instead of up to 32 reductions.

    The valid finite keys ``[lo, hi]`` are cut into ``NBINS - 1`` bins of ``2^shift`` keys (keys above ``hi``,
    i.e. +inf and NaN, share the last bin); a histogram and its cumulative sum give the bin ``b`` that holds
    the k-th largest key and ``room``, how many keys of that bin belong to the top ``k``. Every key in a bin
    above ``b`` is taken; inside ``b`` the room-th largest is found bit by bit on the key's offset from the
    bin's first key (``shift`` bits, 33 for the last bin), stopping once exactly ``room`` keys lie above the
    prefix: with bins this narrow that is usually zero to three reductions. The binning is monotone in the
    key whatever the data, so the result is exact for any scores; the data only changes the speed."""
    INT_MAX: tl.constexpr = 2147483647
    INF_KEY: tl.constexpr = 0x7F800000  # _order_keys(+inf)
    lo, hi = tl.reduce((tl.where(valid, key, INT_MAX), tl.where(valid & (key < INF_KEY), key, -2147483647 - 1)),
                       0, _minmax_combine)
    hi = tl.maximum(hi, lo)  # no finite key: every valid key lands in the last bin
    lo64 = lo.to(tl.int64)
    span = hi.to(tl.int64) - lo64
    shift = 0
    while (span >> shift) > NBINS - 2:
        shift += 1
    key64 = key.to(tl.int64)
    bins = tl.where(key > hi, NBINS - 1, (key64 - lo64) >> shift).to(tl.int32)
    hist = tl.histogram(bins, NBINS, mask=valid)
    ge = n_valid - tl.cumsum(hist, 0) + hist  # count(bin >= j): non-increasing in j
    is_ge = ge >= k
    b_k, n_above, n_ge = tl.reduce((is_ge.to(tl.int32), tl.where(is_ge, 0, ge), tl.where(is_ge, ge, INT_MAX)),
                                   0, _hist_combine)
    b_k = b_k - 1  # the k-th largest key's bin
    room = k - n_above  # keys of bin b_k that are taken (>= 1)
    in_bin = valid & (bins == b_k)
    base = tl.where(b_k == NBINS - 1, hi.to(tl.int64) + 1, lo64 + (b_k.to(tl.int64) << shift))
    rel = tl.where(in_bin, key64 - base, -1)  # in [0, 2^nbits) inside the bin
    bit = tl.where(b_k == NBINS - 1, 32, shift - 1)
    t = tl.full([], 0, tl.int64)
    n_t = n_ge - n_above  # count(rel >= t) inside the bin
    while (bit >= 0) & (n_t != room):
        cand = t | (tl.full([], 1, tl.int64) << bit)
        n = tl.sum((rel >= cand).to(tl.int32), 0)
        t = tl.where(n >= room, cand, t)
        n_t = tl.where(n >= room, n, n_t)
        bit -= 1
    take = (valid & (bins > b_k)) | (rel > t)
    tie = rel == t
    if n_t != room:  # equal keys straddle the k-th place: the lower pages first
        tie = tie & (tl.cumsum(tie.to(tl.int32), 0) <= room - (n_t - tl.sum(tie.to(tl.int32), 0)))
    return take | tie


@triton.jit
def _hist_combine(s_a, mx_a, mn_a, s_b, mx_b, mn_b):
    return s_a + s_b, tl.maximum(mx_a, mx_b), tl.minimum(mn_a, mn_b)


@triton.jit
def _select_top_pages(scores_row, n_scores, k, table_row, slot_lo, slot_hi, BLOCK_SC: tl.constexpr,
                      NBINS: tl.constexpr = 0):
    """Write slots ``[slot_lo, slot_hi)`` of the head's top-``k`` page list (pages in ascending order) to
    ``table_row``: every program of the head finds the same ``k`` pages from the scores, and writes its part.
    ``NBINS`` > 0 selects by a histogram of that many bins (``_top_k_mask_hist``), 0 by bisection."""
    offs = tl.arange(0, BLOCK_SC)
    valid = offs < n_scores
    key = _order_keys(tl.load(scores_row + offs, mask=valid, other=float("-inf")), valid)
    if NBINS > 0:
        take = _top_k_mask_hist(key, k, n_scores, valid, NBINS) & valid
    else:
        take = _top_k_mask(key, k, n_scores) & valid
    slot = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(table_row + slot, offs, mask=take & (slot >= slot_lo) & (slot < slot_hi))


@triton.jit
def _merge_head_splits(o_part_rows, lse_part_rows, out_rows, n_splits, stride_ph, stride_ps, stride_lh, stride_oh,
                       GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_SPL: tl.constexpr, MERGE_CHUNK: tl.constexpr):
    """Out = sum_s w_s O_s / sum_s w_s, w_s = 2^(lse_s - max lse), for the ``GROUP`` query rows of one KV head,
    over its ``n_splits`` partials (loaded past L1: other programs wrote them)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    offs_s = tl.arange(0, BLOCK_SPL)
    lse = tl.load(lse_part_rows + offs_g[None, :] * stride_lh + offs_s[:, None],
                  mask=(offs_s[:, None] < n_splits) & mask_g[None, :], other=float("-inf"), cache_modifier=".cg")
    m = tl.max(lse, 0)  # [BLOCK_G]
    m = tl.where(m == float("-inf"), 0.0, m)  # no pages at all: every weight is 0, output 0
    total = tl.sum(tl.exp2(lse - m[None, :]), 0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    offs_c = tl.arange(0, MERGE_CHUNK)
    s0 = 0
    while s0 < n_splits:  # a ``while``: Triton's interpreter takes no runtime ``range`` bound
        sp = s0 + offs_c
        ms = sp < n_splits
        lse_c = tl.load(lse_part_rows + offs_g[None, :] * stride_lh + sp[:, None], mask=ms[:, None] & mask_g[None, :],
                        other=float("-inf"), cache_modifier=".cg")
        w = tl.exp2(lse_c - m[None, :])  # [CHUNK, BLOCK_G]
        parts = tl.load(o_part_rows + sp[:, None, None] * stride_ps + offs_g[None, :, None] * stride_ph
                        + offs_d[None, None, :], mask=ms[:, None, None] & mask_g[None, :, None] & mask_d[None, None, :],
                        other=0.0, cache_modifier=".cg")
        acc += tl.sum(w[:, :, None] * parts, 0)
        s0 += MERGE_CHUNK
    total = tl.where(total > 0, total, 1.0)
    tl.store(out_rows + offs_g[:, None] * stride_oh + offs_d[None, :], (acc / total[:, None]).to(out_rows.dtype.element_ty),
             mask=mask_g[:, None] & mask_d[None, :])


@triton.jit
def _sparse_decode_kernel(
    Q, K, V, TABLE, COUNTS, O_PART, LSE_PART, Out, SCORES, COUNTERS,
    n_scores, stride_sb, stride_sh,
    length, scale_log2e, n_kv_heads, n_table, pages_per_split, iters_per_split, n_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_tb, stride_th,
    stride_cb, stride_ch,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    n_first, length2, n_kv_heads2, pages_per_split2, iters_per_split2, n_splits2, k2_off, v2_off,
    stride_k2b, stride_k2h, stride_k2n, stride_v2b, stride_v2h, stride_v2n,
    LEN, len_add, LEN2, len2_add,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr,
    ALL_PAGES: tl.constexpr, HAS_COUNTS: tl.constexpr, SINGLE_SPLIT: tl.constexpr, INTERPRET: tl.constexpr,
    IEEE: tl.constexpr, SECOND: tl.constexpr,
    TOPK: tl.constexpr, BLOCK_SC: tl.constexpr, NBINS: tl.constexpr,
    FUSED_MERGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SPL: tl.constexpr, MERGE_CHUNK: tl.constexpr,
    DEV_LEN: tl.constexpr,
):
    BLOCK_N: tl.constexpr = PAGE * PAGES_PER_ITER
    if DEV_LEN:
        # Lengths that live on the device (``DeviceLength``, CUDA-graph decode): the host sized the launch for
        # ``length`` slots, the limit; the valid ones are ``min(LEN[0] + len_add, limit)``, read now.
        length = tl.minimum(tl.load(LEN).to(tl.int32) + len_add, length)
        if SECOND:
            length2 = tl.minimum(tl.load(LEN2).to(tl.int32) + len2_add, length2)
    # A 1-D grid, split fastest: program ``pid`` is split ``pid % n_splits`` of (sequence, KV head)
    # ``pid // n_splits``, so the programs of one head are consecutive and the hardware hands them out evenly.
    pid = tl.program_id(0)
    if SECOND:
        # Programs past the first group's ``n_first`` serve the second group: its own cache (addressed as an
        # element offset from K/V, so one kernel argument list serves both), length, heads and splits. The
        # first group's programs come first, so the long ones start first.
        is2 = pid >= n_first
        local = tl.where(is2, pid - n_first, pid)
        n_bh1 = n_first // n_splits
        n_splits = tl.where(is2, n_splits2, n_splits)
        split = local % n_splits
        bh = local // n_splits
        n_kv = tl.where(is2, n_kv_heads2, n_kv_heads)
        b = bh // n_kv
        h = bh % n_kv
        pid_bh = tl.where(is2, n_bh1 + bh, bh)  # index of this (sequence, KV head) over both
        length = tl.where(is2, length2, length)
        pages_per_split = tl.where(is2, pages_per_split2, pages_per_split)
        iters_per_split = tl.where(is2, iters_per_split2, iters_per_split)
        k_off = tl.where(is2, k2_off + b * stride_k2b + h * stride_k2h, b * stride_kb + h * stride_kh)
        v_off = tl.where(is2, v2_off + b * stride_v2b + h * stride_v2h, b * stride_vb + h * stride_vh)
        stride_kn = tl.where(is2, stride_k2n, stride_kn)
        stride_vn = tl.where(is2, stride_v2n, stride_vn)
        q_row0 = tl.where(is2, (n_kv_heads + h) * GROUP, h * GROUP)
    else:
        split = pid % n_splits
        pid_bh = pid // n_splits
        b = pid_bh // n_kv_heads
        h = pid_bh % n_kv_heads
        k_off = b * stride_kb + h * stride_kh
        v_off = b * stride_vb + h * stride_vh
        q_row0 = h * GROUP

    if ALL_PAGES:
        n_pages = (length + PAGE - 1) // PAGE
    elif HAS_COUNTS:
        n_pages = tl.minimum(tl.load(COUNTS + b * stride_cb + h * stride_ch), n_table)
    else:
        n_pages = n_table
    page_lo = split * pages_per_split
    page_hi = tl.minimum(page_lo + pages_per_split, n_pages)
    if TOPK:
        # The table is ours to fill: the head's top ``n_table`` pages by score, this program's slots of it.
        _select_top_pages(SCORES + b * stride_sb + h * stride_sh, n_scores, n_table,
                          TABLE + b * stride_tb + h * stride_th, page_lo, page_hi, BLOCK_SC, NBINS)
        tl.debug_barrier()  # the slots this program wrote, visible to all its threads

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q_rows = q_row0 + offs_h
    q = tl.load(Q + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    k_base = K + k_off
    v_base = V + v_off
    # A finite floor for the running max: an iteration (or a whole split) with no valid token then leaves
    # the state unchanged (exp2(-inf - floor) = 0, alpha = 1) instead of producing -inf - -inf = NaN.
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)

    # A fixed trip count from the host (the loop pipelines, and heads with fewer pages just mask the tail).
    # Triton's interpreter (with numpy >= 2.4) cannot take a runtime ``range`` bound, so under
    # TRITON_INTERPRET=1 the same block step runs in a ``while`` loop.
    if INTERPRET:
        it = 0
        while it < iters_per_split:
            m_i, l_i, acc = _attend_block(
                q, k_base, v_base, TABLE + b * stride_tb + h * stride_th, page_lo + it * PAGES_PER_ITER,
                page_hi, length, scale_log2e, stride_kn, stride_vn, m_i, l_i, acc, offs_n, offs_d, mask_d,
                PAGE, ALL_PAGES, INTERPRET, IEEE)
            it += 1
    else:
        for it in range(0, iters_per_split):
            m_i, l_i, acc = _attend_block(
                q, k_base, v_base, TABLE + b * stride_tb + h * stride_th, page_lo + it * PAGES_PER_ITER,
                page_hi, length, scale_log2e, stride_kn, stride_vn, m_i, l_i, acc, offs_n, offs_d, mask_d,
                PAGE, ALL_PAGES, INTERPRET, IEEE)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        tl.store(Out + b * stride_ob + q_rows[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask_h[:, None] & mask_d[None, :])
    else:
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(O_PART + b * stride_pb + q_rows[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 out, mask=mask_h[:, None] & mask_d[None, :])
        tl.store(LSE_PART + b * stride_lb + q_rows * stride_lh + split, lse, mask=mask_h)
        if FUSED_MERGE:
            # The last program of this (sequence, KV head) to finish merges all its splits: the counter's
            # acq_rel add publishes this program's partial (after the barrier: all its threads' stores) and,
            # for the last one, makes every other program's visible. The last one resets the counter.
            tl.debug_barrier()
            arrived = tl.atomic_add(COUNTERS + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == n_splits - 1:
                _merge_head_splits(O_PART + b * stride_pb + q_row0 * stride_ph, LSE_PART + b * stride_lb + q_row0 * stride_lh,
                                   Out + b * stride_ob + q_row0 * stride_oh, n_splits, stride_ph, stride_ps, stride_lh,
                                   stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SPL, MERGE_CHUNK)
                tl.atomic_xchg(COUNTERS + pid_bh, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_splits_kernel(
    O_PART, LSE_PART, Out, n_q_heads, n_splits, n_q_first, n_splits2,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_DM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Out[b, hq, cols] = sum_s w_s O_PART[b, hq, s, cols] / sum_s w_s, w_s = 2^(lse_s - max lse); one program
    per (sequence, query head, ``BLOCK_DM`` columns), so all splits of its columns fit in registers. Query heads
    from ``n_q_first`` on (a second group) have ``n_splits2`` splits."""
    pid = tl.program_id(0)
    b = pid // n_q_heads
    hq = pid % n_q_heads
    n_splits = tl.where(hq < n_q_first, n_splits, n_splits2)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.program_id(1) * BLOCK_DM + tl.arange(0, BLOCK_DM)
    mask_s = offs_s < n_splits
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(LSE_PART + b * stride_lb + hq * stride_lh + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # no pages at all: every weight is 0, output 0
    w = tl.exp2(lse - m)  # [BLOCK_S]
    total = tl.sum(w, 0)
    parts = tl.load(O_PART + b * stride_pb + hq * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    acc = tl.sum(w[:, None] * parts, 0)
    total = tl.where(total > 0, total, 1.0)
    tl.store(Out + b * stride_ob + hq * stride_oh + offs_d, (acc / total).to(Out.dtype.element_ty), mask=mask_d)


@triton.jit
def _quest_scores_kernel(
    Q, BOUNDS, SCORES, SCALES, n_kv_heads, n_pages,
    stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bp, stride_bm,
    stride_sb, stride_sh,
    stride_cb, stride_ch, stride_cp,
    LEN, len_add,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_P: tl.constexpr, KEEP_ENDS: tl.constexpr, SCALED: tl.constexpr, DEV_LEN: tl.constexpr,
    PAGE: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // n_kv_heads
    h = pid_bh % n_kv_heads
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_d = offs_d < HEAD_DIM
    n_out = n_pages  # columns written
    if DEV_LEN:  # the valid pages from a token count on the device; the columns past them score -inf
        n_pages = tl.minimum((tl.load(LEN).to(tl.int32) + len_add + PAGE - 1) // PAGE, n_pages)
    mask_p = offs_p < n_pages
    q = tl.load(Q + b * stride_qb + (h * GROUP + offs_h)[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h < GROUP)[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    q_pos = tl.sum(tl.maximum(q, 0.0), 0)  # [BLOCK_D]: sum over the group's query heads of relu(q)
    q_neg = tl.sum(tl.minimum(q, 0.0), 0)
    base = BOUNDS + b * stride_bb + h * stride_bh + offs_p[:, None] * stride_bp + offs_d[None, :]
    m2 = mask_p[:, None] & mask_d[None, :]
    k_min = tl.load(base, mask=m2, other=0.0).to(tl.float32)
    k_max = tl.load(base + stride_bm, mask=m2, other=0.0).to(tl.float32)
    if SCALED:  # 8-bit bounds (``quantize_bounds``): one scale per page row, applied to the row's dot product
        sc = SCALES + b * stride_cb + h * stride_ch + offs_p * stride_cp
        score = (tl.sum(k_max * q_pos[None, :], 1) * tl.load(sc + 1, mask=mask_p, other=0.0)
                 + tl.sum(k_min * q_neg[None, :], 1) * tl.load(sc, mask=mask_p, other=0.0))
    else:
        score = tl.sum(k_max * q_pos[None, :] + k_min * q_neg[None, :], 1)
    if KEEP_ENDS:
        score = tl.where((offs_p == 0) | (offs_p == n_pages - 1), float("inf"), score)
    if DEV_LEN:
        score = tl.where(mask_p, score, float("-inf"))
    tl.store(SCORES + b * stride_sb + h * stride_sh + offs_p, score, mask=offs_p < n_out)


@triton.jit
def _topk_kernel(
    SCORES, OUT, n_kv_heads, n, k,
    stride_sb, stride_sh, stride_ob, stride_oh,
    BLOCK: tl.constexpr, NBINS: tl.constexpr,
):
    """Indices of the ``k`` largest of ``n`` fp32 scores of one (sequence, KV head), in ascending order.

    The whole row sits in registers as int32 keys with the float order; ``_top_k_mask`` finds the k-th
    largest key T bit by bit; the output is every key > T plus the first (by index) keys == T up to ``k``.
    """
    pid = tl.program_id(0)
    b = pid // n_kv_heads
    h = pid % n_kv_heads
    _select_top_pages(SCORES + b * stride_sb + h * stride_sh, n, k, OUT + b * stride_ob + h * stride_oh, 0, k,
                      BLOCK, NBINS)


# ----------------------------------------------------------------------------------------------- launchers
@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_splits(work_items: int, max_pages: int, pages_per_iter: int, device: torch.device,
                programs_per_sm: int = 2) -> int:
    """Enough programs to fill the GPU ``programs_per_sm`` times over, never more splits than page iterations."""
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else 4
    iters = max(1, math.ceil(max_pages / pages_per_iter))
    return max(1, min(iters, math.ceil(programs_per_sm * sms / max(1, work_items)), _MAX_SPLITS))


_COUNTERS: dict[tuple[str, int, int], torch.Tensor] = {}


def _counters(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for the fused merge, one buffer per (device, stream): kernels on one
    stream run in order and each leaves its counters at 0, so the buffer is reused without clearing (a
    separate buffer per stream keeps concurrent streams apart). Allocated outside CUDA-graph capture when
    the capturing stream ran the kernel once before (warm-up), else its zeroing is captured with it."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index if device.index is not None else -1, stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 256), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _launch_sparse_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int | DeviceLength,
    page_table: torch.Tensor | None, counts: torch.Tensor | None, page_size: int, scale: float,
    num_splits: int | None, out: torch.Tensor | None = None, tokens_per_iter: int = _TOKENS_PER_ITER,
    num_warps: int = 4, num_stages: int = 2, programs_per_sm: int = 2,
    second: tuple[torch.Tensor, torch.Tensor, int | DeviceLength] | None = None,
    scores: torch.Tensor | None = None, fused_merge: int = 0, select_bins: int = 0,
) -> torch.Tensor:
    """Launch ``_sparse_decode_kernel`` (and ``_merge_splits_kernel`` unless ``fused_merge``). With ``scores``,
    ``page_table`` is the output table ``[B, Hkv, k]`` the kernel fills with each head's top ``k`` pages."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    Hkv2 = 0 if second is None else second[0].shape[1]
    length, len_t, len_add = _length_args(length)
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, "k, v must be [B, Hkv, S_cap, D] like q"
    assert Hq % (Hkv + Hkv2) == 0 and Hq // (Hkv + Hkv2) <= 64, "query heads must be a multiple (<= 64) of KV heads"
    assert k.stride(3) == 1 and v.stride(3) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    assert page_size >= 1 and page_size & (page_size - 1) == 0 and page_size <= 128, "page_size: power of 2 <= 128"
    assert D <= 256, "head_dim up to 256"
    assert 0 < length <= k.shape[2], f"length {length} outside the cache's {k.shape[2]} slots"
    group = Hq // (Hkv + Hkv2)
    all_pages = page_table is None
    if all_pages:
        max_pages = math.ceil(length / page_size)
        table = q  # unused pointer
    else:
        assert page_table.shape[:2] == (B, Hkv), "page_table must be [B, Hkv, max_pages]"
        assert page_table.dtype in (torch.int32, torch.int64)
        max_pages = page_table.shape[2]
        table = page_table
    n_scores = 0
    if scores is not None:
        assert counts is None and page_table.dtype == torch.int32 and page_table.stride(2) == 1
        assert scores.shape[:2] == (B, Hkv) and scores.dtype == torch.float32 and scores.stride(2) == 1
        n_scores = scores.shape[2]
        assert 1 <= max_pages <= n_scores <= _TOPK_MAX_BLOCK, "1 <= budget pages <= scored pages <= 32768"
    if counts is not None:
        assert counts.shape == (B, Hkv)
    pages_per_iter = max(1, tokens_per_iter // page_size)
    splits = min(num_splits or _num_splits(B * Hkv, max_pages, pages_per_iter, q.device, programs_per_sm), _MAX_SPLITS)
    pages_per_split = math.ceil(max(1, max_pages) / splits)
    pages_per_split = math.ceil(pages_per_split / pages_per_iter) * pages_per_iter
    splits = max(1, math.ceil(max(1, max_pages) / pages_per_split))
    iters_per_split = pages_per_split // pages_per_iter
    # The second group (every page of its own cache): its own split size, on the same grid.
    k2, v2, length2 = second if second is not None else (k, v, 0)
    length2, len2_t, len2_add = _length_args(length2)
    assert second is None or (len_t is None) == (len2_t is None), "both groups' lengths on the device, or neither"
    if len_t is not None:
        assert len_t.device == q.device, "a DeviceLength's count must be on q's device"
    pps2 = iters2 = k2_off = v2_off = splits2 = 0
    if second is not None:
        assert all_pages and k2.dtype == k.dtype and v2.dtype == v.dtype and k2.shape[0] == B and k2.shape[3] == D
        assert k2.stride(3) == 1 and v2.stride(3) == 1 and 0 < length2 <= k2.shape[2]
        pages2 = math.ceil(length2 / page_size)
        splits2 = _num_splits(B * Hkv2, pages2, pages_per_iter, q.device, programs_per_sm)
        pps2 = math.ceil(math.ceil(pages2 / splits2) / pages_per_iter) * pages_per_iter
        splits2 = math.ceil(pages2 / pps2)
        iters2 = pps2 // pages_per_iter
        k2_off = (k2.data_ptr() - k.data_ptr()) // k.element_size()
        v2_off = (v2.data_ptr() - v.data_ptr()) // v.element_size()
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    max_splits = max(splits, splits2)
    if max_splits > 1:
        o_part = torch.empty(B, Hq, max_splits, D, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B, Hq, max_splits, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    cnt = counts if counts is not None else q
    sc = scores if scores is not None else q
    block_d = triton.next_power_of_2(D)
    fused = bool(fused_merge) and max_splits > 1
    block_g = triton.next_power_of_2(group)
    counters = _counters(q.device, B * (Hkv + Hkv2)) if fused else q
    n_first = B * Hkv * splits
    _sparse_decode_kernel[(n_first + B * Hkv2 * splits2,)](
        q, k, v, table, cnt, o_part, lse_part, out, sc, counters,
        n_scores, sc.stride(0), sc.stride(1),
        length, scale * _LOG2E, Hkv, max_pages, pages_per_split, iters_per_split, splits,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        table.stride(0), table.stride(1),
        cnt.stride(0), cnt.stride(1),
        o_part.stride(0), o_part.stride(1), o_part.stride(2) if max_splits > 1 else 0,
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        n_first, length2, max(1, Hkv2), pps2, iters2, max(1, splits2), k2_off, v2_off,
        k2.stride(0), k2.stride(1), k2.stride(2), v2.stride(0), v2.stride(1), v2.stride(2),
        len_t if len_t is not None else q, len_add, len2_t if len2_t is not None else q, len2_add,
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=D, BLOCK_D=block_d,
        PAGE=page_size, PAGES_PER_ITER=pages_per_iter,
        ALL_PAGES=all_pages, HAS_COUNTS=counts is not None, SINGLE_SPLIT=max_splits == 1, INTERPRET=_INTERPRET,
        IEEE=k.dtype == torch.float32, SECOND=second is not None,
        TOPK=scores is not None, BLOCK_SC=triton.next_power_of_2(max(1, n_scores)), NBINS=int(select_bins),
        FUSED_MERGE=fused, BLOCK_G=block_g, BLOCK_SPL=triton.next_power_of_2(max_splits),
        MERGE_CHUNK=max(1, min(triton.next_power_of_2(max_splits), 8192 // (block_g * block_d))),
        DEV_LEN=len_t is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if max_splits > 1 and not fused:
        block_dm = min(block_d, max(16, 8192 // triton.next_power_of_2(max_splits)))
        _merge_splits_kernel[(B * Hq, triton.cdiv(D, block_dm))](
            o_part, lse_part, out, Hq, splits, Hkv * group, max(1, splits2),
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1),
            HEAD_DIM=D, BLOCK_DM=block_dm, BLOCK_S=triton.next_power_of_2(max_splits),
            num_warps=4,
        )
    return out


def _launch_quest_scores(q: torch.Tensor, bounds: torch.Tensor, n_pages: int | DeviceLength, keep_ends: bool,
                         block_p: int = 64, num_warps: int = 4, scales: torch.Tensor | None = None,
                         page_size: int = 0) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = bounds.shape[1]
    len_t, len_add = None, 0
    if isinstance(n_pages, DeviceLength):  # tokens on the device -> pages, the launch sized for the limit's pages
        assert page_size >= 1, "a DeviceLength counts tokens: give page_size"
        tokens, len_t, len_add = _length_args(n_pages)
        n_pages = -(-tokens // page_size)
    assert bounds.shape[0] == B and bounds.shape[3:] == (2, D) and bounds.shape[2] >= n_pages >= 1
    assert bounds.stride(4) == 1 and q.stride(2) == 1 and Hq % Hkv == 0
    if scales is not None:
        assert scales.shape[:2] == (B, Hkv) and scales.shape[2] >= n_pages and scales.shape[3:] == (2,)
        assert scales.dtype == torch.float32 and scales.stride(3) == 1
    group = Hq // Hkv
    scores = torch.empty(B, Hkv, n_pages, device=q.device, dtype=torch.float32)
    sc = scales if scales is not None else scores  # unused pointer without scales
    _quest_scores_kernel[(B * Hkv, triton.cdiv(n_pages, block_p))](
        q, bounds, scores, sc, Hkv, n_pages,
        q.stride(0), q.stride(1),
        bounds.stride(0), bounds.stride(1), bounds.stride(2), bounds.stride(3),
        scores.stride(0), scores.stride(1),
        sc.stride(0), sc.stride(1), sc.stride(2) if scales is not None else 0,
        len_t if len_t is not None else q, len_add,
        GROUP=group, BLOCK_H=triton.next_power_of_2(group), HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D),
        BLOCK_P=block_p, KEEP_ENDS=keep_ends, SCALED=scales is not None, num_warps=num_warps,
        DEV_LEN=len_t is not None, PAGE=max(1, page_size),
    )
    return scores


# ----------------------------------------------------------------------------------------------- public API
def sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int | DeviceLength,
    page_table: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    page_size: int = 16,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    second: tuple[torch.Tensor, torch.Tensor, int | DeviceLength] | None = None,
    **tuning: int,
) -> torch.Tensor:
    """Attention of one new token over the listed pages of a contiguous per-head cache.

    q: [B, Hq, D] (GQA order); k, v: [B, Hkv, S_cap, D], slots ``< length`` valid (an int, or a ``DeviceLength``
    read by the kernel at run time, so a CUDA graph can replay the call as the cache grows); page_table: int32/int64
    [B, Hkv, max_pages] (None: every page), -1 or entries past ``counts: [B, Hkv]`` ignored. Returns [B, Hq, D].
    ``second=(k2, v2, length2)`` adds a second group of KV heads in the same launch, attended over all its
    ``length2`` slots (e.g. the streaming heads' ring buffers next to the full heads' cache): q then holds the
    first group's query heads followed by the second's, same group size; the first group must be all pages.
    ``out`` (a [B, Hq, D] view, e.g. a slice of a layer's output) receives the result in place. ``num_splits``
    (default: ``programs_per_sm`` programs per SM) and ``tuning`` (``tokens_per_iter``, ``num_warps``,
    ``num_stages``, ``programs_per_sm``, ``fused_merge``: 1 = the last program of each KV head merges the
    splits, 0 = a second merge kernel) only change speed.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    length = length if isinstance(length, DeviceLength) else int(length)
    return _launch_sparse_decode(q, k, v, length, page_table, counts, page_size, scale, num_splits, out,
                                 second=second, **tuning)


def sparse_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    page_table: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    page_size: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``sparse_decode``: a boolean mask of the listed pages' slots, then masked softmax.

    Products in the inputs' dtype, softmax in fp32, probabilities rounded to the dtype before ``@ V`` (as
    flash-attention's ``attention_ref``); pass fp32 tensors for an fp32 reference. Shapes as ``sparse_decode``.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    keys, values = k[:, :, :length], v[:, :, :length]
    slot_page = torch.arange(length, device=q.device) // page_size  # page of every slot
    if page_table is None:
        visible = torch.ones(B, Hkv, length, dtype=torch.bool, device=q.device)
    else:
        n_pages = math.ceil(length / page_size)
        listed = page_table.long()
        keep = listed >= 0
        if counts is not None:
            keep &= torch.arange(listed.shape[2], device=q.device) < counts[..., None].long()
        chosen = torch.zeros(B, Hkv, n_pages + 1, dtype=torch.bool, device=q.device)
        chosen.scatter_(2, torch.where(keep, listed, n_pages), True)  # dropped entries land in a spare column
        visible = chosen[:, :, slot_page]
    group = Hq // Hkv
    kx = keys.repeat_interleave(group, dim=1)
    vx = values.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q, kx).float() * scale
    logits = logits.masked_fill(~visible.repeat_interleave(group, dim=1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a head with no page: all -inf -> zero output
    return torch.einsum("bhs,bhsd->bhd", probs.to(v.dtype), vx)


def topk_sparse_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int | DeviceLength,
    scores: torch.Tensor,
    budget_pages: int,
    page_size: int = 16,
    scale: float | None = None,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    table_out: torch.Tensor | None = None,
    **tuning: int,
) -> torch.Tensor:
    """``sparse_decode`` over the top ``budget_pages`` pages of ``scores`` per KV head, chosen inside the kernel.

    scores: fp32 [B, Hkv, P] (``quest_page_scores``; its +inf ends are always kept), ``P <= 32768``. Each program
    of a head finds the head's k-th largest score itself (``k = min(budget_pages, P)``, ties to the lower page
    index, so exactly ``k`` pages: the set ``select_pages(..., use_kernel=True)`` returns) and attends its share
    of them, and the last program of the head merges the splits: one launch instead of top-k, attention and
    merge. ``table_out`` (int32 [B, Hkv, k]) receives the chosen pages in ascending order. Other arguments and
    ``tuning`` as ``sparse_decode`` (``programs_per_sm`` defaults to 1 here), plus ``select_bins`` (0: bisection,
    else the histogram selection with that many bins; the same pages either way).
    """
    B, Hkv, P = scores.shape
    n_keep = max(1, min(int(budget_pages), P))
    if table_out is None:
        table_out = torch.empty(B, Hkv, n_keep, device=q.device, dtype=torch.int32)
    assert table_out.shape == (B, Hkv, n_keep), f"table_out must be [B, Hkv, {n_keep}]"
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tuning.setdefault("programs_per_sm", 1)  # every program repeats the selection: few, longer programs
    tuning.setdefault("num_warps", 8)  # the selection's reductions go faster over more warps
    length = length if isinstance(length, DeviceLength) else int(length)
    return _launch_sparse_decode(q, k, v, length, table_out, None, page_size, scale, num_splits, out,
                                 scores=scores, **tuning)


def top_pages_reference(scores: torch.Tensor, budget_pages: int) -> torch.Tensor:
    """Plain PyTorch selection of ``topk_sparse_decode`` / ``select_pages(use_kernel=True)``: the top
    ``min(budget_pages, P)`` pages per row, ties to the lower index, in ascending page order (int64)."""
    n_keep = max(1, min(int(budget_pages), scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :n_keep].sort(dim=-1).values


def quest_page_scores(
    q: torch.Tensor, bounds: torch.Tensor, n_pages: int | DeviceLength, keep_ends: bool = True, block_p: int = 64,
    num_warps: int = 4, scales: torch.Tensor | None = None, page_size: int = 0,
) -> torch.Tensor:
    """Quest upper bounds per page, summed over each KV head's query heads (Triton).

    q: [B, Hq, D]; bounds: [B, Hkv, page_cap, 2, D] (``[..., 0, :]`` channel-wise min key of the page,
    ``[..., 1, :]`` max), first ``n_pages`` valid. Returns fp32 [B, Hkv, n_pages]; with ``keep_ends`` the first
    and last page score +inf so any top-k keeps them. ``scales`` (fp32 [B, Hkv, page_cap, 2]): the bounds are
    8-bit codes (``headwise.policies.stores.quantize_bounds``) and row ``r`` of page ``p`` stands for
    ``bounds[..., p, r, :] * scales[..., p, r]``. ``block_p`` (pages per program) and ``num_warps`` only change
    speed. ``n_pages`` may be a ``DeviceLength`` of *tokens* (with ``page_size``): the kernel derives the valid
    pages when it runs (a CUDA graph replays the call as the cache grows), and the output has one column per page
    of the limit, those past the valid pages -inf.
    """
    return _launch_quest_scores(q, bounds, n_pages, keep_ends, block_p, num_warps, scales, page_size)


def quest_page_scores_reference(
    q: torch.Tensor, bounds: torch.Tensor, n_pages: int, keep_ends: bool = True, scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``quest_page_scores``: ``sum_r sum_d max(q_rd * min_d, q_rd * max_d)`` in fp32."""
    B, Hq, D = q.shape
    Hkv = bounds.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, 1, D)
    bounds = bounds[:, :, :n_pages].float()
    if scales is not None:
        bounds = bounds * scales[:, :, :n_pages, :, None]
    k_min = bounds[:, :, :, 0].unsqueeze(2)  # [B, Hkv, 1, P, D]
    k_max = bounds[:, :, :, 1].unsqueeze(2)
    scores = torch.maximum(qg * k_min, qg * k_max).sum(dim=(2, 4))
    if keep_ends:
        scores[:, :, 0] = float("inf")
        scores[:, :, n_pages - 1] = float("inf")
    return scores


_TOPK_MAX_BLOCK = 32768  # scores per row the Triton top-k holds in registers (512K tokens at page 16)


def select_pages(scores: torch.Tensor, budget_pages: int, use_kernel: bool = False, bins: int = 0,
                 num_warps: int | None = None) -> torch.Tensor:
    """Top ``budget_pages`` pages per (sequence, KV head): scores [B, Hkv, P] -> table [B, Hkv, k], any order.

    ``k = min(budget_pages, P)``. Score the first and newest page +inf (``keep_ends``) to always keep them.
    ``use_kernel``: one Triton program per row (bisection on the scores' bits) returning int32, in ascending
    order; the same set as ``torch.topk`` up to ties (ties to the lower index). ``bins`` > 0: the same set by a
    histogram of that many bins (``_top_k_mask_hist``); ``num_warps`` overrides the row-size default. On an H100, 8 x 8192 pages: about 21 us against ``torch.topk``'s 43 us,
    which was more than our attention over the chosen pages. Rows longer than 32768 pages use ``torch.topk``.
    """
    B, H, P = scores.shape
    k = max(1, min(budget_pages, P))
    if not use_kernel or P > _TOPK_MAX_BLOCK:
        return torch.topk(scores, k, dim=-1, sorted=False).indices
    assert scores.dtype == torch.float32 and scores.stride(2) == 1
    out = torch.empty(B, H, k, device=scores.device, dtype=torch.int32)
    block = triton.next_power_of_2(P)
    _topk_kernel[(B * H,)](
        scores, out, H, P, k,
        scores.stride(0), scores.stride(1), out.stride(0), out.stride(1),
        BLOCK=block, NBINS=int(bins),
        num_warps=num_warps or (4 if block <= 1024 else (8 if block <= 8192 else 16)),
    )
    return out


__all__ = [
    "DeviceLength",
    "quest_page_scores",
    "quest_page_scores_reference",
    "select_pages",
    "sparse_decode",
    "sparse_decode_reference",
    "top_pages_reference",
    "topk_sparse_decode",
]
