"""Dequantization of a KIVI-quantized KV head in one Triton launch per tensor, with ``kernels/kv_quant.py``'s
plain-PyTorch functions as its reference.

Why
    A ``quantized`` head prefills a prompt chunk by attending over everything it holds, so every chunk dequantizes
    the codes held so far (``QuantizedStore.view``). In PyTorch that is about a dozen launches per tensor (unpack the
    nibbles, widen, repeat the scales and zero points per token or channel, multiply, add, round to the model's
    dtype) and as many full-size fp32 intermediates; on a GPU at small batch the launches dominate (Gemma 3 270M
    dispatched 1.7x dense's ops per 512-token chunk, ``bench/results/quantized_prefill_dispatch_gemma3-270m_cpu_
    2026-12-04.json``), at long prompts the intermediates' memory traffic does. Here each program reads a tile of
    codes and their scales and zero points and writes the tile in the output dtype, straight into the buffer the
    chunk's attention reads (``QuantizedStore.view`` passes the first rows of its concatenation).

Layout
    As ``kv_quant``: codes ``[B, H, n, packed_dim]`` uint8 (4-bit: channel ``2j`` in the low nibble of byte ``j``),
    keys' scale and zero point per (run of ``group`` tokens, channel): ``[B, H, n / group, D]``; values' per (token,
    run of ``group`` channels): ``[B, H, n, ceil(D / group)]``; fp16. ``x = code * scale + zero`` in fp32, then
    rounded to the output's dtype, as the reference does (on a GPU the multiply-add may fuse, which can move the
    fp32 result by one unit in the last place; rounded to bf16 or fp16 it is almost always the same).

Tested
    tests/test_kv_dequant.py under TRITON_INTERPRET=1 on the CPU against ``dequantize_keys`` / ``dequantize_values``:
    8 and 4 bits, keys over values of other bits (k8v4), a head dimension that is not a multiple of the group (80
    over 32) nor of the tile, lengths that are not a multiple of the tile, batch 2 and 3 heads, non-contiguous
    outputs (a slice of a longer buffer), fp32 and bf16 outputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK_N = 32


@triton.jit
def _dequant_kernel(codes, scale, zero, out, H, n, D,
                    c_b, c_h, c_n, s_b, s_h, s_n, o_b, o_h, o_n,
                    BITS: tl.constexpr, GROUP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (sequence, head, run of ``BLOCK_N`` tokens) per program. ``PER_CHANNEL``: keys (params per token group
    and channel); else values (params per token and channel group)."""
    bh = tl.program_id(0)
    b = bh // H
    h = bh % H
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_n[:, None] < n) & (offs_d[None, :] < D)
    base = codes + b.to(tl.int64) * c_b + h.to(tl.int64) * c_h + offs_n[:, None].to(tl.int64) * c_n
    if BITS == 8:
        c = tl.load(base + offs_d[None, :], mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(base + offs_d[None, :] // 2, mask=mask, other=0).to(tl.int32)
        c = tl.where(offs_d[None, :] % 2 == 0, byte & 15, byte >> 4)
    pbase = b.to(tl.int64) * s_b + h.to(tl.int64) * s_h
    if PER_CHANNEL:
        p = pbase + (offs_n[:, None] // GROUP).to(tl.int64) * s_n + offs_d[None, :]
    else:
        p = pbase + offs_n[:, None].to(tl.int64) * s_n + offs_d[None, :] // GROUP
    s = tl.load(scale + p, mask=mask, other=1.0).to(tl.float32)
    z = tl.load(zero + p, mask=mask, other=0.0).to(tl.float32)
    x = c.to(tl.float32) * s + z
    dst = out + b.to(tl.int64) * o_b + h.to(tl.int64) * o_h + offs_n[:, None].to(tl.int64) * o_n + offs_d[None, :]
    tl.store(dst, x.to(out.dtype.element_ty), mask=mask)


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group: int, per_channel: bool) -> torch.Tensor:
    """Write the dequantized ``codes`` (``[B, H, n, packed_dim]``, the first ``n`` tokens of a buffer that may be
    longer) into ``out: [B, H, n, D]`` (any strides, unit stride on ``D``; the dtype it is rounded to). Keys
    (``per_channel``): ``scale, zero: [B, H, >= n / group, D]``; values: ``[B, H, >= n, ceil(D / group)]``.
    Returns ``out``."""
    B, H, n, D = out.shape
    if bits not in (4, 8):
        raise ValueError(f"codes are 8 or 4 bits, got {bits}")
    if n == 0 or B * H == 0:
        return out
    if out.stride(3) != 1 or codes.stride(3) != 1 or scale.stride(3) != 1 or zero.stride(3) != 1:
        raise ValueError("dequantize_into needs unit stride on the last dimension of every tensor")
    if scale.stride() != zero.stride():
        raise ValueError("scale and zero must share one layout")
    grid = (B * H, triton.cdiv(n, _BLOCK_N))
    _dequant_kernel[grid](codes, scale, zero, out, H, n, D,
                          codes.stride(0), codes.stride(1), codes.stride(2),
                          scale.stride(0), scale.stride(1), scale.stride(2),
                          out.stride(0), out.stride(1), out.stride(2),
                          BITS=bits, GROUP=group, PER_CHANNEL=per_channel,
                          BLOCK_N=_BLOCK_N, BLOCK_D=triton.next_power_of_2(D))
    return out
