"""Decode attention over a KIVI-quantized per-head KV cache, in Triton, with its plain-PyTorch reference.

Layout
    A quantized KV head holds its oldest ``n_quant`` tokens (a multiple of ``group``) as KIVI codes
    (``kernels/kv_quant.py``: keys per channel over runs of ``group`` tokens, values per token over runs of
    ``group`` channels, fp16 scales and zero points, 4-bit codes two per byte) and its newest ``n_res`` tokens in
    full precision (the residual): ``k_codes, v_codes: [B, H, n, ceil(D*bits/8)]`` uint8 (keys may take 8 bits
    over 4-bit values: ``QuantizedKV.key_bits``),
    ``k_scale, k_zero: [B, H, n / group, D]``, ``v_scale, v_zero: [B, H, n, ceil(D / group)]``.

Algorithm
    ``quant_decode`` is flash-decoding (Dao et al., 2023) over the concatenation "quantized tokens, then residual
    tokens": a 1-D grid of (sequence, KV head, split) programs, each walking its run of token positions
    ``BLOCK_N`` at a time. A block may straddle the boundary: its positions below ``n_quant`` load codes, scales
    and zeros and dequantize them in registers (fp32), the others load the residual rows; masked loads read only
    what each position needs, so no dequantized copy of the cache is ever written. The ``GROUP`` query heads of
    a KV head share one program (GQA packing). An online softmax runs over the blocks; with several splits each
    program writes its normalised partial output and log-sum-exp and a small kernel merges them.

Limits
    ``bits`` (and the keys' bits) 8 or 4; ``head_dim`` up to 256; up to 64 query heads per KV head; K/V residual and q in fp32,
    fp16 or bf16; accumulation fp32. Under TRITON_INTERPRET=1 the products run in fp32 (the interpreter's bf16
    dot is wrong), so the interpreter checks indexing, unpacking and the softmax; on a GPU the dequantized rows
    are rounded to q's dtype for tensor-core products, as the reference rounds its dequantized cache. With
    ``position`` and ``bounds`` the lengths are read from the device when the kernel runs, the launch sized for
    the buffers, so a CUDA graph can replay it (``QuantizedStore.append_at``). A sliding-window head (``quantized`` on a native
    sliding-window layer) passes ``first``, the index of its oldest visible token: the walk starts there, so a
    block may begin inside a key group (its params are indexed per token, not per block).

Tested
    tests/test_quant_decode.py under TRITON_INTERPRET=1 on the CPU: odd lengths, a residual alone, a quantized
    part alone, partial value channel groups (D = 80, group 32), batch 2, GQA 4:1 and 1:1, several splits, 8 and
    4 bits, a first visible token inside a group, in the residual, and at index 0, against an fp32 reference with
    flash-attention's tolerance (error <= 2x PyTorch's in the same dtype).
    Not yet run on a GPU.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from headwise.kernels.common import INTERPRET
from headwise.kernels.kv_quant import BITS, QuantizedKV, packed_dim
from headwise.kernels.kv_quant_triton import load_codes
from headwise.kernels.paged_decode import load_query_group, merge_splits, store_split

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 256  # splits of one launch (the merge, paged_decode.merge_splits, takes up to 512)


# ----------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, INTERPRET: tl.constexpr, IEEE: tl.constexpr):
    """``a @ b`` with fp32 accumulation: in fp32 under the interpreter (its bf16 dot is wrong), full fp32 products
    for fp32 inputs, else tensor cores in ``a``'s dtype."""
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    if IEEE:
        return tl.dot(a, b.to(a.dtype), input_precision="ieee")
    return tl.dot(a, b.to(a.dtype))


