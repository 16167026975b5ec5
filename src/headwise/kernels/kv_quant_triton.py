"""KIVI quantization and dequantization of a KV head in one Triton launch per tensor, with ``kernels/kv_quant.py``'s
plain-PyTorch functions as their reference.

Why
    A ``quantized`` head prefills a prompt chunk by attending over everything it holds, so every chunk dequantizes
    the codes held so far (``QuantizedStore.view``), and the groups that leave its residual are quantized
    (``QuantizedStore._quantize``). In PyTorch each is about a dozen launches per tensor (min and max, the fp16
    parameters, divide, round, clamp, pack the nibbles; or unpack, widen, repeat the parameters per token or
    channel, multiply, add, round to the model's dtype) and as many full-size fp32 intermediates. On a GPU at
    small batch the launches dominate (Gemma 3 270M dispatched 1.7x dense's ops per 512-token chunk,
    ``bench/results/quantized_prefill_dispatch_gemma3-270m_cpu_2026-12-04.json``), at long prompts the
    intermediates' memory traffic does. Here a program reads a tile once and writes its codes and parameters, or
    its dequantized values straight into the buffer the chunk's attention reads (``QuantizedStore.view`` passes the
    first rows of its concatenation).

Layout and rounding
    As ``kv_quant``: codes ``[B, H, n, packed_dim]`` uint8 (4-bit: channel ``2j`` in the low nibble of byte ``j``;
    2-bit: four per byte),
    keys' scale and zero point per (run of ``group`` tokens, channel): ``[B, H, n / group, D]``; values' per (token,
    run of ``group`` channels): ``[B, H, n, ceil(D / group)]``; fp16. Quantization follows ``kv_quant._params`` and
    ``_codes`` operation for operation: the zero point is the minimum rounded to fp16 and stepped down one fp16 value
    where that rounded up (``nextafter`` by the bits), the scale the range over ``2^bits - 1`` times ``1 + 2^-10``
    rounded to fp16 (1 where not positive), the code ``(x - zero) / scale`` rounded half to even (IEEE divisions,
    ``div_rn``), clamped; so the codes and parameters equal the reference's bit for bit. Dequantization is
    ``code * scale + zero`` in fp32, then rounded to the output's dtype, as the reference does (on a GPU the
    multiply-add may fuse, which can move the fp32 result by one unit in the last place; rounded to bf16 or fp16 it
    is almost always the same). ``group`` must be a power of two for quantization (KIVI's 32; others use the
    reference).

Tested
    tests/test_kv_quant_triton.py under TRITON_INTERPRET=1 on the CPU against ``kv_quant``: codes and parameters
    equal, dequantized values within rounding; 8, 4 and 2 bits, keys over values of other bits (k8v4), head dimensions
    that are not a multiple of the group (80 over 32, 40) nor even, lengths that are not a multiple of the tile,
    batch 2 and 3 heads, slices of longer buffers, fp32 and bf16 inputs and outputs; and the store's view and
    quantization against the PyTorch path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from headwise.kernels.common import KV_CODE_BITS as BITS

_BLOCK_N = 32


@triton.jit
def _params(lo, hi, BITS: tl.constexpr):
    """``kv_quant._params`` on fp32 ``lo, hi``: fp16 (scale, zero)."""
    empty = lo > hi  # a channel or run past the head dimension (no elements): parameters of 0, never stored
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, 0.0, hi)
    z = lo.to(tl.float16)
    zb = z.to(tl.int16, bitcast=True).to(tl.int32)
    # nextafter(z, -inf) by the bits: a positive value's bits step down, a negative one's up, +-0 goes to -2^-24
    below = tl.where(z > 0, zb - 1, tl.where(z < 0, zb + 1, -32767)).to(tl.int16).to(tl.float16, bitcast=True)
    z = tl.where(z.to(tl.float32) > lo, below, z)
    s = (tl.math.div_rn(hi - z.to(tl.float32), tl.full(hi.shape, 2**BITS - 1, tl.float32))
         * (1 + 2**-10)).to(tl.float16)
    s = tl.where(s > 0, s, tl.full(s.shape, 1.0, tl.float16))
    return s, z


@triton.jit
def _codes(x, scale, zero, BITS: tl.constexpr):
    """``kv_quant._codes``: ``round((x - zero) / scale)`` half to even, clamped to ``[0, 2^bits - 1]``, as int32."""
    t = tl.math.div_rn(x - zero.to(tl.float32), scale.to(tl.float32))
    r = tl.floor(t)
    f = t - r  # exact: t and its floor share their exponent's range
    odd = (r.to(tl.int32) & 1) == 1
    r = r + tl.where((f > 0.5) | ((f == 0.5) & odd), 1.0, 0.0)
    return tl.minimum(tl.maximum(r, 0.0), 2**BITS - 1).to(tl.int32)


@triton.jit
def _store_codes(dst, codes, rows, cols, row_ok, P, W: tl.constexpr, BITS: tl.constexpr):
    """Store int32 ``codes [R, W]`` as uint8 at ``dst + rows * stride + byte`` (``rows``: [R, 1] row offsets,
    int64; ``row_ok``: [R, 1] rows to write): one per byte at 8 bits, channel ``2j`` low and ``2j + 1`` high in byte
    ``j`` at 4 bits (``W`` even), channel ``4j + i`` in bits ``2i ..`` of byte ``j`` at 2 bits (``W`` a multiple of 4)."""
    if BITS == 8:
        tl.store(dst + rows + cols[None, :], codes.to(tl.uint8), mask=row_ok & (cols[None, :] < P))
    elif BITS == 4:
        lo, hi = tl.split(tl.reshape(codes, (codes.shape[0], W // 2, 2)))
        byte = tl.arange(0, W // 2)
        tl.store(dst + rows + byte[None, :], (lo | (hi << 4)).to(tl.uint8), mask=row_ok & (byte[None, :] < P))
    else:
        even, odd = tl.split(tl.reshape(codes, (codes.shape[0], W // 4, 2, 2)))  # channels 4j + {0, 2}, 4j + {1, 3}
        c0, c2 = tl.split(even)
        c1, c3 = tl.split(odd)
        byte = tl.arange(0, W // 4)
        tl.store(dst + rows + byte[None, :], (c0 | (c1 << 2) | (c2 << 4) | (c3 << 6)).to(tl.uint8),
                 mask=row_ok & (byte[None, :] < P))


@triton.jit
def _quant_keys_kernel(x, codes, scale, zero, H, D, P,
                       x_b, x_h, x_n, c_b, c_h, c_n, s_b, s_h, s_n,
                       BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    """One (sequence, head, group of ``GROUP`` tokens) per program: per-channel parameters over the group."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    tok = g * GROUP + tl.arange(0, GROUP)
    ch = tl.arange(0, BLOCK_D)
    valid = ch[None, :] < D
    v = tl.load(x + b * x_b + h * x_h + tok[:, None] * x_n + ch[None, :], mask=valid, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(valid, v, float("inf")), axis=0)
    hi = tl.max(tl.where(valid, v, float("-inf")), axis=0)
    s, z = _params(lo, hi, BITS)
    p = b * s_b + h * s_h + g * s_n + ch
    tl.store(scale + p, s, mask=ch < D)
    tl.store(zero + p, z, mask=ch < D)
    c = tl.where(valid, _codes(v, s[None, :], z[None, :], BITS), 0)
    _store_codes(codes + b * c_b + h * c_h, c, tok[:, None] * c_n, tl.arange(0, BLOCK_D), tok[:, None] >= 0, P,
                 BLOCK_D, BITS)


