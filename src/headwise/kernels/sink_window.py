"""A ``streaming`` head's prompt chunk (sinks + recent window, token-exact) in one Triton kernel.

What it computes
    ``Streaming``'s prefill (``policies/streaming.py``): a chunk of ``L`` queries at positions ``q_start ..`` attends
    its head's held keys (the store's ring: the sinks and the last ``window`` positions before the chunk, each slot
    with its position) and the chunk's own keys, under ``Streaming.allowed``: key ``j`` is visible to the query at
    ``p`` iff ``0 <= j <= p`` and (``j < sink`` or ``p - j < window``). The plain-PyTorch path (``masked_attention``
    under one ``[L, S]`` mask over the ring and the chunk concatenated, or ``sink_window_banded``) is the reference.

Algorithm
    FlashAttention-2's forward (online softmax, fp32 accumulators, base-2 exponentials) with one program per (query
    tile of ``BLOCK_M`` rows, batch, query head); query head ``h`` reads KV head ``h // group``. A tile visits only
    the keys some row of it may see: the ring's sink slots (slots ``0 .. ring_sinks - 1``: the stores keep their
    sinks there) and, while a row of the tile lies within ``window`` of the chunk's start, the rest of the ring; the
    chunk's sink rows (when the chunk starts before ``sink``); and the chunk rows from ``window - 1`` before the
    tile's first row to its last. Every visited key is masked by position, so a slot's order does not matter and an
    empty slot (negative position) counts nothing. A chunk of 8192 queries after a ring of 320 keys with a window of
    256 reads about 384 keys per query, where the masked SDPA over the whole concatenation scores 8512 (and the
    banded path gathers, pads and repeats its bands first: four copies of the chunk's heads per layer).

    The queries, the chunk's keys and values are read where they lie (any batch, head and token strides; the last
    dimension contiguous), so a group of heads that is a view of the layer's heads is not copied first.

Limits
    ``head_dim`` up to 256; fp32, fp16 or bf16 (products in the input dtype with fp32 accumulation; fp32 in full
    fp32). Under TRITON_INTERPRET=1 products are done in fp32 (``paged_decode._dot``).

Tested
    tests/test_sink_window.py under TRITON_INTERPRET=1 against the masked reference: first chunks (empty ring), chunks
    that start inside the sinks, a ring that has wrapped, sink 0 (a native sliding window), windows shorter and
    longer than a tile, chunks that are not multiples of a tile, GQA 1:1 and 4:1, head_dim 16, 40 and 64, strided
    views of a layer's heads, a ring with empty slots; and the engine's prompt chunks on it (tests/test_paged_cache.py
    with kernels on: the same greedy tokens). Built ahead of time for sm_90 without spills (``default_config``); not
    yet run on a GPU (the tests marked ``gpu`` in tests/test_sink_window.py, 8192-token chunks at d 128 and 256).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.common import INTERPRET
from headwise.kernels.paged_decode import _LOG2E, _dot


@triton.jit
def _visit(
    q, k_ptr, v_ptr, stride_kn, stride_vn, n0, hi, kpos_ptr, pos0, qpos, m_i, l_i, acc, offs_n, offs_d, mask_d,
    sink, window, scale_log2e, FROM_RING: tl.constexpr, INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    """One online-softmax step over keys ``n0 .. n0 + BLOCK_N - 1`` (those below ``hi``): ring slots, whose positions
    are read from ``kpos_ptr`` (``FROM_RING``), or chunk rows at positions ``pos0 + n``."""
    n = n0 + offs_n
    k_ok = n < hi
    if FROM_RING:
        kpos = tl.load(kpos_ptr + n, mask=k_ok, other=-1)
    else:
        kpos = pos0 + n
    k = tl.load(k_ptr + n[:, None] * stride_kn + offs_d[None, :], mask=k_ok[:, None] & mask_d[None, :], other=0.0)
    v = tl.load(v_ptr + n[:, None] * stride_vn + offs_d[None, :], mask=k_ok[:, None] & mask_d[None, :], other=0.0)
    s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e
    kp = kpos[None, :]
    allowed = k_ok[None, :] & (kp >= 0) & (kp <= qpos[:, None]) & ((kp < sink) | (qpos[:, None] - kp < window))
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet: no inf - inf
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
    return m_new, l_i, acc


@triton.jit
def _sink_window_fwd(
    Q, K, V, RK, RV, RPOS, Out,
    sq_b, sq_h, sq_m, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
    srk_b, srk_h, srk_n, srv_b, srv_h, srv_n, so_b, so_h, so_m,
    n_q_heads, group, L, R, ring_sinks, q_start, sink, window, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    kvh = h // group
    r0 = tile * BLOCK_M  # the tile's first row of the chunk
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < L
    qpos = q_start + rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + offs_d[None, :],
                mask=row_ok[:, None] & mask_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # The ring: its sink slots always; its other slots (positions q_start - window .. q_start - 1 at most) only while
    # the tile's first row is within ``window - 1`` of one of them.
    ring_hi = ring_sinks
    if r0 <= window - 2:
        ring_hi = R
    rk = RK + b * srk_b + kvh * srk_h
    rv = RV + b * srv_b + kvh * srv_h
    ck = K + b * sk_b + kvh * sk_h
    cv = V + b * sv_b + kvh * sv_h
    last = tl.minimum(L, r0 + BLOCK_M)  # past the tile's last row: no key
    # The chunk's sink rows (a chunk that starts before ``sink``), then its rows within the window of the tile.
    sinks_hi = tl.minimum(tl.maximum(sink - q_start, 0), last)
    lo = tl.maximum(sinks_hi, r0 - window + 1)
    n_ring = (ring_hi + BLOCK_N - 1) // BLOCK_N
    n_sinks = (sinks_hi + BLOCK_N - 1) // BLOCK_N
    n_win = (tl.maximum(last - lo, 0) + BLOCK_N - 1) // BLOCK_N
    # Runtime trip counts; the interpreter takes no runtime ``range`` bound, hence its ``while`` (paged_prefill.py).
    if INTERPRET:
        i = 0
        while i < n_ring:
            m_i, l_i, acc = _visit(q, rk, rv, srk_n, srv_n, i * BLOCK_N, ring_hi, RPOS, 0, qpos, m_i, l_i, acc,
                                   offs_n, offs_d, mask_d, sink, window, scale_log2e, True, INTERPRET, IEEE)
            i += 1
        i = 0
        while i < n_sinks:
            m_i, l_i, acc = _visit(q, ck, cv, sk_n, sv_n, i * BLOCK_N, sinks_hi, RPOS, q_start, qpos, m_i, l_i, acc,
                                   offs_n, offs_d, mask_d, sink, window, scale_log2e, False, INTERPRET, IEEE)
            i += 1
        i = 0
        while i < n_win:
            m_i, l_i, acc = _visit(q, ck, cv, sk_n, sv_n, lo + i * BLOCK_N, last, RPOS, q_start, qpos, m_i, l_i,
                                   acc, offs_n, offs_d, mask_d, sink, window, scale_log2e, False, INTERPRET, IEEE)
            i += 1
    else:
        for i in range(0, n_ring):
            m_i, l_i, acc = _visit(q, rk, rv, srk_n, srv_n, i * BLOCK_N, ring_hi, RPOS, 0, qpos, m_i, l_i, acc,
                                   offs_n, offs_d, mask_d, sink, window, scale_log2e, True, INTERPRET, IEEE)
        for i in range(0, n_sinks):
            m_i, l_i, acc = _visit(q, ck, cv, sk_n, sv_n, i * BLOCK_N, sinks_hi, RPOS, q_start, qpos, m_i, l_i, acc,
                                   offs_n, offs_d, mask_d, sink, window, scale_log2e, False, INTERPRET, IEEE)
        for i in range(0, n_win):
            m_i, l_i, acc = _visit(q, ck, cv, sk_n, sv_n, lo + i * BLOCK_N, last, RPOS, q_start, qpos, m_i, l_i,
                                   acc, offs_n, offs_d, mask_d, sink, window, scale_log2e, False, INTERPRET, IEEE)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(Out + b * so_b + h * so_h + rows[:, None] * so_m + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & mask_d[None, :])


def default_config(head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles and launch settings, untuned on a GPU (a streaming chunk reads a few hundred keys per query, a small
    launch beside the layer's matrix products), chosen so that the sm_90 code, built ahead of time on a machine without
    a GPU (``triton.compile`` for ``GPUTarget("cuda", 90, 64)``, ``ptxas -v``), spills no register with its key loads
    pipelined: 64 x 32 tiles, 4 warps, 2 stages up to head_dim 128 (255 registers a thread in bf16); 32 x 32 at 256.
    fp32's full-precision products spill a little at any tile (16 x 32 the least): not a serving dtype."""
    if dtype == torch.float32 and not INTERPRET:  # (the interpreter has no registers: fewer, larger programs)
        return {"block_m": 16, "block_n": 32, "num_warps": 4, "num_stages": 1}
    return {"block_m": 64 if head_dim <= 128 else 32, "block_n": 32, "num_warps": 4, "num_stages": 2}


