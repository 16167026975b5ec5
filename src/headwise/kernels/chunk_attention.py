"""LongHeads' attention over each query's chosen chunks (``policies/longheads.py``), in Triton, and its reference.

Layout
    ``q_slots: [B, Ht, G, Lb, n, D]``: ``Ht`` *choosers* of ``G`` query heads each, for ``Lb`` queries, rotated once per
    slot ``s`` of the ``n`` chunks the query attends (the query as seen from slot ``s``'s re-assigned positions; the
    policy makes them). A chooser is a KV head's whole group (``Ht = Hkv``) or one of its query heads (``Ht = Hkv *
    group``, ``G = 1``): choosers ``h * Ht / Hkv ..`` read KV head ``h``. ``keys, values: [B, Hkv, T, D]``: the store's
    ``T`` tokens (any strides, ``D`` contiguous), chunk ``c`` being tokens ``c * C .. c * C + C - 1``; ``T`` need not
    be a whole number of chunks (the store holds the tokens it has, no more: its newest chunk is partial). ``table:
    [B, Ht, Lb, n]``: chunk index of every slot, per chooser; the last slot is the query's own chunk, of which only
    offsets ``<= own[i]`` are visible (``own: [Lb]``, the query's offset in it); every other slot is a whole chunk.
    Tokens at or past ``T`` are never read. Output ``[B, Ht * G, Lb, D]`` (query heads in the model's order).

Algorithm
    One program per (query, batch row x chooser): the chooser's ``G`` query heads as the rows of one tile (padded to
    16), the chosen chunks read in place through its table, ``BLOCK_C`` keys at a time, with an online softmax in fp32
    (Flash-attention's). The reference gathers the chunks (``Lb * n * C * D`` elements, which is what made the plain
    prefill slow: docs/ARCHITECTURE.md) and applies one softmax over them.

Limits
    ``D`` up to 256, ``G`` up to 64; fp32, fp16 or bf16 with fp32 accumulation (fp32 stores multiply in full fp32).
    Under TRITON_INTERPRET=1 bf16 products are done in fp32 (``paged_decode._dot``): the interpreter checks the
    indexing and the softmax, the GPU the bf16 numerics.

Tested
    tests/test_chunk_attention.py: kernel against reference under the interpreter on awkward shapes (D 40, G 3,
    chunks of 24 tokens with a partial tile, one query's own chunk at its first and last offsets, a store ending
    inside its newest chunk), and the policy's prefill with the kernel against without.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is an optional (GPU) dependency; the reference needs only torch.
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAVE_TRITON = False

__all__ = ["chosen_chunk_attention", "chosen_chunk_attention_ref"]


def chosen_chunk_attention_ref(q_slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                               own: torch.Tensor, scale: float, chunk_size: int) -> torch.Tensor:
    """Plain PyTorch: the chunks gathered, one softmax over every slot's keys (module docstring for the shapes)."""
    B, Ht, G, Lb, n, D = q_slots.shape
    C, T = chunk_size, keys.shape[2]
    bi = torch.arange(B, device=keys.device).view(B, 1, 1, 1, 1)
    hi = torch.arange(Ht, device=keys.device).view(1, Ht, 1, 1, 1) // (Ht // keys.shape[1])  # each chooser's KV head
    token = table[..., None].long() * C + torch.arange(C, device=keys.device)  # [B, Ht, Lb, n, C]
    held = token.clamp(max=T - 1)  # past the store's tokens: masked below
    k, v = keys[bi, hi, held], values[bi, hi, held]  # [B, Ht, Lb, n, C, D]
    # Batched matmuls over the gathered blocks: [.., C, D] @ [.., D, G].
    logits = torch.matmul(k, q_slots.to(k.dtype).permute(0, 1, 3, 4, 5, 2)).float() * scale  # [B, Ht, Lb, n, C, G]
    future = torch.zeros(Lb, n, C, dtype=torch.bool, device=keys.device)
    future[:, -1] = torch.arange(C, device=keys.device)[None, :] > own[:, None]  # own chunk: offsets up to the query's
    hidden = future[None, None] | (token >= T)  # past the store's tokens: never visible
    logits = logits.masked_fill(hidden[..., None], -math.inf)
    probs = torch.softmax(logits.view(B, Ht, Lb, n * C, G), dim=3).to(v.dtype)
    out = torch.matmul(probs.transpose(-1, -2), v.reshape(B, Ht, Lb, n * C, D))  # [B, Ht, Lb, G, D]
    return out.permute(0, 1, 3, 2, 4).reshape(B, Ht * G, Lb, D).to(q_slots.dtype)


