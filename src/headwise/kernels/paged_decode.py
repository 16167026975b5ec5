"""Paged decode attention (flash-decoding over listed pages) and the merge of its splits, in Triton.

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

    ``topk_sparse_decode`` selects Quest's pages inside this kernel (``kernels/quest.py``'s selection):
    every program of a head finds the same k pages from the scores and attends its share of them, so Quest
    decode is score -> attend (-> merge) instead of score -> top-k -> attend -> merge.

    Plain-PyTorch references: ``kernels/decode_reference.py``.

Limits
    ``page_size`` is a power of two in [1, 128]; ``head_dim`` is any size up to 256 (padded to a power of
    two inside the kernel); the group of query heads per KV head is at most 64. A (sequence, head) with
    zero pages gets a zero output. K/V may be fp32, fp16 or bf16 (q the same dtype); accumulation is fp32
    (fp32 caches multiply in full fp32, not TF32). ``second=`` needs both groups "all pages".
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

import torch
import triton
import triton.language as tl

from headwise.kernels.common import INTERPRET, MAX_SELECT_PAGES, DeviceLength, length_args
from headwise.kernels.quest import _select_top_pages

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 512  # the merge kernel holds all splits of a column block in registers
# The merge's block of splits (a constexpr) is at least this many: every split count up to it shares one compiled
# kernel. One per power of two loaded 2-, 4-, 8- and 16-split kernels in the middle of serving run 21's mix (H100), 100-1,100
# ms each, as the batch's rows and lengths moved the split count; a masked lane reads no memory.
_MERGE_MIN_BLOCK_S = 64
_TOKENS_PER_ITER = 64  # K/V rows per inner iteration: enough for a tensor-core tile, small enough for registers


# ----------------------------------------------------------------------------------------------- kernels
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
def load_query_group(Q, b, q_row0, stride_qb, stride_qh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """The start of a flash-decoding program over the ``GROUP`` query rows ``q_row0 ..`` of sequence ``b`` that share
    one KV head: those rows of ``Q`` (zeros past ``GROUP`` / ``HEAD_DIM``), their row indices and masks, and the
    online-softmax state. The running max starts at a finite floor, so a block (or a whole split, or a row of length
    0) with no valid key leaves the state unchanged (exp2(-inf - floor) = 0, alpha = 1) instead of computing
    -inf - -inf = NaN. Shared by every decode kernel, as ``store_split`` ends them.

    Returns ``q [BLOCK_H, BLOCK_D]``, ``q_rows``, ``offs_d``, ``mask_h``, ``mask_d``, ``m_i``, ``l_i``, ``acc``."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q_rows = q_row0 + offs_h
    q = tl.load(Q + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    return q, q_rows, offs_d, mask_h, mask_d, m_i, l_i, acc


@triton.jit
def store_split(acc, m_i, l_i, Out, O_PART, LSE_PART, b, q_rows, split, offs_d, mask_h, mask_d,
                stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
                SINGLE_SPLIT: tl.constexpr):
    """The end of one split of a flash-decoding program over query rows ``q_rows``: with one split, the normalised
    output into ``Out``; else the normalised partial into ``O_PART`` and its log2-domain log-sum-exp into
    ``LSE_PART`` (-inf where the split saw no key), for ``merge_splits``. Shared by every decode kernel."""
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

    q, q_rows, offs_d, mask_h, mask_d, m_i, l_i, acc = load_query_group(Q, b, q_row0, stride_qb, stride_qh, GROUP,
                                                                         HEAD_DIM, BLOCK_H, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + k_off
    v_base = V + v_off

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

    store_split(acc, m_i, l_i, Out, O_PART, LSE_PART, b, q_rows, split, offs_d, mask_h, mask_d,
                stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SINGLE_SPLIT)
    if not SINGLE_SPLIT and FUSED_MERGE:
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


@triton.jit(do_not_specialize=["n_splits", "n_splits2", "stride_lb", "stride_lh"])  # as batch_decode's per-step ints
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
    length, len_t, len_add = length_args(length)
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
        assert 1 <= max_pages <= n_scores <= MAX_SELECT_PAGES, "1 <= budget pages <= scored pages <= 32768"
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
    length2, len2_t, len2_add = length_args(length2)
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
        ALL_PAGES=all_pages, HAS_COUNTS=counts is not None, SINGLE_SPLIT=max_splits == 1, INTERPRET=INTERPRET,
        IEEE=k.dtype == torch.float32, SECOND=second is not None,
        TOPK=scores is not None, BLOCK_SC=triton.next_power_of_2(max(1, n_scores)), NBINS=int(select_bins),
        FUSED_MERGE=fused, BLOCK_G=block_g, BLOCK_SPL=triton.next_power_of_2(max_splits),
        MERGE_CHUNK=max(1, min(triton.next_power_of_2(max_splits), 8192 // (block_g * block_d))),
        DEV_LEN=len_t is not None, num_warps=num_warps, num_stages=num_stages,
    )
    if max_splits > 1 and not fused:
        merge_splits(o_part, lse_part, out, splits, Hkv * group, max(1, splits2))
    return out


def merge_splits(o_part: torch.Tensor, lse_part: torch.Tensor, out: torch.Tensor, n_splits: int,
                 n_q_first: int | None = None, n_splits2: int | None = None) -> None:
    """Split-K merge: ``out[b, hq] = sum_s w_s o_part[b, hq, s] / sum_s w_s`` with ``w_s = 2^(lse_s - max lse)``
    (log2-domain log-sum-exps). o_part: [B, Hq, >= splits, D] fp32; lse_part: [B, Hq, >= splits] fp32; out:
    [B, Hq, D]. Query heads from ``n_q_first`` on have ``n_splits2`` splits (a second head group); a head with no
    keys at all gets 0. Every decode kernel that splits its keys merges through this."""
    B, Hq, D = out.shape
    n_q_first = Hq if n_q_first is None else n_q_first
    n_splits2 = n_splits if n_splits2 is None else n_splits2
    most = max(n_splits, n_splits2)
    assert most <= _MAX_SPLITS, f"at most {_MAX_SPLITS} splits"
    block_s = max(_MERGE_MIN_BLOCK_S, triton.next_power_of_2(most))
    block_dm = min(triton.next_power_of_2(D), max(16, 8192 // block_s))
    _merge_splits_kernel[(B * Hq, triton.cdiv(D, block_dm))](
        o_part, lse_part, out, Hq, n_splits, n_q_first, n_splits2,
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=D, BLOCK_DM=block_dm, BLOCK_S=block_s,
        num_warps=4,
    )


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


__all__ = ["sparse_decode", "topk_sparse_decode"]