def sink_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    ring_k: torch.Tensor,
    ring_v: torch.Tensor,
    ring_pos: torch.Tensor,
    q_start: int,
    sink: int,
    window: int,
    scale: float | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """A streaming head's prompt chunk (Triton; module docstring).

    q: [B, Hq, L, D] at positions ``q_start ..``; k, v: [B, Hkv, L, D], the chunk's own keys and values; ring_k,
    ring_v: [B, Hkv, R, D], the keys held before the chunk, ``ring_pos`` int [R] their positions (negative: an empty
    slot), positions below ``sink`` in slots ``0 .. sink - 1`` only (as ``SinkWindowStore`` and ``PagedRingStore``
    keep them). Any strides with the last dimension contiguous. Returns [B, Hq, L, D] in q's dtype."""
    B, Hq, L, D = q.shape
    Hkv, R = ring_k.shape[1], ring_k.shape[2]
    assert k.shape == v.shape == (B, Hkv, L, D), f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert ring_k.shape == ring_v.shape == (B, Hkv, R, D), f"ring {tuple(ring_k.shape)}, {tuple(ring_v.shape)}"
    assert ring_pos.shape == (R,) and not ring_pos.is_floating_point(), "ring_pos: int [R]"
    assert Hq % Hkv == 0, f"query heads {Hq} must be a multiple of KV heads {Hkv}"
    assert D <= 256, "head_dim up to 256"
    assert all(t.stride(-1) == 1 for t in (q, k, v, ring_k, ring_v)), "the last dimension must be contiguous"
    assert q.dtype == k.dtype == v.dtype == ring_k.dtype == ring_v.dtype, "q, k, v and the ring must share a dtype"
    assert q_start >= 0 and sink >= 0 and window >= 1
    scale = D**-0.5 if scale is None else scale
    cfg = default_config(D, q.dtype) | (config or {})
    out = torch.empty(B, Hq, L, D, device=q.device, dtype=q.dtype)
    if B * Hq * L == 0:
        return out
    ring_pos = ring_pos.contiguous()
    bm = cfg["block_m"]
    _sink_window_fwd[(triton.cdiv(L, bm), B * Hq)](
        q, k, v, ring_k, ring_v, ring_pos, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), ring_k.stride(0), ring_k.stride(1), ring_k.stride(2),
        ring_v.stride(0), ring_v.stride(1), ring_v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Hq, Hq // Hkv, L, R, min(R, sink), q_start, sink, window, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=bm, BLOCK_N=cfg["block_n"],
        INTERPRET=INTERPRET, IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return out


def sink_window_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ring_k: torch.Tensor, ring_v: torch.Tensor,
    ring_pos: torch.Tensor, q_start: int, sink: int, window: int, scale: float | None = None,
) -> torch.Tensor:
    """``sink_window_attention`` in plain PyTorch, fp32: the ring and the chunk concatenated under one mask
    (``Streaming.allowed``, which also hides empty slots), ``masked_attention``. Returns q's dtype."""
    from headwise.policies.base import masked_attention
    from headwise.policies.streaming import Streaming

    L, D = q.shape[2], q.shape[3]
    scale = D**-0.5 if scale is None else scale
    new_pos = torch.arange(q_start, q_start + L, device=q.device)
    k_pos = torch.cat([ring_pos.to(q.device, torch.long), new_pos])
    mask = Streaming(sink=sink, window=window).allowed(new_pos[:, None], k_pos[None, :])
    keys, values = torch.cat([ring_k, k], dim=2).float(), torch.cat([ring_v, v], dim=2).float()
    return masked_attention(q.float(), keys, values, mask, scale).to(q.dtype)


__all__ = ["default_config", "sink_window_attention", "sink_window_reference"]