if HAVE_TRITON:
    from headwise.kernels.common import INTERPRET
    from headwise.kernels.paged_decode import _dot

    @triton.jit
    def _chunk_tile(q, k_base, v_base, t0, visible, sk_t, sv_t, scale, m_i, l_i, acc, offs_c, offs_d, d_ok,
                    INTERPRET: tl.constexpr, IEEE: tl.constexpr):
        """One tile of ``BLOCK_C`` keys of a chosen chunk (offsets ``t0 ..``, those ``>= visible`` masked) into the
        online softmax of the query heads ``q: [BLOCK_G, BLOCK_D]``."""
        t = t0 + offs_c
        t_ok = t < visible
        k = tl.load(k_base + t[:, None] * sk_t + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        qk = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale
        qk = tl.where(t_ok[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing visible yet (never after slot 0's tile)
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + t[:, None] * sv_t + offs_d[None, :], mask=t_ok[:, None] & d_ok[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p, v, INTERPRET, IEEE)
        return m_new, l_i, acc

    @triton.jit
    def _chosen_chunks_fwd(
        Q, K, V, T, Own, Out,
        sq_b, sq_h, sq_g, sq_l, sq_s,
        sk_b, sk_h, sk_t,
        sv_b, sv_h, sv_t,
        st_b, st_h, st_l,
        so_b, so_h, so_l,
        Ht, per_kv, G, D, C, n_tokens, n_slots, scale,
        BLOCK_G: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
        INTERPRET: tl.constexpr, IEEE: tl.constexpr,
    ):
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // Ht
        h = bh % Ht  # the chooser; it reads KV head h // per_kv
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        offs_c = tl.arange(0, BLOCK_C)
        g_ok = offs_g < G
        d_ok = offs_d < D
        own = tl.load(Own + i)
        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        q_base = Q + b * sq_b + h * sq_h + i * sq_l
        # Triton's interpreter (numpy >= 2.4) takes no runtime ``range`` bound: ``while`` loops, as paged_decode.py
        s = 0
        while s < n_slots:
            chunk = tl.load(T + b * st_b + h * st_h + i * st_l + s).to(tl.int64)
            q = tl.load(q_base + s * sq_s + offs_g[:, None] * sq_g + offs_d[None, :],
                        mask=g_ok[:, None] & d_ok[None, :], other=0.0)
            visible = tl.where(s == n_slots - 1, own + 1, C)  # the query's own chunk: offsets up to its own
            visible = tl.minimum(visible, n_tokens - chunk * C)  # never a token past the store's
            k_base = K + b * sk_b + (h // per_kv) * sk_h + chunk * C * sk_t
            v_base = V + b * sv_b + (h // per_kv) * sv_h + chunk * C * sv_t
            if INTERPRET:
                t0 = 0
                while t0 < C:
                    m_i, l_i, acc = _chunk_tile(q, k_base, v_base, t0, visible, sk_t, sv_t, scale, m_i, l_i, acc,
                                                offs_c, offs_d, d_ok, INTERPRET, IEEE)
                    t0 += BLOCK_C
            else:
                for t0 in range(0, C, BLOCK_C):
                    m_i, l_i, acc = _chunk_tile(q, k_base, v_base, t0, visible, sk_t, sv_t, scale, m_i, l_i, acc,
                                                offs_c, offs_d, d_ok, INTERPRET, IEEE)
            s += 1
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptr = Out + b * so_b + (h * G + offs_g)[:, None] * so_h + i * so_l + offs_d[None, :]
        tl.store(o_ptr, out.to(Out.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def chosen_chunk_attention(q_slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, table: torch.Tensor,
                           own: torch.Tensor, scale: float, chunk_size: int, block_c: int = 64) -> torch.Tensor:
    """The Triton kernel (module docstring); same arguments and result as ``chosen_chunk_attention_ref``."""
    if not HAVE_TRITON:
        raise RuntimeError("chosen_chunk_attention needs triton; use chosen_chunk_attention_ref without it")
    B, Ht, G, Lb, n, D = q_slots.shape
    Bk, Hk, T, Dk = keys.shape
    C = chunk_size
    assert (Bk, Dk) == (B, D) and Ht % Hk == 0 and values.shape == keys.shape, \
        f"q {tuple(q_slots.shape)}, k {tuple(keys.shape)}"
    assert tuple(table.shape) == (B, Ht, Lb, n) and tuple(own.shape) == (Lb,), "table [B, Ht, Lb, n], own [Lb]"
    assert D <= 256 and G <= 64, f"head_dim {D} (<= 256) and {G} query heads per KV head (<= 64)"
    assert keys.stride(-1) == 1 and values.stride(-1) == 1, "the keys' and values' last dimension must be contiguous"
    q_slots = q_slots.to(keys.dtype).contiguous()
    table = table.to(torch.int32).contiguous()
    own = own.to(torch.int32).contiguous()
    out = torch.empty(B, Ht * G, Lb, D, device=keys.device, dtype=keys.dtype)
    if Lb == 0 or B * Ht == 0:
        return out
    block_c = min(block_c, max(16, triton.next_power_of_2(C)))
    _chosen_chunks_fwd[(Lb, B * Ht)](
        q_slots, keys, values, table, own, out,
        *q_slots.stride()[:5],
        *keys.stride()[:3],
        *values.stride()[:3],
        *table.stride()[:3],
        out.stride(0), out.stride(1), out.stride(2),
        Ht, Ht // Hk, G, D, C, T, n, scale,
        BLOCK_G=max(16, triton.next_power_of_2(G)), BLOCK_C=block_c, BLOCK_D=max(16, triton.next_power_of_2(D)),
        INTERPRET=INTERPRET, IEEE=keys.dtype == torch.float32, num_warps=4, num_stages=2,
    )
    return out
