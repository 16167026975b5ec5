"""Quest decode in one launch: page scoring, exact top-k page selection and attention over the chosen pages.

Status: an experiment, correct and tested, slower than the shipped path at the benchmark's 128K tokens (see
Measured); kept in history, not used by the engine.

Why
    A Quest step (Tang et al., 2024, https://arxiv.org/abs/2406.10774) is score -> top-k -> attend -> merge. At
    128K tokens and a 4K budget both memory phases are small (page bounds 16.8 MB, chosen K/V 16.8 MB at pages of
    32, Llama-3-8B shapes), so the step's time is fixed costs: launches, and a top-k that one program per head
    does alone (~9 us on an H100 for 4096 scores; instruction-bound on one SM, bench/explore_select.py). Here the
    selection is spread over the programs that scored the pages, through global histograms, in one launch.

Algorithm
    ``n_splits`` programs per (sequence, KV head); program ``j`` owns pages ``j, j + n_splits, ..`` (interleaved,
    so a run of consecutive chosen pages is spread over all programs).

    1. Score: each program computes Quest's bound (as ``quest_page_scores``) for its pages in registers, writes
       the scores, and adds each finite one to two histograms of the head: coarse, the order-preserving integer
       key's top 16 bits (65536 bins), and fine, key bits 8..23 (65536 entries: a coarse bin's 256 sub-bins,
       aliased with coarse bins 256 apart). Atomic max/min keep the used coarse range; non-finite scores (+inf
       ends) are counted apart. Then it arrives at the head's counter and waits for the others (volatile spin;
       programs are numbered by a start-order ticket when the grid may not be resident at once, so a waiter only
       waits for started programs and the wait cannot deadlock).
    2. Select: a cumulative sum from the highest used coarse bin down finds the bin ``b`` of the k-th largest
       score and how many of its pages are taken; when ``b`` is not taken whole, its 256 fine entries do the same
       one level down (if their total disagrees with ``b``'s count, aliasing, the kernel ranks inside ``b``
       instead); pages still tied at the fine level are ranked exactly from the written scores (higher score,
       then lower page). The result is exactly ``top_pages_reference`` on the same scores.
    3. Attend the program's chosen pages (slot -> page found in registers), flash-decoding; the head's last
       program to finish merges the partial outputs by log-sum-exp. Each program clears its own histogram
       entries once all programs of the head have read them; the last one resets the counters.
    Under ``TRITON_INTERPRET=1`` (programs run one after another) and with ``two_launch=True`` the waits are
    launch boundaries (three launches).

Measured (H100, Llama-3-8B layer, random data, CUDA-graph time with L2 flushed; bench/explore_quest_fused.py,
bench/results/quest_one_launch_2026-11-23.json): batch 1, 128K, pages of 32: 40.9-43.9 us against 32.0 us for
the shipped score -> select+attend -> merge path (``topk_sparse_decode``); pages of 64: 36.0 vs 26.4; batch 4:
96.8 vs 75.7 us; 512K tokens, batch 1: 99.4 vs 105.1 us (the only point where it wins). Without the attention
phase it takes 29.8 us at 128K: a chain of dependent global round trips (scores, histogram atomics, the wait,
the bin scans, the merge) that costs more than the one-program selection it replaces.

Limits
    Scratch (two histograms, 512 KB per (sequence, KV head), and counters) per (device, stream), left clean by
    every call. Otherwise as ``sparse_decode``.

Tested
    tests/test_kernels_quest.py (at the commit that holds this file): against ``quest_page_scores_reference`` +
    ``top_pages_reference`` + ``sparse_decode_reference`` under TRITON_INTERPRET=1 and on an H100 in one
    launch, with ties across the k-th place, a crowded coarse bin, aliased fine bins, +inf ends, budget below
    the kept ends, fp32, several heads and sequences; each test calls twice (state left clean).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headwise.kernels.sparse_decode import (
    _INTERPRET,
    _LOG2E,
    _dot,
    _merge_head_splits,
    _order_keys,
    _sm_count,
)

_NBINS = 65536  # per histogram level (two per (sequence, KV head))
_STATE = 8  # per (sequence, KV head): three arrival counters, max / min coarse bin, non-finite count
_MAX_OWN = 256  # pages one program scores and holds in registers: more programs per head for longer caches


@triton.jit
def _attend_tokens(q, k_base, v_base, tok, valid, scale_log2e, stride_kn, stride_vn, m_i, l_i, acc, offs_d, mask_d,
                   INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """One online-softmax step over the token slots ``tok`` (K and V loads issued together)."""
    m2 = valid[:, None] & mask_d[None, :]
    k = tl.load(k_base + tok[:, None] * stride_kn + offs_d[None, :], mask=m2, other=0.0)
    v = tl.load(v_base + tok[:, None] * stride_vn + offs_d[None, :], mask=m2, other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
    return m_new, l_i, acc


@triton.jit
def _arrive_and_wait(counter, n, WAIT: tl.constexpr):
    """Publish this program's stores and atomics (release) and, with ``WAIT``, spin until ``n`` programs did."""
    tl.debug_barrier()  # every thread's stores and atomics before the arrival
    tl.atomic_add(counter, 1, sem="release", scope="gpu")
    if WAIT:
        _wait_for(counter, n)


