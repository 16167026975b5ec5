"""Quest page scoring and top-k page selection, in Triton.

Algorithm
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
    slower with 1024 or more bins). ``_select_top_pages`` is also called inside the paged decode kernel
    (``kernels/paged_decode.py``, ``topk_sparse_decode``).

Limits
    The Triton top-k holds a row of up to 32768 page scores in registers (longer rows fall back to
    ``torch.topk``).

Tested
    tests/test_kernels_decode.py: scores against ``decode_reference.quest_page_scores_reference`` (also from
    8-bit bounds), top-k with ties and -0.0, the histogram selection on crowded bins, ties, +inf runs and
    -inf/huge ranges, against ``top_pages_reference``, under TRITON_INTERPRET=1; the same file passes on an
    H100 with real kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.common import MAX_SELECT_PAGES, DeviceLength, length_args


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


def _launch_quest_scores(q: torch.Tensor, bounds: torch.Tensor, n_pages: int | DeviceLength, keep_ends: bool,
                         block_p: int = 64, num_warps: int = 4, scales: torch.Tensor | None = None,
                         page_size: int = 0) -> torch.Tensor:
    B, Hq, D = q.shape
    Hkv = bounds.shape[1]
    len_t, len_add = None, 0
    if isinstance(n_pages, DeviceLength):  # tokens on the device -> pages, the launch sized for the limit's pages
        assert page_size >= 1, "a DeviceLength counts tokens: give page_size"
        tokens, len_t, len_add = length_args(n_pages)
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
    if not use_kernel or P > MAX_SELECT_PAGES:
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


__all__ = ["quest_page_scores", "select_pages"]
