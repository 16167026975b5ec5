"""Block-sparse causal attention with per-head block indices (prefill), in Triton.

Layers: ``_block_sparse_fwd`` (@triton.jit, ``_masked_tile`` for the tiles that need a mask) -> ``_launch``
(asserts, allocation, grid) -> the ``headwise::block_sparse_attention`` torch.library op (+ fake for
torch.compile) -> ``block_sparse_attention``.

Algorithm. FlashAttention-2 forward: one program per (query tile of ``BLOCK_M`` rows, batch, query head);
it walks only the key blocks listed for its query block, ``BLOCK_N`` keys at a time, with the online softmax
(running max ``m``, running sum ``l``, fp32 accumulator, base-2 exponentials with ``scale * log2(e)`` folded
in). Listed blocks that lie wholly at or before the tile's first query need no mask; since indices are sorted,
they are a prefix of the list, counted once per program, and run in a loop without masking. The remaining
blocks (the diagonal, and anything after it or past the end of the keys) run in a second loop that applies
the token-level causal mask ``key_pos <= query_pos`` and the key-length bound. Rows that see no key at all
output zeros (the reference does the same).

Index format (built by the caller; see ``policies/sparse_prefill.py`` for the builders). Queries of this call
sit at absolute positions ``q_offset .. q_offset + Lq - 1`` of the keys (chunked prefill). Query blocks are
*absolute*: row ``i`` of the index is query block ``q_offset // block_size + i``, covering positions
``[(q_offset // block_size + i) * block_size, ... + block_size)`` clipped to the chunk, so a pattern means the
same thing whatever the chunking. ``block_idx: int32 [Bi, Hi, n_q_blocks, max_blocks]`` lists absolute key
blocks (keys ``[kb * block_size, (kb + 1) * block_size)``), sorted ascending, padded with -1;
``block_count: int32 [Bi, Hi, n_q_blocks]`` says how many entries are valid. ``Bi`` is 1 (shared by the batch)
or B; ``Hi`` is 1 (shared by all heads), the number of KV heads, or the number of query heads.

Token columns (optional, ``col_idx`` / ``col_count``, indexed as the blocks: int32 [Bi, Hi, n_q_blocks,
max_cols], -1 padded, ``col_count`` valid entries first): single key positions a query block attends besides its
blocks, gathered ``BLOCK_N`` at a time into one tile (MInference's vertical columns, ``policies/vertical_slash.py``
``columns="tokens"``), causal per query. None may lie in a block its row lists (the key would count twice); a
program with no columns runs as before (``HAS_COLS`` is a compile-time switch).

Why indices may be per *query* head: MInference estimates vertical-slash and block patterns per query head,
and query heads that share a KV head (GQA) do attend differently; forcing one pattern per KV head would have
to take the union and lose sparsity. Each program loads its KV head's tiles, so query heads of one group
read the same K/V through L2. Per-KV-head (or shared) indices are accepted too and cost nothing extra.

Limits: head_dim in {16, 32, 64, 128, 256}; last dimension contiguous; fp16/bf16/fp32 inputs (dots run in
the input dtype with fp32 accumulation; fp32 dots use TF32 on the GPU); ``block_size`` a multiple of the kernel tiles ``BLOCK_M``/``BLOCK_N``;
forward only (no autograd).

Tested: ``tests/test_kernels_prefill.py`` against ``block_sparse_attention_ref`` under TRITON_INTERPRET=1 on
CPU (Lq 97 and 130, head_dim 64 and 128, GQA, q_offset > 0, per-head block counts, rows with only the
diagonal; token columns: heads with none, rows with more than a tile) and with the real kernel in bf16 on an H100
(same file, token columns included; plus the engine-level ``test_kernel_path_matches_reference_path_in_the_engine``).
At Llama-3-8B shapes the benchmark
(``headwise.bench.prefill``) checks it against the fp32 reference at 8K tokens (max error equal to plain
bf16 PyTorch's, 9.1e-3) and against FlexAttention on the same block mask at 128K.
"""

from __future__ import annotations

import torch

from headwise.kernels.prefill_index import (
    density,
    expand_index_heads,
    flex_block_mask,
    indices_to_mask,
    n_query_blocks,
)

try:  # Triton is an optional (GPU) dependency; the reference below needs only torch.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAVE_TRITON = False