@triton.jit
def _wait_for(counter, n):
    """Spin until ``counter >= n``: volatile loads (no read-modify-write traffic on the line the arrivals add
    to), then one acquire to order this program's later reads after the others' published writes."""
    arrived = tl.load(counter, volatile=True)
    while arrived < n:
        arrived = tl.load(counter, volatile=True)
    tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _rank_in_group(take, mine, key, page, sc_row, n_pages, room, b_star, s_star, USE_SUB: tl.constexpr,
                   SCAN: tl.constexpr, OWN_BLOCK: tl.constexpr):
    """Add to ``take`` the pages of ``mine`` (this program's pages of the tied group: coarse bin ``b_star`` and,
    with ``USE_SUB``, fine bin ``s_star``) that rank below ``room`` among the group's pages of the head, by the
    written scores: higher key first, then lower page. Rare (scores within 2^-15 of each other, or aliasing)."""
    INF_KEY: tl.constexpr = 0x7F800000
    n_mine = tl.sum(mine.to(tl.int32), 0)
    mpos = tl.cumsum(mine.to(tl.int32), 0) - 1
    rank = tl.zeros([OWN_BLOCK], dtype=tl.int32)
    a0 = 0
    while a0 < n_pages:
        pa = a0 + tl.arange(0, SCAN)
        va = pa < n_pages
        ka = _order_keys(tl.load(sc_row + pa, mask=va, other=float("-inf"), cache_modifier=".cg"), va)
        grp = va & (tl.where(ka >= INF_KEY, 65536, (ka >> 16) + 32768) == b_star)
        if USE_SUB:
            grp = grp & (((ka >> 8) & 255) == s_star)
        t = 0
        while t < n_mine:  # a ``while``: the interpreter takes no runtime ``range`` bound
            sel = mine & (mpos == t)
            k_e = tl.sum(tl.where(sel, key, 0), 0)
            p_e = tl.sum(tl.where(sel, page, 0), 0)
            c = tl.sum((grp & ((ka > k_e) | ((ka == k_e) & (pa < p_e)))).to(tl.int32), 0)
            rank += tl.where(sel, c, 0)
            t += 1
        a0 += SCAN
    return take | (mine & (rank < room))


