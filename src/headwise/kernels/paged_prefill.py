"""Causal prefill attention over a paged KV pool, in Triton: prompt chunks read their prefix straight from the pages.

Layout
    As ``batch_decode``: ``k_pool, v_pool: [num_pages, page_size, D]`` (views of ``pool.PagePool.kv``; any page and
    slot strides, D contiguous). A launch attends *rows*: row ``r`` is one KV head of one sequence's chunk of
    ``length`` query tokens at positions ``start .. start + length - 1``, tokens ``token0 ..`` of the packed query axis
    ``q: [T, Hq, D]``, query heads ``head0 .. head0 + group - 1`` (the KV head's GQA group), attending causally to the
    keys at positions ``0 .. start + length - 1``, which sit in slot ``p`` of the row's pages: logical page
    ``p // page_size`` is physical page ``table[r, p // page_size]`` (``table: int32 [R, pages]``, any order over the
    pool). The chunk's own keys and values must be in the pages already (the engine writes them first, through
    ``PagePool.write``, as ``PagedDenseStore.append`` does). Rows of several sequences, with their own tables, starts
    and lengths, share one launch (varlen, as FlashAttention's ``varlen`` and vLLM's chunked prefill).

Plan / run
    ``plan_paged_prefill`` (host ints in, device tensors out, once per layer's launch or shared by layers of equal
    rows) builds the rows ``[R, 4]`` (token0, length, start, head0) and the flat list of work items ``[W, 2]``: one
    per (row, block of ``block_t`` query tokens), heaviest first (most keys to read), so the long tail of a launch
    is short programs. ``paged_prefill`` runs one program per work item.

Algorithm
    FlashAttention-2's forward (Dao, 2023) over pages: a program holds ``BLOCK_M = block_t * BLOCK_H`` query rows
    (``block_t`` tokens x the ``group`` query heads sharing the KV head, padded to a power of two ``BLOCK_H``: each
    K/V block is read once for the whole group) and walks the keys ``BLOCK_N`` at a time (a multiple of the page
    size: the block's physical pages are read from the table inside the kernel, no gathered copy), with an online
    softmax in the log2 domain and fp32 accumulators. Key blocks wholly before the program's first query position
    take no mask; the last few (the causal diagonal) are masked by position.

Limits
    ``page_size`` a power of two dividing ``block_n``; ``head_dim`` up to 256; at most 64 query heads per KV head;
    fp32, fp16 or bf16 with fp32 accumulation (fp32 multiplies in full fp32). Under TRITON_INTERPRET=1 products
    are done in fp32 (``paged_decode._dot``: the interpreter checks indexing and softmax, not bf16 rounding).

Tested
    tests/test_kernels_paged_prefill.py under TRITON_INTERPRET=1 against ``paged_prefill_reference`` (gather the
    row's pages, masked SDPA) and against attention over the rows' contiguous history: starts 0, 1, 15, 16, 17, 33,
    chunks of lengths that are not multiples of the block, a partial last page, pages shuffled over a garbage-filled
    pool, GQA 1:1, 3:1 and 4:1, head_dim 16, 40 and 64, several sequences in one launch; tests/test_paged_cache.py runs
    the engine's prompt chunks on it (greedy tokens equal to each sequence alone). Built ahead of time for sm_90 on a
    machine without a GPU (``triton.compile`` with a ``GPUTarget``, 16-byte-divisible strides as the JIT specializes
    them): every tile configuration the bench times compiles, with the K/V loads pipelined (``cp.async``); the
    default bf16 tiles take 190 registers a thread, no spills. Not yet run on a GPU: the tests marked ``gpu`` and
    ``bench/dense_chunk_attention.py --paged``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from headwise.kernels.common import INTERPRET, host_to_device
from headwise.kernels.paged_decode import _LOG2E, _dot


# ----------------------------------------------------------------------------------------------- kernel
@triton.jit
def _prefill_block(
    q, k_pool, v_pool, table_row, n0, pos, n_keys, scale_log2e,
    stride_kp, stride_kt, stride_vp, stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d,
    PAGE: tl.constexpr, MASKED: tl.constexpr, EVEN_D: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over the keys ``n0 .. n0 + BLOCK_N - 1``. Unmasked (``MASKED`` False): every key of
    the block precedes every query row's position."""
    j = n0 + offs_n  # key positions
    if MASKED:
        in_range = j < n_keys
        phys = tl.load(table_row + j // PAGE, mask=in_range, other=0).to(tl.int64)
        kv_mask = in_range[:, None] & mask_d[None, :]
    else:
        phys = tl.load(table_row + j // PAGE).to(tl.int64)
        kv_mask = mask_d[None, :]
    within = j % PAGE
    k_ptrs = k_pool + phys[:, None] * stride_kp + within[:, None] * stride_kt + offs_d[None, :]
    if MASKED or not EVEN_D:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e  # [BLOCK_M, BLOCK_N], log2 domain
    if MASKED:
        s = tl.where(j[None, :] <= pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_pool + phys[:, None] * stride_vp + within[:, None] * stride_vt + offs_d[None, :]
    if MASKED or not EVEN_D:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
    return m_new, l_i, acc


@triton.jit
def _paged_prefill_kernel(
    Q, K, V, TABLE, ROWS, WORK, Out, scale_log2e,
    stride_qt, stride_qh, stride_kp, stride_kt, stride_vp, stride_vt, stride_tr, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_T * BLOCK_H
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    w = tl.program_id(0)
    r = tl.load(WORK + 2 * w)
    qb = tl.load(WORK + 2 * w + 1)
    token0 = tl.load(ROWS + 4 * r)
    length = tl.load(ROWS + 4 * r + 1)
    start = tl.load(ROWS + 4 * r + 2)
    head0 = tl.load(ROWS + 4 * r + 3)

    # Row i of the tile: query token t (of the chunk) and query head hh (of the group), token-major.
    offs_m = tl.arange(0, BLOCK_M)
    t = qb * BLOCK_T + offs_m // BLOCK_H
    hh = offs_m % BLOCK_H
    row_ok = (t < length) & (hh < GROUP)
    pos = start + t
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_off = (token0 + t).to(tl.int64)[:, None] * stride_qt + (head0 + hh).to(tl.int64)[:, None] * stride_qh
    q = tl.load(Q + q_off + offs_d[None, :], mask=row_ok[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    first = start + qb * BLOCK_T  # the tile's first query position
    n_keys = start + tl.minimum((qb + 1) * BLOCK_T, length)  # keys its valid rows may see
    n_free = first // BLOCK_N  # key blocks wholly before ``first``: no mask
    n_blocks = (n_keys + BLOCK_N - 1) // BLOCK_N
    offs_n = tl.arange(0, BLOCK_N)
    table_row = TABLE + r.to(tl.int64) * stride_tr
    # Runtime trip counts; the interpreter takes no runtime ``range`` bound, hence its ``while``.
    if INTERPRET:
        blk = 0
        while blk < n_free:
            m_i, l_i, acc = _prefill_block(
                q, K, V, table_row, blk * BLOCK_N, pos, n_keys, scale_log2e, stride_kp, stride_kt, stride_vp,
                stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d, PAGE, False, EVEN_D, INTERPRET, IEEE)
            blk += 1
        while blk < n_blocks:
            m_i, l_i, acc = _prefill_block(
                q, K, V, table_row, blk * BLOCK_N, pos, n_keys, scale_log2e, stride_kp, stride_kt, stride_vp,
                stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d, PAGE, True, EVEN_D, INTERPRET, IEEE)
            blk += 1
    else:
        for blk in range(0, n_free):
            m_i, l_i, acc = _prefill_block(
                q, K, V, table_row, blk * BLOCK_N, pos, n_keys, scale_log2e, stride_kp, stride_kt, stride_vp,
                stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d, PAGE, False, EVEN_D, INTERPRET, IEEE)
        for blk in range(n_free, n_blocks):
            m_i, l_i, acc = _prefill_block(
                q, K, V, table_row, blk * BLOCK_N, pos, n_keys, scale_log2e, stride_kp, stride_kt, stride_vp,
                stride_vt, m_i, l_i, acc, offs_n, offs_d, mask_d, PAGE, True, EVEN_D, INTERPRET, IEEE)
    # Every valid row sees key 0, so l_i > 0; padded rows are not stored.
    out = acc / l_i[:, None]
    o_off = (token0 + t).to(tl.int64)[:, None] * stride_ot + (head0 + hh).to(tl.int64)[:, None] * stride_oh
    tl.store(Out + o_off + offs_d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------- plan / run
@dataclass(frozen=True)
class PrefillPlan:
    """What a launch needs besides the tensors (``plan_paged_prefill``): rows and work items on the device."""

    rows: torch.Tensor  # int32 [R, 4]: token0, length, start, head0
    work: torch.Tensor  # int32 [W, 2]: (row, query block), heaviest first
    group: int  # query heads per KV head
    block_t: int  # query tokens per work item
    max_keys: int  # the most keys a row attends (host ints, for the launch's checks)
    tokens: int  # query tokens the rows span (``max(token0 + length)``)
    heads: int  # query heads the rows span (``max(head0) + group``)


def block_tokens(group: int, block_m: int) -> int:
    """Query tokens per program: ``block_m`` tile rows over the group's query heads (padded to a power of two)."""
    return max(1, block_m // triton.next_power_of_2(group))


def plan_paged_prefill(token0: list[int], lengths: list[int], starts: list[int], head0: list[int], group: int,
                       device: torch.device | str, block_m: int = 128) -> PrefillPlan:
    """Rows and work items of a launch, from host ints per row (shapes as the module docstring). ``block_m``: query
    rows (tokens x group heads) per program; it must match ``paged_prefill``'s."""
    assert len(token0) == len(lengths) == len(starts) == len(head0), "one entry per row"
    assert all(n >= 1 for n in lengths) and all(s >= 0 for s in starts), "rows of at least one token, starts >= 0"
    assert 1 <= group <= 64, "1 to 64 query heads per KV head"
    bt = block_tokens(group, block_m)
    items = [(r, b) for r, n in enumerate(lengths) for b in range(-(-n // bt))]
    # heaviest first: the keys a work item reads grow with its last query position
    items.sort(key=lambda rb: -(starts[rb[0]] + min((rb[1] + 1) * bt, lengths[rb[0]])))
    flat = [x for row in zip(token0, lengths, starts, head0) for x in row] + [x for item in items for x in item]
    both = host_to_device(torch.tensor(flat, dtype=torch.int32), device)  # one host-to-device copy, asynchronous
    R = len(lengths)
    rows, work = both[: 4 * R].view(R, 4), both[4 * R :].view(-1, 2)
    return PrefillPlan(rows, work, group, bt,
                       max((s + n for s, n in zip(starts, lengths)), default=0),
                       max((t + n for t, n in zip(token0, lengths)), default=0), max(head0, default=-group) + group)


def default_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes and launch parameters by head_dim and dtype (``bench/dense_chunk_attention.py --paged`` times
    others). For 16-bit inputs, 128 query rows by 32 keys with 4 warps and 4 pipeline stages: on an H200 at Llama-3-8B
    shapes (8192-token chunks after 8K-128K keys) the fastest of the six timed, 8-17% under FlashAttention-2's
    128 x 64 tiles with 8 warps, and 0.90-0.91 of flash's time over a contiguous cache from 32K keys on
    (bench/results/paged_prefill_h200_c8192_2026-12-04.json); about 96 KB of shared memory, less than those tiles
    took. fp32 or a head_dim above 128: 64 x 32 tiles, 2 stages, so K, V and their stages fit."""
    if dtype == torch.float32 or head_dim > 128:
        return {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2}
    return {"block_m": 128, "block_n": 32, "num_warps": 4, "num_stages": 4}


def paged_prefill(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    plan: PrefillPlan,
    page_size: int,
    *,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> torch.Tensor:
    """Causal attention of the plan's rows (query chunks) over their pages, one launch.

    q: [T, Hq, D] (any token and head strides, D contiguous); k_pool, v_pool: [num_pages, page_size, D]; table:
    int32/int64 [R, pages] (row ``r``'s logical -> physical pages, covering its ``start + length`` keys). Returns
    [T, Hq, D] (into ``out`` when given, e.g. a strided view of a layer's output), written at the rows' tokens and
    query heads only. ``block_m`` must be the one the plan was made with (default: ``default_config``'s); the others
    only change speed."""
    T, Hq, D = q.shape
    cfg = default_config(D, k_pool.dtype)
    block_m = block_m or cfg["block_m"]
    block_n = block_n or cfg["block_n"]
    R = plan.rows.shape[0]
    assert k_pool.shape == v_pool.shape and k_pool.dim() == 3 and k_pool.shape[1:] == (page_size, D), \
        "k_pool, v_pool must be [num_pages, page_size, D] like q"
    assert table.dim() == 2 and table.shape[0] == R and table.dtype in (torch.int32, torch.int64), \
        "table must be int [R, pages]"
    assert table.shape[1] * page_size >= plan.max_keys, \
        f"table holds {table.shape[1]} pages per row, {plan.max_keys} keys need more"
    assert k_pool.stride(2) == 1 and v_pool.stride(2) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    assert page_size >= 1 and page_size & (page_size - 1) == 0 and block_n % page_size == 0, \
        "page_size: a power of 2 dividing block_n"
    assert D <= 256, "head_dim up to 256"
    assert block_tokens(plan.group, block_m) == plan.block_t, "plan made with another block_m"
    assert plan.tokens <= T and plan.heads <= Hq, f"rows span {plan.tokens} tokens, {plan.heads} heads; q is {q.shape}"
    assert plan.rows.device == q.device and plan.work.device == q.device and table.device == q.device
    if out is None:
        out = torch.empty_like(q)
    assert out.shape == q.shape and out.stride(2) == 1
    W = plan.work.shape[0]
    if W == 0:
        return out
    scale = D**-0.5 if scale is None else scale
    _paged_prefill_kernel[(W,)](
        q, k_pool, v_pool, table, plan.rows, plan.work, out, scale * _LOG2E,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), v_pool.stride(0), v_pool.stride(1),
        table.stride(0), out.stride(0), out.stride(1),
        GROUP=plan.group, BLOCK_H=triton.next_power_of_2(plan.group), BLOCK_T=plan.block_t, BLOCK_N=block_n,
        HEAD_DIM=D, BLOCK_D=triton.next_power_of_2(D), PAGE=page_size, INTERPRET=INTERPRET,
        IEEE=k_pool.dtype == torch.float32, num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"],
    )
    return out


# ----------------------------------------------------------------------------------------------- reference
def paged_prefill_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                            token0: list[int], lengths: list[int], starts: list[int], head0: list[int], group: int,
                            page_size: int, scale: float | None = None) -> torch.Tensor:
    """``paged_prefill`` in plain PyTorch, row by row: gather the row's ``start + length`` keys and values from its
    pages, then SDPA with the causal mask ``key <= query position``. Shapes as ``paged_prefill`` (rows as host
    lists); returns [T, Hq, D] in q's dtype, zero outside the rows."""
    D = q.shape[-1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for r, (t0, n, s, h0) in enumerate(zip(token0, lengths, starts, head0)):
        keys = s + n
        phys = table[r, : -(-keys // page_size)].long()
        k = k_pool[phys].reshape(-1, D)[:keys]  # [keys, D]
        v = v_pool[phys].reshape(-1, D)[:keys]
        qr = q[t0 : t0 + n, h0 : h0 + group].transpose(0, 1)  # [group, n, D]
        mask = torch.arange(keys, device=q.device)[None, :] <= torch.arange(s, s + n, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(qr, k.expand(group, keys, D), v.expand(group, keys, D), attn_mask=mask,
                                           scale=scale)
        out[t0 : t0 + n, h0 : h0 + group] = o.transpose(0, 1)
    return out


__all__ = ["PrefillPlan", "block_tokens", "default_config", "paged_prefill", "paged_prefill_reference",
           "plan_paged_prefill"]
