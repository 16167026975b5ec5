"""Quest decode in one launch, as a pipeline of roles: page scoring, per-head selection, attention, merge.

Why
    A Quest step (Tang et al., 2024, https://arxiv.org/abs/2406.10774) is score -> top-k -> attend -> merge. At
    128K tokens and a 4K budget both memory phases are small (page bounds and chosen K/V are ~17 MB each at pages
    of 32, Llama-3-8B shapes), so at batch 1 the step's time is fixed costs: kernel boundaries (~1.5-2 us each on
    an H100 inside a CUDA graph), and a selection that only one program per head can do. Here the four phases are
    roles of the programs of one launch, handing work on through per-head flags in global memory, so that no
    phase waits for a whole kernel to end and the selection of one head overlaps other heads' scoring and
    attention.

Algorithm
    Programs take a *ticket* (an atomic counter: start order, so a program only ever waits for programs that
    have already started, and no wait can deadlock whatever the GPU runs at once) and play the role of their
    ticket range:

    1. Scorers (``n_sc`` of them, tickets first). Scorer ``s`` scores pages ``[s * BLOCK_P, (s + 1) * BLOCK_P)``
       of every (sequence, KV head), heads in order, loading the next head's bounds while it computes the
       current one (Quest's bound, as ``quest_page_scores``: bf16 bounds, or 8-bit with scales), writes the
       scores, counts them in the head's 16-bit-key histogram (``quest_page_scores(hist=...)``) and adds one to
       the head's *scored* counter (release). The heads are scored one after the other, so head 0's scores are
       complete early and its selection runs while the later heads are scored.
    2. Selectors (one per head). Wait until the head's ``n_sc`` scorers are done (acquire), select its top
       ``k`` pages from the histogram and the scores (``_top_k_mask_ghist``: exactly ``top_pages_reference``),
       write the page table, raise the head's *selected* flag (release), then reset the histogram counters
       its scores incremented.
    3. Attenders (``n_att`` per head). Wait for the head's flag, attend their share of its page table
       (flash-decoding, as ``sparse_decode``), write a partial output and its log-sum-exp; the head's last
       attender (an acq_rel arrival counter) merges the partials and resets the head's counters.

    Every call leaves its scratch (counters, histograms) as it found it: zero. Under ``TRITON_INTERPRET=1``
    programs run one after another in launch order (no tickets, no waiting: each wait is already satisfied).

Limits
    One scratch buffer per (device, stream) (``_scratch``); as ``topk_sparse_decode`` otherwise (P <= 32768 pages
    per head, page_size a power of two up to 128, head_dim up to 256).

Tested
    tests/test_kernels_quest_pipeline.py: the chosen pages are ``top_pages_reference`` of the scores (ties, +inf
    ends, budget = all pages), the scores ``quest_page_scores_reference`` (bf16 and 8-bit bounds), the output
    ``sparse_decode_reference`` over those pages, the scratch left zero, twice in a row, under the interpreter.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headwise.kernels.sparse_decode import (
    _INTERPRET,
    _LOG2E,
    _TOPK_MAX_BLOCK,
    HIST_ROW,
    _attend_block,
    _merge_head_splits,
    _order_keys,
    _score_hist_keys,
    _select_top_pages,
    _sm_count,
)


@triton.jit
def _sleep(ns, INTERPRET: tl.constexpr):
    """Back off while polling a flag (``nanosleep``), so waiting programs leave the SM's issue slots and the
    memory system to the working ones."""
    if not INTERPRET:
        tl.inline_asm_elementwise("nanosleep.u32 $1; mov.u32 $0, 0;", "=r,r", [tl.full([1], ns, tl.int32)],
                                  dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _wait_at_least(flag, target, INTERPRET: tl.constexpr):
    """Spin until ``*flag >= target`` (volatile loads with back-off), then one acquire read and a block barrier:
    everything written before the matching release is visible to every thread of this program."""
    while tl.load(flag, volatile=True) < target:
        _sleep(64, INTERPRET)
    tl.atomic_add(flag, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _score_tile(bounds_ptr, scales_ptr, q_ptr, offs_p, mask_p, offs_h, offs_d, stride_bp, stride_bm, stride_cp,
                stride_qh, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, SCALED: tl.constexpr):
    """Load one head's page-bound tile (and scales) and its group's query: the loads a scorer issues one head
    ahead."""
    mask_d = offs_d < HEAD_DIM
    m2 = mask_p[:, None] & mask_d[None, :]
    base = bounds_ptr + offs_p[:, None] * stride_bp + offs_d[None, :]
    lo = tl.load(base, mask=m2, other=0.0)
    hi = tl.load(base + stride_bm, mask=m2, other=0.0)
    q = tl.load(q_ptr + offs_h[:, None] * stride_qh + offs_d[None, :],
                mask=(offs_h < GROUP)[:, None] & mask_d[None, :], other=0.0)
    if SCALED:
        s_lo = tl.load(scales_ptr + offs_p * stride_cp, mask=mask_p, other=0.0)
        s_hi = tl.load(scales_ptr + offs_p * stride_cp + 1, mask=mask_p, other=0.0)
    else:
        s_lo = tl.zeros(offs_p.shape, dtype=tl.float32)
        s_hi = s_lo
    return lo, hi, q, s_lo, s_hi


@triton.jit
def _quest_pipeline_kernel(
    Q, BOUNDS, SCALES, K, V, SCORES, HIST, TABLE, O_PART, LSE_PART, Out, SYNC, TRACE,
    n_kv_heads, n_bh, n_pages, k_sel, length, scale_log2e, n_sc, n_att, slots_per_att, iters_per_att, n_prog,
    stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bp, stride_bm,
    stride_cb, stride_ch, stride_cp,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_SC: tl.constexpr,
    SCALED: tl.constexpr, KEEP_ENDS: tl.constexpr, USE_TICKET: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_SPL: tl.constexpr, MERGE_CHUNK: tl.constexpr, TRACING: tl.constexpr,
):
    BLOCK_N: tl.constexpr = PAGE * PAGES_PER_ITER
    if TRACING:  # [t, sm, start, phase times...] per program, in ns of the GPU's global timer
        t0 = tl.extra.cuda.globaltimer()
    # SYNC: [0] ticket; then per (sequence, KV head): scored counters, selected flags, arrival counters
    DONE = SYNC + 1
    READY = DONE + n_bh
    ARRIVE = READY + n_bh
    if USE_TICKET:
        t = tl.atomic_add(SYNC, 1, sem="relaxed", scope="gpu")  # start order, not launch order
        if t == n_prog - 1:
            tl.atomic_xchg(SYNC, 0, sem="relaxed", scope="gpu")  # every ticket is taken: reset for the next call
    else:
        t = tl.program_id(0)
    if TRACING:
        tr = TRACE + t * 8
        tl.store(tr, t.to(tl.int64))
        tl.store(tr + 1, tl.extra.cuda.smid().to(tl.int64))
        tl.store(tr + 2, t0)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)

    if t < n_sc:
        # ---- scorer: pages [t * BLOCK_P, ...) of every head, heads in order, the next head's loads in flight
        offs_p = t * BLOCK_P + tl.arange(0, BLOCK_P)
        mask_p = offs_p < n_pages
        lo, hi, q, s_lo, s_hi = _score_tile(BOUNDS, SCALES, Q, offs_p, mask_p, offs_h, offs_d, stride_bp, stride_bm,
                                            stride_cp, stride_qh, GROUP, HEAD_DIM, SCALED)
        bh = 0
        while bh < n_bh:
            nb = tl.minimum(bh + 1, n_bh - 1)
            b1 = nb // n_kv_heads
            h1 = nb % n_kv_heads
            lo1, hi1, q1, s_lo1, s_hi1 = _score_tile(
                BOUNDS + b1 * stride_bb + h1 * stride_bh, SCALES + b1 * stride_cb + h1 * stride_ch,
                Q + b1 * stride_qb + h1 * GROUP * stride_qh, offs_p, mask_p & (bh + 1 < n_bh), offs_h, offs_d,
                stride_bp, stride_bm, stride_cp, stride_qh, GROUP, HEAD_DIM, SCALED)
            qf = q.to(tl.float32)
            q_pos = tl.sum(tl.maximum(qf, 0.0), 0)
            q_neg = tl.sum(tl.minimum(qf, 0.0), 0)
            if SCALED:
                score = (tl.sum(hi.to(tl.float32) * q_pos[None, :], 1) * s_hi
                         + tl.sum(lo.to(tl.float32) * q_neg[None, :], 1) * s_lo)
            else:
                score = tl.sum(hi.to(tl.float32) * q_pos[None, :] + lo.to(tl.float32) * q_neg[None, :], 1)
            if KEEP_ENDS:
                score = tl.where((offs_p == 0) | (offs_p == n_pages - 1), float("inf"), score)
            tl.store(SCORES + bh * n_pages + offs_p, score, mask=mask_p)
            hk, _ = _score_hist_keys(_order_keys(score, mask_p))
            row = HIST + bh * HIST_ROW
            c = hk >> 8
            c_lo = tl.min(tl.where(mask_p, c, 255), 0)
            c_hi = tl.max(tl.where(mask_p, c, 0), 0)
            if c_lo == c_hi:
                tl.atomic_add(row + c_lo, tl.sum(mask_p.to(tl.int32), 0), sem="relaxed")
            else:
                tl.atomic_add(row + c, 1, mask=mask_p, sem="relaxed")
            tl.atomic_add(row + 256 + hk, 1, mask=mask_p, sem="relaxed")
            tl.debug_barrier()  # all threads' scores and counts, before the release
            tl.atomic_add(DONE + bh, 1, sem="release", scope="gpu")
            if TRACING:  # noqa: SIM102 (a compile-time switch around a runtime test)
                if bh == 0:
                    tl.store(tr + 3, tl.extra.cuda.globaltimer())
            lo, hi, q, s_lo, s_hi = lo1, hi1, q1, s_lo1, s_hi1
            bh += 1
        if TRACING:
            tl.store(tr + 4, tl.extra.cuda.globaltimer())
    elif t < n_sc + n_bh:
        # ---- selector of head bh: the page table, then the flag, then the histogram counters back to zero
        bh = t - n_sc
        _wait_at_least(DONE + bh, n_sc, INTERPRET)
        if TRACING:
            tl.store(tr + 3, tl.extra.cuda.globaltimer())
        _select_top_pages(SCORES + bh * n_pages, n_pages, k_sel, TABLE + bh * k_sel, 0, k_sel, BLOCK_SC, -1,
                          HIST + bh * HIST_ROW)
        tl.debug_barrier()
        tl.atomic_xchg(READY + bh, 1, sem="release", scope="gpu")
        if TRACING:
            tl.store(tr + 4, tl.extra.cuda.globaltimer())
        offs = tl.arange(0, BLOCK_SC)
        valid = offs < n_pages
        hk, _ = _score_hist_keys(_order_keys(tl.load(SCORES + bh * n_pages + offs, mask=valid), valid))
        row = HIST + bh * HIST_ROW
        tl.store(row + (hk >> 8), 0, mask=valid)
        tl.store(row + 256 + hk, 0, mask=valid)
        if TRACING:
            tl.store(tr + 5, tl.extra.cuda.globaltimer())
    else:
        # ---- attender: slots [split * slots_per_att, ...) of head bh's page table
        a = t - n_sc - n_bh
        bh = a // n_att
        split = a % n_att
        b = bh // n_kv_heads
        h = bh % n_kv_heads
        mask_h = offs_h < GROUP
        mask_d = offs_d < HEAD_DIM
        q_rows = h * GROUP + offs_h
        q = tl.load(Q + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
                    mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        offs_n = tl.arange(0, BLOCK_N)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        slot_lo = split * slots_per_att
        slot_hi = tl.minimum(slot_lo + slots_per_att, k_sel)
        _wait_at_least(READY + bh, 1, INTERPRET)
        if TRACING:
            tl.store(tr + 3, tl.extra.cuda.globaltimer())
        it = 0
        while it < iters_per_att:
            m_i, l_i, acc = _attend_block(
                q, k_base, v_base, TABLE + bh * k_sel, slot_lo + it * PAGES_PER_ITER, slot_hi, length,
                scale_log2e, stride_kn, stride_vn, m_i, l_i, acc, offs_n, offs_d, mask_d, PAGE, False,
                INTERPRET, IEEE)
            it += 1
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(O_PART + b * stride_pb + q_rows[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 acc / l_safe[:, None], mask=mask_h[:, None] & mask_d[None, :])
        tl.store(LSE_PART + b * stride_lb + q_rows * stride_lh + split, lse, mask=mask_h)
        tl.debug_barrier()
        if TRACING:
            tl.store(tr + 4, tl.extra.cuda.globaltimer())
        arrived = tl.atomic_add(ARRIVE + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == n_att - 1:
            q_row0 = h * GROUP
            _merge_head_splits(O_PART + b * stride_pb + q_row0 * stride_ph, LSE_PART + b * stride_lb + q_row0 * stride_lh,
                               Out + b * stride_ob + q_row0 * stride_oh, n_att, stride_ph, stride_ps, stride_lh,
                               stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SPL, MERGE_CHUNK)
            tl.atomic_xchg(ARRIVE + bh, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(READY + bh, 0, sem="relaxed", scope="gpu")
            tl.atomic_xchg(DONE + bh, 0, sem="relaxed", scope="gpu")
            if TRACING:
                tl.store(tr + 5, tl.extra.cuda.globaltimer())


_SCRATCH: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
LAST_LAUNCH: dict[str, object] = {}  # the last launch's compiled kernel (registers, spills: for benchmarks)


def _scratch(device: torch.device, n_bh: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed sync counters ``[1 + 3 * n_bh]`` and histograms ``[n_bh, HIST_ROW]`` for one (device, stream); every
    call leaves them zero (kernels on one stream run in order; other streams get their own)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index if device.index is not None else -1, stream)
    have = _SCRATCH.get(key)
    if have is None or have[1].shape[0] < n_bh:
        have = (torch.zeros(1 + 3 * max(n_bh, 64), dtype=torch.int32, device=device),
                torch.zeros(max(n_bh, 8), int(HIST_ROW), dtype=torch.int32, device=device))
        _SCRATCH[key] = have
    sync, hist = have
    return sync, hist[:n_bh]


def quest_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    bounds: torch.Tensor,
    budget_pages: int,
    page_size: int = 16,
    scales: torch.Tensor | None = None,
    scale: float | None = None,
    keep_ends: bool = True,
    out: torch.Tensor | None = None,
    table_out: torch.Tensor | None = None,
    scores_out: torch.Tensor | None = None,
    scorers: int | None = None,
    attenders_per_head: int | None = None,
    tokens_per_iter: int = 64,
    num_warps: int = 4,
    ticket: bool | None = None,
    trace: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Quest decode step in one launch: ``quest_page_scores`` + ``topk_sparse_decode``, the same pages and
    output (up to summation order), with the phases pipelined across heads (see the module docstring).

    q: [B, Hq, D]; k, v: [B, Hkv, S_cap, D] (slots ``< length``); bounds: [B, Hkv, page_cap, 2, D] page min/max
    keys (``scales`` [B, Hkv, page_cap, 2]: 8-bit bounds, ``quantize_bounds``); ``budget_pages`` pages attended
    per (sequence, KV head), the first and newest always among them with ``keep_ends``. ``table_out``
    (int32 [B, Hkv, k]) and ``scores_out`` (fp32 [B, Hkv, n_pages]) receive the chosen pages (ascending) and the
    scores. ``scorers`` (default: one per SM), ``attenders_per_head`` (default: about 4 programs per SM in all),
    ``tokens_per_iter`` and ``num_warps`` only change speed; ``ticket`` (default on a GPU) numbers programs in
    start order so that waits cannot deadlock whatever the GPU runs at once. ``trace`` (int64 [>= programs, 8],
    GPU only, zeroed): each program's ticket, SM and global-timer stamps (start, then after each phase).
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    n_pages = math.ceil(length / page_size)
    k_sel = max(1, min(int(budget_pages), n_pages))
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D and Hq % Hkv == 0 and D <= 256
    assert q.is_contiguous() and k.stride(3) == 1 and v.stride(3) == 1
    assert page_size >= 1 and page_size & (page_size - 1) == 0 and page_size <= 128
    assert 0 < length <= k.shape[2] and 1 <= n_pages <= _TOPK_MAX_BLOCK
    assert bounds.shape[:2] == (B, Hkv) and bounds.shape[3:] == (2, D) and bounds.shape[2] >= n_pages
    assert bounds.stride(4) == 1
    if scales is not None:
        assert scales.shape[:2] == (B, Hkv) and scales.shape[2] >= n_pages and scales.shape[3:] == (2,)
        assert scales.dtype == torch.float32 and scales.stride(3) == 1
    group = Hq // Hkv
    n_bh = B * Hkv
    sms = _sm_count(q.device.index or 0) if q.device.type == "cuda" else 4
    block_p = max(16, triton.next_power_of_2(math.ceil(n_pages / (scorers or sms))))
    n_sc = math.ceil(n_pages / block_p)
    pages_per_iter = max(1, tokens_per_iter // page_size)
    n_att = attenders_per_head or max(1, min(math.ceil(4 * sms / n_bh), math.ceil(k_sel / pages_per_iter)))
    slots = math.ceil(math.ceil(k_sel / n_att) / pages_per_iter) * pages_per_iter
    n_att = math.ceil(k_sel / slots)
    n_prog = n_sc + n_bh + n_bh * n_att
    scale = D**-0.5 if scale is None else scale
    sync, hist = _scratch(q.device, n_bh)
    scores = scores_out if scores_out is not None else torch.empty(B, Hkv, n_pages, device=q.device,
                                                                   dtype=torch.float32)
    assert scores.shape == (B, Hkv, n_pages) and scores.is_contiguous() and scores.dtype == torch.float32
    table = table_out if table_out is not None else torch.empty(B, Hkv, k_sel, device=q.device, dtype=torch.int32)
    assert table.shape == (B, Hkv, k_sel) and table.is_contiguous() and table.dtype == torch.int32
    if out is None:
        out = torch.empty_like(q)
    o_part = torch.empty(B, Hq, n_att, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, n_att, device=q.device, dtype=torch.float32)
    sc = scales if scales is not None else scores
    block_d = triton.next_power_of_2(D)
    block_g = triton.next_power_of_2(group)
    use_ticket = (q.device.type == "cuda" if ticket is None else bool(ticket)) and not _INTERPRET
    LAST_LAUNCH["n_sc"] = n_sc
    LAST_LAUNCH["kernel"] = _quest_pipeline_kernel[(n_prog,)](
        q, bounds, sc, k, v, scores, hist, table, o_part, lse_part, out, sync, trace if trace is not None else sync,
        Hkv, n_bh, n_pages, k_sel, int(length), scale * _LOG2E, n_sc, n_att, slots, slots // pages_per_iter, n_prog,
        q.stride(0), q.stride(1),
        bounds.stride(0), bounds.stride(1), bounds.stride(2), bounds.stride(3),
        sc.stride(0), sc.stride(1), sc.stride(2) if scales is not None else 0,
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2),
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, block_g), HEAD_DIM=D, BLOCK_D=block_d,
        PAGE=page_size, PAGES_PER_ITER=pages_per_iter, BLOCK_P=block_p,
        BLOCK_SC=triton.next_power_of_2(n_pages), SCALED=scales is not None, KEEP_ENDS=keep_ends,
        USE_TICKET=use_ticket, INTERPRET=_INTERPRET, IEEE=k.dtype == torch.float32,
        BLOCK_G=block_g, BLOCK_SPL=triton.next_power_of_2(n_att),
        MERGE_CHUNK=max(1, min(triton.next_power_of_2(n_att), 8192 // (block_g * block_d))),
        TRACING=trace is not None and not _INTERPRET, num_warps=num_warps,
    )
    return out


__all__ = ["quest_decode"]