_LOG2E = 1.4426950408889634
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# ---------------------------------------------------------------------------------------------- kernel
__all__ = [
    "SUPPORTED_HEAD_DIMS",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "density",
    "flex_block_mask",
    "indices_to_mask",
    "n_query_blocks",
]

if HAVE_TRITON:

    @triton.jit
    def _masked_tile(q, k_base, v_base, kpos, k_ok, offs_m, offs_d, sk_n, sv_n, scale_log2e, m_i, l_i, acc):
        """One key tile at positions ``kpos`` (those with ``k_ok`` exist) into the online softmax, each query row
        seeing only keys at or before it; returns the new (m_i, l_i, acc)."""
        k = tl.load(k_base + kpos[:, None] * sk_n + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        v = tl.load(v_base + kpos[:, None] * sv_n + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k)) * scale_log2e
        allowed = (kpos[None, :] <= offs_m[:, None]) & k_ok[None, :]
        qk = tl.where(allowed, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Out, BlockIdx, BlockCount, ColIdx, ColCount,
        sq_b, sq_h, sq_m,
        sk_b, sk_h, sk_n,
        sv_b, sv_h, sv_n,
        so_b, so_h, so_m,
        si_b, si_h, si_q,
        sc_b, sc_h,
        sj_b, sj_h, sj_q,
        scc_b, scc_h,
        n_q_heads, group, idx_head_div, Lq, Lk, q_offset, first_qblock, n_tiles, scale_log2e,
        HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr,
        HAS_COLS: tl.constexpr,
    ):
        SUB: tl.constexpr = BLOCK_SIZE // BLOCK_N  # kernel key tiles per index block
        tile = n_tiles - 1 - tl.program_id(0)  # later (usually heavier) tiles first
        bh = tl.program_id(1)
        b = bh // n_q_heads
        h = bh % n_q_heads
        kvh = h // group
        ih = h // idx_head_div

        tile0 = (q_offset // BLOCK_M + tile) * BLOCK_M  # absolute position of the tile's first row
        offs_m = tile0 + tl.arange(0, BLOCK_M)  # absolute query positions
        rows = offs_m - q_offset  # rows of this call's q
        row_ok = (rows >= 0) & (rows < Lq)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_n = tl.arange(0, BLOCK_N)

        q = tl.load(Q + b * sq_b + h * sq_h + rows[:, None] * sq_m + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        k_base = K + b * sk_b + kvh * sk_h
        v_base = V + b * sv_b + kvh * sv_h

        qrow = tile0 // BLOCK_SIZE - first_qblock
        idx_row = BlockIdx + b * si_b + ih * si_h + qrow * si_q
        count = tl.load(BlockCount + b * sc_b + ih * sc_h + qrow)

        # Blocks needing no mask: wholly at or before the tile's first query and inside the keys. Sorted
        # indices make them a prefix; count them 64 entries at a time.
        limit = tl.minimum(tile0 + 1, Lk) // BLOCK_SIZE
        n_full = tl.zeros([], dtype=tl.int32)
        for c in range(0, count, 64):
            offs_c = c + tl.arange(0, 64)
            kb = tl.load(idx_row + offs_c, mask=offs_c < count, other=2147483647)
            n_full += tl.sum((kb < limit).to(tl.int32))

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

        for t in range(0, n_full * SUB):
            kb = tl.load(idx_row + t // SUB)
            n0 = kb * BLOCK_SIZE + (t % SUB) * BLOCK_N
            k = tl.load(k_base + (n0 + offs_n)[:, None] * sk_n + offs_d[None, :])
            v = tl.load(v_base + (n0 + offs_n)[:, None] * sv_n + offs_d[None, :])
            qk = tl.dot(q, tl.trans(k)) * scale_log2e
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.math.exp2(qk - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new

        for t in range(n_full * SUB, count * SUB):
            kb = tl.load(idx_row + t // SUB)
            kpos = kb * BLOCK_SIZE + (t % SUB) * BLOCK_N + offs_n
            m_i, l_i, acc = _masked_tile(q, k_base, v_base, kpos, kpos < Lk, offs_m, offs_d, sk_n, sv_n, scale_log2e,
                                         m_i, l_i, acc)

        if HAS_COLS:  # token columns (MInference's verticals): gathered BLOCK_N keys at a time, each row causal
            col_row = ColIdx + b * sj_b + ih * sj_h + qrow * sj_q
            ccount = tl.load(ColCount + b * scc_b + ih * scc_h + qrow)
            for c0 in range(0, ccount, BLOCK_N):
                c_ok = c0 + offs_n < ccount
                kpos = tl.load(col_row + c0 + offs_n, mask=c_ok, other=0)
                c_ok = c_ok & (kpos >= 0) & (kpos < Lk)
                m_i, l_i, acc = _masked_tile(q, k_base, v_base, kpos, c_ok, offs_m, offs_d, sk_n, sv_n, scale_log2e,
                                             m_i, l_i, acc)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        o_ptr = Out + b * so_b + h * so_h + rows[:, None] * so_m + offs_d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


# ---------------------------------------------------------------------------------------------- launcher
def default_config(head_dim: int, block_size: int) -> dict[str, int]:
    """Kernel tiles and launch settings, measured on an H100 at 128K tokens, head_dim 128 (the "tune" rows of
    bench/results/prefill_2026-11-23*.json): blocks of 128 -> 128x128 tiles, 8 warps, 3 stages (17.7 ms vs
    18.7 ms for 128x64 and 19.3 ms for 64x64); blocks of 64 -> 64x64 tiles, 4 warps, 3 stages (12.4 ms vs
    13.6 ms for 64x32 and 18.5 ms with 4 stages). Other head dims use the same rule, untuned."""
    big = block_size % 128 == 0 and head_dim <= 128
    block_m = block_n = 128 if big else min(64, block_size)
    return {"block_m": block_m, "block_n": block_n, "num_warps": 8 if big else 4, "num_stages": 3 if head_dim <= 128 else 2}


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_offset: int,
    scale: float,
    config: dict[str, int] | None = None,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Check shapes, allocate the output, pick the grid and run the kernel. Shapes as in the public function."""
    if not HAVE_TRITON:
        raise RuntimeError("block_sparse_attention needs triton; use block_sparse_attention_ref on CPU")
    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    assert v.shape == k.shape and Bk == B and Dk == D, f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    assert Hq % Hkv == 0, f"query heads {Hq} must be a multiple of KV heads {Hkv}"
    assert D in SUPPORTED_HEAD_DIMS, f"head_dim {D} not supported (one of {SUPPORTED_HEAD_DIMS})"
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dimension must be contiguous"
    assert q.dtype == k.dtype == v.dtype, "q, k, v must share a dtype"
    assert q_offset >= 0 and q_offset + Lq <= Lk, f"queries at {q_offset}..{q_offset + Lq - 1} need {Lk} >= that keys"
    nqb = n_query_blocks(Lq, q_offset, block_size)
    assert block_idx.dim() == 4 and block_count.dim() == 3, "block_idx [B, H, nqb, max], block_count [B, H, nqb]"
    Bi, Hi, nqb_i, _ = block_idx.shape
    assert tuple(block_count.shape) == (Bi, Hi, nqb_i), "block_count must match block_idx's leading dims"
    assert nqb_i == nqb, f"index has {nqb_i} query-block rows, {Lq} queries at offset {q_offset} need {nqb}"
    assert Bi in (1, B), f"index batch {Bi} must be 1 or {B}"
    assert Hi in (1, Hkv, Hq), f"index heads {Hi} must be 1, {Hkv} (KV heads) or {Hq} (query heads)"
    assert block_idx.dtype == torch.int32 and block_count.dtype == torch.int32, "indices must be int32"
    assert block_idx.stride(-1) == 1, "block_idx rows must be contiguous"
    has_cols = col_idx is not None
    if col_idx is not None:
        assert col_count is not None and col_idx.dim() == 4, "col_idx [B, H, nqb, max] needs col_count [B, H, nqb]"
        assert tuple(col_idx.shape[:3]) == (Bi, Hi, nqb_i) and tuple(col_count.shape) == (Bi, Hi, nqb_i), \
            "token columns must be indexed as the blocks are"
        assert col_idx.dtype == torch.int32 and col_count.dtype == torch.int32, "indices must be int32"
        assert col_idx.stride(-1) == 1, "col_idx rows must be contiguous"
    else:
        col_idx, col_count = block_idx, block_count  # not read (HAS_COLS=False)
    cfg = dict(default_config(D, block_size))
    if config:
        cfg.update(config)
    bm, bn = cfg["block_m"], cfg["block_n"]
    assert block_size % bm == 0 and block_size % bn == 0, f"block_size {block_size} must be a multiple of tiles {bm}x{bn}"

    out = torch.empty_like(q)
    n_tiles = n_query_blocks(Lq, q_offset, bm)
    grid = (n_tiles, B * Hq)
    _block_sparse_fwd[grid](
        q, k, v, out, block_idx, block_count, col_idx, col_count,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        block_idx.stride(0) if Bi > 1 else 0, block_idx.stride(1) if Hi > 1 else 0, block_idx.stride(2),
        block_count.stride(0) if Bi > 1 else 0, block_count.stride(1) if Hi > 1 else 0,
        col_idx.stride(0) if Bi > 1 else 0, col_idx.stride(1) if Hi > 1 else 0, col_idx.stride(2),
        col_count.stride(0) if Bi > 1 else 0, col_count.stride(1) if Hi > 1 else 0,
        Hq, Hq // Hkv, Hq // Hi, Lq, Lk, q_offset, q_offset // block_size, n_tiles, scale * _LOG2E,
        HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_SIZE=block_size, HAS_COLS=has_cols,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ---------------------------------------------------------------------------------------------- public
def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_offset: int = 0,
    scale: float | None = None,
    config: dict[str, int] | None = None,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of ``q`` over the listed key blocks only (Triton), and the listed token columns.

    q: [B, Hq, Lq, D] at absolute positions ``q_offset .. q_offset+Lq-1``; k, v: [B, Hkv, Lk, D] at positions
    ``0 .. Lk-1`` (query head h reads KV head ``h // (Hq // Hkv)``). block_idx: int32 [Bi, Hi, n_q_blocks,
    max_blocks], sorted, -1 padded; block_count: int32 [Bi, Hi, n_q_blocks] (module docstring: format).
    col_idx / col_count (optional, indexed as the blocks): single key positions each query block also attends,
    gathered ``block_n`` at a time (MInference's vertical columns); none may lie in a listed block of its row (a
    key would count twice). ``config`` overrides the kernel tiles (``block_m``, ``block_n``, ``num_warps``,
    ``num_stages``). Returns [B, Hq, Lq, D] in q's dtype.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cfg = config or {}
    return _block_sparse_op(
        q, k, v, block_idx, block_count, block_size, q_offset, scale,
        cfg.get("block_m", 0), cfg.get("block_n", 0), cfg.get("num_warps", 0), cfg.get("num_stages", 0),
        col_idx, col_count,
    )


# torch.library op, so the kernel can sit inside torch.compile'd code (opaque to the compiler, shape known).
# Tile settings travel as ints (0 = default) because op schemas take no dicts.
@torch.library.custom_op("headwise::block_sparse_attention", mutates_args=())
def _block_sparse_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_offset: int,
    scale: float,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    given = {"block_m": block_m, "block_n": block_n, "num_warps": num_warps, "num_stages": num_stages}
    config = {key: value for key, value in given.items() if value}
    return _launch(q, k, v, block_idx, block_count, block_size, q_offset, scale, config, col_idx, col_count)


@_block_sparse_op.register_fake
def _(q, k, v, block_idx, block_count, block_size, q_offset, scale, block_m, block_n, num_warps, num_stages,
      col_idx=None, col_count=None):
    return torch.empty_like(q)


def block_sparse_attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_idx: torch.Tensor,
    block_count: torch.Tensor,
    block_size: int,
    q_offset: int = 0,
    scale: float | None = None,
    col_idx: torch.Tensor | None = None,
    col_count: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same computation in plain PyTorch, fp32: build the dense mask from the index, softmax, weighted sum.

    Shapes as ``block_sparse_attention``. Rows that may attend nothing give zeros. Returns q's dtype.
    """
    Hq, Lq, D = q.shape[1:]
    Hkv, Lk = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    mask = indices_to_mask(block_idx, block_count, block_size, Lq, Lk, q_offset, col_idx, col_count)
    mask = expand_index_heads(mask, Hq, Hkv)  # [Bi, Hq, Lq, Lk]
    kf = k.float().repeat_interleave(Hq // Hkv, dim=1)
    vf = v.float().repeat_interleave(Hq // Hkv, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), kf) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all-masked rows: 0, like the kernel
    return torch.einsum("bhqk,bhkd->bhqd", probs, vf).to(q.dtype)