@triton.jit
def _quant_decode_kernel(
    Q, KC, KS, KZ, VC, VS, VZ, RK, RV, O_PART, LSE_PART, Out, POS, BOUNDS,
    n_quant, n_total, first, window, scale_log2e, n_kv_heads, tokens_per_split, iters_per_split, n_splits,
    stride_qb, stride_qh,
    stride_kcb, stride_kch, stride_kcn,
    stride_ksb, stride_ksh, stride_ksg,
    stride_vcb, stride_vch, stride_vcn,
    stride_vsb, stride_vsh, stride_vsn,
    stride_rkb, stride_rkh, stride_rkn,
    stride_rvb, stride_rvh, stride_rvn,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, QGROUP: tl.constexpr, BITS: tl.constexpr, K_BITS: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    INTERPRET: tl.constexpr, IEEE: tl.constexpr, DEV_LEN: tl.constexpr,
):
    if DEV_LEN:
        # Lengths on the device (CUDA-graph decode): the launch was sized for the buffers; the decoded token's
        # position and the store's bounds (its first quantized position, the first position of its residual)
        # give the valid indices now. Index 0 is position ``BOUNDS[0]``.
        pos = tl.load(POS).to(tl.int32)
        kept = tl.load(BOUNDS).to(tl.int32)
        n_quant = tl.load(BOUNDS + 1).to(tl.int32) - kept
        n_total = pos + 1 - kept
        first = tl.where(window > 0, tl.maximum(pos + 1 - window - kept, 0), 0)
    pid = tl.program_id(0)
    split = pid % n_splits
    bh = pid // n_splits
    b = bh // n_kv_heads
    h = bh % n_kv_heads
    q, q_rows, offs_d, mask_h, mask_d, m_i, l_i, acc = load_query_group(Q, b, h * GROUP, stride_qb, stride_qh, GROUP,
                                                                         HEAD_DIM, BLOCK_H, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    kc_base = KC + b * stride_kcb + h * stride_kch
    ks_base = KS + b * stride_ksb + h * stride_ksh
    kz_base = KZ + b * stride_ksb + h * stride_ksh
    vc_base = VC + b * stride_vcb + h * stride_vch
    vs_base = VS + b * stride_vsb + h * stride_vsh
    vz_base = VZ + b * stride_vsb + h * stride_vsh
    rk_base = RK + b * stride_rkb + h * stride_rkh
    rv_base = RV + b * stride_rvb + h * stride_rvh
    v_grp = offs_d // QGROUP  # the value channel group of every channel
    lo = first + split * tokens_per_split  # tokens before ``first`` (outside a sliding window) are never read
    hi = tl.minimum(lo + tokens_per_split, n_total)
    # Blocks up to ``hi`` only: with device lengths the launch is sized for the buffers, and a split past the
    # valid tokens (or its tail) need not walk them (a block with no valid token would leave the state unchanged).
    iters = tl.minimum(iters_per_split, (tl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N)
    it = 0
    while it < iters:  # a ``while``: the interpreter takes no runtime ``range`` bound
        tok = lo + it * BLOCK_N + offs_n
        valid = tok < hi
        in_q = valid & (tok < n_quant)
        in_r = valid & (tok >= n_quant)
        mq = in_q[:, None] & mask_d[None, :]
        mr = in_r[:, None] & mask_d[None, :]
        rtok = tok - n_quant
        # Keys: per-channel params of the token's group of QGROUP tokens.
        kgrp = tok // QGROUP
        ks = tl.load(ks_base + kgrp[:, None] * stride_ksg + offs_d[None, :], mask=mq, other=0.0).to(tl.float32)
        kz = tl.load(kz_base + kgrp[:, None] * stride_ksg + offs_d[None, :], mask=mq, other=0.0).to(tl.float32)
        k = load_codes(kc_base + tok[:, None] * stride_kcn, offs_d[None, :], mq, K_BITS).to(tl.float32) * ks + kz
        kr = tl.load(rk_base + rtok[:, None] * stride_rkn + offs_d[None, :], mask=mr, other=0.0).to(tl.float32)
        k = tl.where(in_q[:, None], k, kr)
        s = _dot(q, tl.trans(k), INTERPRET, IEEE) * scale_log2e  # [BLOCK_H, BLOCK_N], log2 domain
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        # Values: per-token params of the channel's group of QGROUP channels.
        vs = tl.load(vs_base + tok[:, None] * stride_vsn + v_grp[None, :], mask=mq, other=0.0).to(tl.float32)
        vz = tl.load(vz_base + tok[:, None] * stride_vsn + v_grp[None, :], mask=mq, other=0.0).to(tl.float32)
        v = load_codes(vc_base + tok[:, None] * stride_vcn, offs_d[None, :], mq, BITS).to(tl.float32) * vs + vz
        vr = tl.load(rv_base + rtok[:, None] * stride_rvn + offs_d[None, :], mask=mr, other=0.0).to(tl.float32)
        v = tl.where(in_q[:, None], v, vr)
        acc = acc * alpha[:, None] + _dot(p.to(q.dtype), v, INTERPRET, IEEE)
        m_i = m_new
        it += 1
    store_split(acc, m_i, l_i, Out, O_PART, LSE_PART, b, q_rows, split, offs_d, mask_h, mask_d,
                stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SINGLE_SPLIT)


# ----------------------------------------------------------------------------------------------- launcher
def _num_splits(work_items: int, n_total: int, block_n: int, device: torch.device) -> int:
    """About two programs per SM, never more splits than token blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    blocks = max(1, math.ceil(n_total / block_n))
    return max(1, min(blocks, math.ceil(2 * sms / max(1, work_items)), _MAX_SPLITS))


def quant_decode(
    q: torch.Tensor, kv: QuantizedKV, res_k: torch.Tensor, res_v: torch.Tensor, n_res: int,
    scale: float | None = None, first: int = 0, num_splits: int | None = None, block_n: int = 64,
    num_warps: int = 4, position: torch.Tensor | None = None, bounds: torch.Tensor | None = None, window: int = 0,
) -> torch.Tensor:
    """Attention of one new token over a quantized per-head cache plus its full-precision residual.

    q: [B, Hq, D] (GQA order); kv: the quantized part (its first ``kv.n_quant`` tokens, indices
    ``0 .. n_quant - 1``); res_k, res_v: [B, Hkv, >= n_res, D], indices ``n_quant .. n_quant + n_res - 1``.
    ``first``: the first index attended (a sliding window's oldest visible token; its group's codes stay stored,
    the earlier tokens of that group are skipped). Returns [B, Hq, D] in q's dtype. ``num_splits``, ``block_n`` and
    ``num_warps`` only change speed.

    Lengths on the device (CUDA-graph decode, ``QuantizedStore.append_at``): with ``position`` (one integer
    element, the decoded token's position) and ``bounds`` (integers ``[first kept position, first residual
    position]``, on q's device), ``kv.n_quant`` and ``n_res`` are only the room the launch is sized for (the
    buffers' capacities) and ``first`` must be 0; the kernel reads, when it runs, ``n_quant = bounds[1] -
    bounds[0]``, ``n_res = position + 1 - bounds[1]`` and, with ``window > 0``, the first visible index
    ``max(0, position + 1 - window - bounds[0])``. Nothing host-side then changes between steps, so a graph can
    replay the launch.
    """
    B, Hq, D = q.shape
    Hkv = res_k.shape[1]
    n_quant, bits, group = kv.n_quant, kv.bits, kv.group
    n_total = n_quant + n_res
    dev_len = position is not None and bounds is not None
    assert dev_len == (position is not None or bounds is not None), "position and bounds come together"
    if position is not None and bounds is not None:
        assert first == 0 and position.numel() == 1 and bounds.numel() == 2, "device lengths: first 0, 1 and 2 elements"
        assert position.device == q.device and bounds.device == q.device, "device lengths on q's device"
    assert bits in BITS and kv.k_bits in BITS and n_quant % group == 0 and 0 <= first < n_total
    assert res_k.shape[0] == B and res_k.shape[3] == D and res_v.shape == res_k.shape and res_k.shape[2] >= n_res
    assert kv.k_codes.shape[:2] == (B, Hkv) and kv.k_codes.shape[3] == packed_dim(D, kv.k_bits)
    assert kv.v_codes.shape[3] == packed_dim(D, bits)
    assert kv.k_codes.shape[2] >= n_quant and kv.v_codes.shape[2] >= n_quant
    assert kv.k_scale.shape[3] == D and kv.v_scale.shape[3] == -(-D // group)
    assert kv.k_scale.stride() == kv.k_zero.stride() and kv.v_scale.stride() == kv.v_zero.stride()
    assert Hq % Hkv == 0 and Hq // Hkv <= 64 and D <= 256, "at most 64 query heads per KV head, head_dim <= 256"
    for t in (q, res_k, res_v, kv.k_codes, kv.k_scale, kv.v_codes, kv.v_scale):
        assert t.stride(-1) == 1, "the last dimension must be contiguous"
    group_q = Hq // Hkv
    n_seen = n_total - first
    splits = min(num_splits or _num_splits(B * Hkv, n_seen, block_n, q.device), _MAX_SPLITS)
    tokens_per_split = math.ceil(math.ceil(n_seen / splits) / block_n) * block_n
    splits = math.ceil(n_seen / tokens_per_split)
    out = torch.empty_like(q)
    if splits > 1:
        o_part = torch.empty(B, Hq, splits, D, device=q.device, dtype=torch.float32)
        lse_part = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
    else:
        o_part = lse_part = out  # unused
    block_d = triton.next_power_of_2(D)
    _quant_decode_kernel[(B * Hkv * splits,)](
        q, kv.k_codes, kv.k_scale, kv.k_zero, kv.v_codes, kv.v_scale, kv.v_zero, res_k, res_v,
        o_part, lse_part, out, position if dev_len else out, bounds if dev_len else out,
        n_quant, n_total, first, window, (D**-0.5 if scale is None else scale) * _LOG2E, Hkv, tokens_per_split,
        tokens_per_split // block_n, splits,
        q.stride(0), q.stride(1),
        kv.k_codes.stride(0), kv.k_codes.stride(1), kv.k_codes.stride(2),
        kv.k_scale.stride(0), kv.k_scale.stride(1), kv.k_scale.stride(2),
        kv.v_codes.stride(0), kv.v_codes.stride(1), kv.v_codes.stride(2),
        kv.v_scale.stride(0), kv.v_scale.stride(1), kv.v_scale.stride(2),
        res_k.stride(0), res_k.stride(1), res_k.stride(2),
        res_v.stride(0), res_v.stride(1), res_v.stride(2),
        o_part.stride(0), o_part.stride(1), o_part.stride(2) if splits > 1 else 0,
        lse_part.stride(0), lse_part.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group_q, BLOCK_H=max(16, triton.next_power_of_2(group_q)), HEAD_DIM=D, BLOCK_D=block_d,
        BLOCK_N=block_n, QGROUP=group, BITS=bits, K_BITS=kv.k_bits, SINGLE_SPLIT=splits == 1, INTERPRET=INTERPRET,
        IEEE=q.dtype == torch.float32, DEV_LEN=dev_len, num_warps=num_warps,
    )
    if splits > 1:
        merge_splits(o_part, lse_part, out, splits)
    return out


def quant_decode_reference(
    q: torch.Tensor, kv: QuantizedKV, res_k: torch.Tensor, res_v: torch.Tensor, n_res: int,
    scale: float | None = None, first: int = 0,
) -> torch.Tensor:
    """Plain PyTorch ``quant_decode``: dequantize the cache into q's dtype, append the residual, drop the tokens
    before ``first``, and attend.

    Products in q's dtype, softmax in fp32, probabilities rounded to the dtype before ``@ V`` (as
    flash-attention's ``attention_ref``); pass an fp32 q (and residual) for the fp32 reference. Shapes as
    ``quant_decode``."""
    _, Hq, D = q.shape
    keys, values = kv.dequantize(D, q.dtype)
    keys = torch.cat([keys, res_k[:, :, :n_res].to(q.dtype)], dim=2)
    values = torch.cat([values, res_v[:, :, :n_res].to(q.dtype)], dim=2)
    keys, values = keys[:, :, first:], values[:, :, first:]
    group = Hq // keys.shape[1]
    kx, vx = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q, kx).float() * (D**-0.5 if scale is None else scale)
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhs,bhsd->bhd", probs.to(q.dtype), vx)


__all__ = ["quant_decode", "quant_decode_reference"]