@triton.jit
def _quant_values_kernel(x, codes, scale, zero, H, n, D, P, NG,
                         x_b, x_h, x_n, c_b, c_h, c_n, s_b, s_h, s_n,
                         BITS: tl.constexpr, GROUP: tl.constexpr, RUNS: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (sequence, head, run of ``BLOCK_N`` tokens) per program: per-token parameters over runs of ``GROUP``
    channels (``RUNS``, a power of two, covers the ``NG`` runs of ``D`` channels)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    tok = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ch = tl.arange(0, RUNS * GROUP)
    rows = tok[:, None] < n
    valid = rows & (ch[None, :] < D)
    v = tl.load(x + b * x_b + h * x_h + tok[:, None] * x_n + ch[None, :], mask=valid, other=0.0).to(tl.float32)
    v3 = tl.reshape(v, (BLOCK_N, RUNS, GROUP))
    in3 = tl.reshape(valid, (BLOCK_N, RUNS, GROUP))
    lo = tl.min(tl.where(in3, v3, float("inf")), axis=2)
    hi = tl.max(tl.where(in3, v3, float("-inf")), axis=2)
    s, z = _params(lo, hi, BITS)
    run = tl.arange(0, RUNS)
    p = b * s_b + h * s_h + tok[:, None] * s_n + run[None, :]
    tl.store(scale + p, s, mask=rows & (run[None, :] < NG))
    tl.store(zero + p, z, mask=rows & (run[None, :] < NG))
    c3 = _codes(v3, s[:, :, None], z[:, :, None], BITS)
    c = tl.where(valid, tl.reshape(c3, (BLOCK_N, RUNS * GROUP)), 0)
    _store_codes(codes + b * c_b + h * c_h, c, tok[:, None] * c_n, ch, rows, P, RUNS * GROUP, BITS)


@triton.jit
def load_codes(rows, offs_d, mask, BITS: tl.constexpr):
    """int32 codes of rows ``rows`` (``[R, 1]`` byte pointers) at channels ``offs_d`` (``[1, C]``), ``kv_quant.pack``'s
    layout: a byte each at 8 bits; at 4 and 2 bits, bits ``(d % m) * BITS ..`` of byte ``d // m`` (``m = 8 / BITS``).
    Shared by the dequantize kernel here and the decode kernel (``quant_decode.py``)."""
    if BITS == 8:
        return tl.load(rows + offs_d, mask=mask, other=0).to(tl.int32)
    M: tl.constexpr = 8 // BITS
    byte = tl.load(rows + offs_d // M, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs_d % M) * BITS)) & (2**BITS - 1)


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
    c = load_codes(base, offs_d[None, :], mask, BITS)
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


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"codes are 8, 4 or 2 bits, got {bits}")


def dequantize_into(out: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group: int, per_channel: bool) -> torch.Tensor:
    """Write the dequantized ``codes`` (``[B, H, n, packed_dim]``, the first ``n`` tokens of a buffer that may be
    longer) into ``out: [B, H, n, D]`` (any strides, unit stride on ``D``; the dtype it is rounded to). Keys
    (``per_channel``): ``scale, zero: [B, H, >= n / group, D]``; values: ``[B, H, >= n, ceil(D / group)]``.
    Returns ``out``."""
    B, H, n, D = out.shape
    _check_bits(bits)
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


def quantize_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor, bits: int,
                  group: int, per_channel: bool) -> None:
    """``kv_quant.quantize_keys`` (``per_channel``) or ``quantize_values`` of ``x: [B, H, n, D]`` written into
    ``codes: [B, H, n, packed_dim]`` and ``scale, zero`` (keys: ``[B, H, n / group, D]``, ``n`` a multiple of
    ``group``; values: ``[B, H, n, ceil(D / group)]``), which may be slices of longer buffers. ``group`` a power of
    two; unit stride on every last dimension."""
    B, H, n, D = x.shape
    _check_bits(bits)
    if group & (group - 1):
        raise ValueError(f"the Triton quantization needs a power-of-two group, got {group}")
    if per_channel and n % group:
        raise ValueError(f"keys are quantized in whole groups of {group} tokens, got {n}")
    if n == 0 or B * H == 0:
        return
    if any(t.stride(3) != 1 for t in (x, codes, scale, zero)) or scale.stride() != zero.stride():
        raise ValueError("quantize_into needs unit stride on every last dimension and one layout for scale and zero")
    args = (x.stride(0), x.stride(1), x.stride(2), codes.stride(0), codes.stride(1), codes.stride(2),
            scale.stride(0), scale.stride(1), scale.stride(2))
    P = codes.shape[3]
    if per_channel:
        width = max(4, triton.next_power_of_2(D))  # whole bytes at 2 bits
        _quant_keys_kernel[(B * H, n // group)](x, codes, scale, zero, H, D, P, *args, BITS=bits, GROUP=group,
                                                BLOCK_D=width)
    else:
        ng = -(-D // group)
        _quant_values_kernel[(B * H, triton.cdiv(n, _BLOCK_N))](x, codes, scale, zero, H, n, D, P, ng, *args,
                                                               BITS=bits, GROUP=group,
                                                               RUNS=triton.next_power_of_2(ng), BLOCK_N=_BLOCK_N)