@triton.jit
def _quest_decode_kernel(
    Q, BOUNDS, K, V, SCORES, HIST, STATE, TICKET, O_PART, LSE_PART, Out, SELECTED,
    n_pages, own, k_sel, length, scale_log2e, n_kv_heads, n_prog, take_cap,
    stride_qb, stride_qh,
    stride_bb, stride_bh, stride_bp, stride_bm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, PAGES_PER_ITER: tl.constexpr, NSPLIT: tl.constexpr, OWN_BLOCK: tl.constexpr,
    DS: tl.constexpr, SCAN: tl.constexpr,
    PHASE: tl.constexpr, USE_TICKET: tl.constexpr, KEEP_ENDS: tl.constexpr, WRITE_SELECTED: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_SPL: tl.constexpr, MERGE_CHUNK: tl.constexpr,
):
    """PHASE 0: everything, the programs of a head waiting for each other where needed; 1, 2, 3: score +
    histograms / select + attend / clean + merge alone (one launch each, the launch boundaries as the waits)."""
    NB: tl.constexpr = 65536
    INF_KEY: tl.constexpr = 0x7F800000  # _order_keys(+inf)
    BLOCK_N: tl.constexpr = PAGE * PAGES_PER_ITER
    if USE_TICKET:
        pid = tl.atomic_add(TICKET + PHASE, 1, sem="relaxed", scope="gpu")  # start order, not launch order
        if pid == n_prog - 1:
            tl.atomic_xchg(TICKET + PHASE, 0, sem="relaxed", scope="gpu")  # every ticket is taken: reset
    else:
        pid = tl.program_id(0)
    bh = pid // NSPLIT
    j = pid % NSPLIT
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    st = STATE + bh * 8  # 0: scored, 1: selected, 2: done (arrivals); 3, 4: max / min coarse bin; 5: non-finite
    h1 = HIST + bh.to(tl.int64) * (2 * NB)  # coarse: the order key's top 16 bits
    h2 = h1 + NB  # fine, aliased: key bits 8..23 (the coarse bin's low 8 bits and 8 more)
    sc_row = SCORES + bh.to(tl.int64) * n_pages
    offs_o = tl.arange(0, OWN_BLOCK)
    page = j + NSPLIT * offs_o  # this program's pages
    valid = (offs_o < own) & (page < n_pages)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    q_rows = h * GROUP + offs_h
    q_ptr = Q + b * stride_qb + q_rows[:, None] * stride_qh
    offs_st = tl.arange(0, 8)

    # 1. score this program's pages (head_dim in slices of DS: the page scores stay in registers), histogram them
    if (PHASE == 0) | (PHASE == 1):
        score = tl.zeros([OWN_BLOCK], dtype=tl.float32)
        b_ptr = BOUNDS + b * stride_bb + h * stride_bh + page[:, None].to(tl.int64) * stride_bp
        offs_s = tl.arange(0, DS)
        for d0 in tl.static_range(0, BLOCK_D, DS):
            cols = d0 + offs_s
            mc = cols < HEAD_DIM
            qs = tl.load(q_ptr + cols[None, :], mask=mask_h[:, None] & mc[None, :], other=0.0).to(tl.float32)
            q_pos = tl.sum(tl.maximum(qs, 0.0), 0)  # the group's relu(q) summed, see quest_page_scores
            q_neg = tl.sum(tl.minimum(qs, 0.0), 0)
            m2 = valid[:, None] & mc[None, :]
            k_min = tl.load(b_ptr + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            k_max = tl.load(b_ptr + stride_bm + cols[None, :], mask=m2, other=0.0).to(tl.float32)
            score += tl.sum(k_max * q_pos[None, :] + k_min * q_neg[None, :], 1)
        if KEEP_ENDS:
            score = tl.where((page == 0) | (page == n_pages - 1), float("inf"), score)
        tl.store(sc_row + page, score, mask=valid)
        key = _order_keys(score, valid)
        fin = valid & (key < INF_KEY)
        coarse = tl.where(fin, (key >> 16) + 32768, tl.where(valid, NB, -1))  # non-finite: NB, above all
        tl.atomic_add(h1 + coarse, 1, mask=fin, sem="relaxed", scope="gpu")
        tl.atomic_add(h2 + ((key >> 8) & 0xFFFF), 1, mask=fin, sem="relaxed", scope="gpu")
        tl.atomic_max(st + 3, tl.max(tl.where(fin, coarse, -1), 0), sem="relaxed", scope="gpu")
        tl.atomic_min(st + 4, tl.min(tl.where(fin, coarse, NB), 0), sem="relaxed", scope="gpu")
        tl.atomic_add(st + 5, tl.sum((valid & ~fin).to(tl.int32), 0), sem="relaxed", scope="gpu")
        _arrive_and_wait(st + 0, NSPLIT, PHASE == 0)
        if PHASE == 1:
            return
    else:
        key = _order_keys(tl.load(sc_row + page, mask=valid, other=float("-inf"), cache_modifier=".cg"), valid)
        fin = valid & (key < INF_KEY)
        coarse = tl.where(fin, (key >> 16) + 32768, tl.where(valid, NB, -1))

    if PHASE != 3:
        # 2. the k-th largest score's coarse bin, then (when that bin is not taken whole) its fine bin
        state = tl.load(st + offs_st, cache_modifier=".cg")
        hi_bin = tl.sum(tl.where(offs_st == 3, state, 0), 0)
        lo_bin = tl.sum(tl.where(offs_st == 4, state, 0), 0)
        n_top = tl.sum(tl.where(offs_st == 5, state, 0), 0)
        need = k_sel - n_top
        b_star = tl.full([], NB, tl.int32)  # the non-finite pages' bin: when they alone fill the budget
        room = k_sel + 0 * n_top
        in_bin = n_top
        if need > 0:
            offs_sc = tl.arange(0, SCAN)
            top = hi_bin
            cum = tl.full([], 0, tl.int32)
            found = tl.full([], 0, tl.int32)
            while (found == 0) & (top >= lo_bin):
                bin_s = top - offs_sc  # descending
                cnt = tl.load(h1 + bin_s, mask=bin_s >= lo_bin, other=0, cache_modifier=".cg")
                cs = tl.cumsum(cnt, 0) + cum  # finite pages in bins >= bin_s
                first = tl.min(tl.where(cs >= need, offs_sc, SCAN), 0)
                if first < SCAN:
                    b_star = top - first
                    in_bin = tl.sum(tl.where(offs_sc == first, cnt, 0), 0)
                    room = need - (tl.sum(tl.where(offs_sc == first, cs, 0), 0) - in_bin)
                    found = 1
                cum = tl.max(cs, 0)
                top -= SCAN
        take = coarse > b_star
        mine = coarse == b_star
        if in_bin == room:
            take = take | mine
        elif b_star < NB:
            # The fine histogram's 256 entries of this coarse bin; other coarse bins 256 apart alias onto them,
            # which shows as a total above ``in_bin``: then rank inside the coarse bin instead.
            offs_f = tl.arange(0, 256)
            sub = 255 - offs_f  # descending
            cnt2 = tl.load(h2 + ((b_star & 255) << 8) + sub, cache_modifier=".cg")
            if tl.sum(cnt2, 0) == in_bin:
                cs2 = tl.cumsum(cnt2, 0)
                first2 = tl.min(tl.where(cs2 >= room, offs_f, 256), 0)
                s_star = 255 - first2
                in_sub = tl.sum(tl.where(offs_f == first2, cnt2, 0), 0)
                room2 = room - (tl.sum(tl.where(offs_f == first2, cs2, 0), 0) - in_sub)
                fine = (key >> 8) & 255
                take = take | (mine & (fine > s_star))
                mine2 = mine & (fine == s_star)
                if in_sub == room2:
                    take = take | mine2
                elif tl.sum(mine2.to(tl.int32), 0) > 0:
                    take = _rank_in_group(take, mine2, key, page, sc_row, n_pages, room2, b_star, s_star, True,
                                          SCAN, OWN_BLOCK)
            elif tl.sum(mine.to(tl.int32), 0) > 0:
                take = _rank_in_group(take, mine, key, page, sc_row, n_pages, room, b_star, 0, False, SCAN,
                                      OWN_BLOCK)
        elif tl.sum(mine.to(tl.int32), 0) > 0:  # more non-finite pages than the budget
            take = _rank_in_group(take, mine, key, page, sc_row, n_pages, room, b_star, 0, False, SCAN, OWN_BLOCK)
        if PHASE == 0:
            tl.debug_barrier()
            tl.atomic_add(st + 1, 1, sem="release", scope="gpu")  # this program is done reading the histograms
        if WRITE_SELECTED:
            tl.store(SELECTED + bh.to(tl.int64) * n_pages + page, take.to(tl.int8), mask=valid)

        # 3. attend them, PAGES_PER_ITER at a time (slot -> page found in registers)
        q = tl.load(q_ptr + offs_d[None, :], mask=mask_h[:, None] & mask_d[None, :], other=0.0)
        slot = tl.where(take, tl.cumsum(take.to(tl.int32), 0) - 1, -1)
        n_take = tl.minimum(tl.sum(take.to(tl.int32), 0), take_cap)  # take_cap < own: timing breakdowns only
        m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        offs_t = tl.arange(0, PAGES_PER_ITER)
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh
        p0 = 0
        while p0 < n_take:
            tile_page = tl.sum(tl.where(slot[None, :] == (p0 + offs_t)[:, None], page[None, :], 0), 1)
            at = (offs_n // PAGE)[:, None] == offs_t[None, :]  # [BLOCK_N, PAGES_PER_ITER]
            tok_page = tl.sum(tl.where(at, tile_page[None, :], 0), 1)
            tok = tok_page.to(tl.int64) * PAGE + offs_n % PAGE
            tok_ok = (p0 + offs_n // PAGE < n_take) & (tok < length)
            m_i, l_i, acc = _attend_tokens(q, k_base, v_base, tok, tok_ok, scale_log2e, stride_kn, stride_vn, m_i,
                                           l_i, acc, offs_d, mask_d, INTERPRET, IEEE)
            p0 += PAGES_PER_ITER
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(O_PART + b * stride_pb + q_rows[:, None] * stride_ph + j * stride_ps + offs_d[None, :],
                 acc / l_safe[:, None], mask=mask_h[:, None] & mask_d[None, :])
        tl.store(LSE_PART + b * stride_lb + q_rows * stride_lh + j, lse, mask=mask_h)
        if PHASE == 2:
            return

    # 4. clear this program's histogram entries once every program of the head has read them (by now they
    # have: the wait almost never spins); the head's last program merges the splits and resets the counters
    if PHASE == 0:
        _wait_for(st + 1, NSPLIT)
    tl.store(h1 + coarse, tl.zeros([OWN_BLOCK], tl.int32), mask=fin)
    tl.store(h2 + ((key >> 8) & 0xFFFF), tl.zeros([OWN_BLOCK], tl.int32), mask=fin)
    tl.debug_barrier()
    done = tl.atomic_add(st + 2, 1, sem="acq_rel", scope="gpu")
    if done == NSPLIT - 1:
        q_row0 = h * GROUP
        _merge_head_splits(O_PART + b * stride_pb + q_row0 * stride_ph, LSE_PART + b * stride_lb + q_row0 * stride_lh,
                           Out + b * stride_ob + q_row0 * stride_oh, NSPLIT, stride_ph, stride_ps, stride_lh,
                           stride_oh, GROUP, BLOCK_G, HEAD_DIM, BLOCK_D, BLOCK_SPL, MERGE_CHUNK)
        tl.store(st + offs_st, tl.where(offs_st == 3, -1, tl.where(offs_st == 4, NB, 0)))


_SCRATCH: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _scratch(device: torch.device, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Histograms ``[heads, 2 * 65536]``, per-head state ``[heads, 8]`` and four ticket counters for one (device,
    stream), in their rest state (each call leaves them so). Grown (re-made) when more heads are needed, outside
    a CUDA-graph capture when the capturing stream ran a call first (its warm-up)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index if device.index is not None else -1, stream)
    have = _SCRATCH.get(key)
    if have is None or have[0].shape[0] < heads:
        n = max(heads, 8)
        hist = torch.zeros(n, 2 * _NBINS, dtype=torch.int32, device=device)
        state = torch.zeros(n, _STATE, dtype=torch.int32, device=device)
        state[:, 3], state[:, 4] = -1, _NBINS
        have = (hist, state, torch.zeros(4, dtype=torch.int32, device=device))  # a ticket counter per phase
        _SCRATCH[key] = have
    return have


def quest_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    bounds: torch.Tensor,
    budget_pages: int,
    page_size: int = 16,
    scale: float | None = None,
    keep_ends: bool = True,
    num_splits: int = 64,
    out: torch.Tensor | None = None,
    scores_out: torch.Tensor | None = None,
    selected_out: torch.Tensor | None = None,
    two_launch: bool = False,
    tokens_per_iter: int = 64,
    dim_slice: int = 32,
    num_warps: int = 4,
    num_stages: int = 1,
    ticket: bool | None = None,
    skip_attend: bool = False,
) -> torch.Tensor:
    """One Quest decode step in one launch: score every page, keep the top ``budget_pages`` per KV head (ties to
    the lower page; with ``keep_ends`` the first and newest page always), attend them. Returns [B, Hq, D].

    q: [B, Hq, D]; k, v: [B, Hkv, S_cap, D] (slots ``< length`` valid); bounds: [B, Hkv, page_cap, 2, D], the
    per-page min/max keys (``PagedStore``), pages ``< ceil(length / page_size)`` valid. ``scores_out`` (fp32
    [B, Hkv, n_pages]) receives the page scores (``quest_page_scores``), ``selected_out`` (int8, same shape)
    1 for the chosen pages. ``two_launch`` puts a launch boundary where the programs otherwise wait for each
    other (always so under TRITON_INTERPRET=1). ``num_splits`` programs per KV head; the rest only change speed.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D, "k, v must be [B, Hkv, S_cap, D] like q"
    assert Hq % Hkv == 0 and Hq // Hkv <= 64, "query heads must be a multiple (<= 64) of KV heads"
    assert k.stride(3) == 1 and v.stride(3) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    assert page_size >= 1 and page_size & (page_size - 1) == 0 and page_size <= 128, "page_size: power of 2 <= 128"
    assert D <= 256, "head_dim up to 256"
    assert 0 < length <= k.shape[2], f"length {length} outside the cache's {k.shape[2]} slots"
    n_pages = math.ceil(length / page_size)
    assert bounds.shape[:2] == (B, Hkv) and bounds.shape[3:] == (2, D) and bounds.shape[2] >= n_pages
    assert bounds.stride(4) == 1 and n_pages < 2**24
    group = Hq // Hkv
    k_sel = max(1, min(int(budget_pages), n_pages))
    splits = max(1, min(int(num_splits), n_pages), math.ceil(n_pages / _MAX_OWN))
    own = math.ceil(n_pages / splits)
    n_prog = B * Hkv * splits
    scale = D**-0.5 if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    if scores_out is None:
        scores_out = torch.empty(B, Hkv, n_pages, device=q.device, dtype=torch.float32)
    assert scores_out.shape == (B, Hkv, n_pages) and scores_out.is_contiguous() and scores_out.dtype == torch.float32
    if selected_out is not None:
        assert selected_out.shape == (B, Hkv, n_pages) and selected_out.is_contiguous()
        assert selected_out.dtype == torch.int8
    o_part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
    lse_part = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    hist, state, tickets = _scratch(q.device, B * Hkv)
    block_d = triton.next_power_of_2(D)
    block_g = triton.next_power_of_2(group)
    block_spl = triton.next_power_of_2(splits)
    pages_per_iter = max(1, tokens_per_iter // page_size)
    phases = (1, 2, 3) if (two_launch or _INTERPRET) else (0,)
    if ticket is None:  # all programs resident at once (2 per SM at least): launch order is enough
        ticket = q.device.type == "cuda" and n_prog > 2 * _sm_count(q.device.index or 0)
    for phase in phases:
        _quest_decode_kernel[(n_prog,)](
            q, bounds, k, v, scores_out, hist, state, tickets, o_part, lse_part, out,
            selected_out if selected_out is not None else scores_out,
            n_pages, own, k_sel, length, scale * _LOG2E, Hkv, n_prog, 0 if skip_attend else own,
            q.stride(0), q.stride(1),
            bounds.stride(0), bounds.stride(1), bounds.stride(2), bounds.stride(3),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            o_part.stride(0), o_part.stride(1), o_part.stride(2),
            lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1),
            GROUP=group, BLOCK_H=max(16, block_g), HEAD_DIM=D, BLOCK_D=block_d,
            PAGE=page_size, PAGES_PER_ITER=pages_per_iter, NSPLIT=splits, OWN_BLOCK=triton.next_power_of_2(own),
            DS=min(dim_slice, block_d), SCAN=2048, PHASE=phase, USE_TICKET=bool(ticket) and not _INTERPRET, KEEP_ENDS=keep_ends,
            WRITE_SELECTED=selected_out is not None, INTERPRET=_INTERPRET, IEEE=k.dtype == torch.float32,
            BLOCK_G=block_g, BLOCK_SPL=block_spl,
            MERGE_CHUNK=max(1, min(block_spl, 8192 // (block_g * block_d))),
            num_warps=num_warps, num_stages=num_stages,
        )
    return out


__all__ = ["quest_decode"]
