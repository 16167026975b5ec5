"""KIVI quantization of keys and values, in plain PyTorch: codes, fp16 scales and zero points, 4- and 2-bit packing.

KIVI (Liu et al., 2024, https://arxiv.org/abs/2402.02750) quantizes keys *per channel* (one scale and zero point
per channel per run of ``group`` consecutive tokens: key outliers live in fixed channels) and values *per token*
(one per token per run of ``group`` consecutive channels, the last run partial when ``group`` does not divide
``head_dim``). Scales and zero points are float16, as KIVI's; the zero point is the group's minimum rounded
*down* to float16 and the scale its range rounded *up*, so every code lies in ``[0, 2^bits - 1]`` and a
dequantized element errs by at most half its scale (float16 holds the parameters: keys and values beyond
+-65504 are not supported). Codes are uint8, one per byte at 8 bits, ``8 / bits`` per byte at 4 and 2 bits: channel
``m * j + i`` (``m = 8 / bits``) in bits ``i * bits ..`` of byte ``j``, so at 4 bits channel ``2j`` is the low nibble of
byte ``j`` and ``2j + 1`` the high one. ``x = code * scale + zero``. 2 bits is KIVI's own setting (KIVI-2).

Used by the ``quantized`` policy's store (``policies/quantized.py``) and by the Triton kernels' references
(``kernels/quant_decode.py``, ``kernels/kv_quant_triton.py``, which ``QuantizedKV.dequantize_into`` calls on a GPU);
no Triton here.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from headwise.kernels.common import KV_CODE_BITS

SCALE_DTYPE = torch.float16
"""Dtype of scales and zero points (KIVI's): 2 bytes each."""


# ----------------------------------------------------------------------------------------------- quantization
def packed_dim(head_dim: int, bits: int) -> int:
    """Bytes of one token's codes: ``ceil(head_dim * bits / 8)``."""
    return -(-head_dim * bits // 8)


def _params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, zero) of groups whose fp32 min and max are ``lo, hi``: zero = lo rounded down, scale = the
    range above it over ``2^bits - 1``, rounded up (times ``1 + 2^-10`` before fp16's round-to-nearest, whose
    relative error is below ``2^-11``), so ``(hi - zero) / scale <= 2^bits - 1``. A constant group gets scale 1."""
    zero = lo.to(SCALE_DTYPE)
    # The direction as a filled tensor, not torch.tensor(-inf, device=...): on a GPU that is a copy from pageable
    # host memory, which waits for the stream, once per quantized group run.
    below = torch.nextafter(zero, torch.full_like(zero, float("-inf")))
    zero = torch.where(zero.float() > lo, below, zero)
    # A tensor divisor, not a Python number: on a GPU PyTorch divides by a number as a multiply by its reciprocal,
    # which can move the scale by one unit in the last place against the CPU's (and the fused kernel's) IEEE division.
    span = (hi - zero.float()) / torch.full_like(hi, 2**bits - 1)
    scale = (span * (1 + 2**-10)).to(SCALE_DTYPE)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 ``x`` and broadcastable fp16 params -> uint8 codes in ``[0, 2^bits - 1]`` (round to nearest)."""
    return torch.round((x - zero.float()) / scale.float()).clamp_(0, 2**bits - 1).to(torch.uint8)


BITS = KV_CODE_BITS
"""The code widths the functions here, the Triton kernels and the ``quantized`` policy take
(``common.KV_CODE_BITS``)."""


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` -> ``[..., ceil(D * bits / 8)]`` (channel ``m * j + i`` in bits ``i * bits ..`` of
    byte ``j``, ``m = 8 / bits``: at 4 bits channel 2j the low nibble, 2j + 1 the high one)."""
    if bits == 8:
        return codes
    m = 8 // bits
    if codes.shape[-1] % m:
        codes = torch.nn.functional.pad(codes, (0, m - codes.shape[-1] % m))
    out = codes[..., 0::m].clone()
    for i in range(1, m):
        out |= codes[..., i::m] << (i * bits)
    return out


def unpack(packed: torch.Tensor, bits: int, head_dim: int) -> torch.Tensor:
    """``pack``'s inverse: ``[..., ceil(D * bits / 8)]`` -> uint8 codes ``[..., head_dim]``."""
    if bits == 8:
        return packed
    mask = 2**bits - 1
    parts = [(packed >> (i * bits)) & mask for i in range(8 // bits)]
    return torch.stack(parts, dim=-1).flatten(-2)[..., :head_dim]


def quantize_keys(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel quantization of ``k: [B, H, n, D]`` (``n`` a multiple of ``group``) over runs of ``group``
    tokens -> (codes ``[B, H, n, packed_dim]`` uint8, scale and zero ``[B, H, n / group, D]`` fp16)."""
    B, H, n, D = k.shape
    assert n % group == 0, f"keys are quantized in whole groups of {group} tokens, got {n}"
    x = k.float().reshape(B, H, n // group, group, D)
    scale, zero = _params(*torch.aminmax(x, dim=3), bits)
    codes = _codes(x, scale[:, :, :, None], zero[:, :, :, None], bits).reshape(B, H, n, D)
    return pack(codes, bits), scale, zero


def quantize_values(v: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token quantization of ``v: [B, H, n, D]`` over runs of ``group`` channels (the last one partial)
    -> (codes ``[B, H, n, packed_dim]`` uint8, scale and zero ``[B, H, n, ceil(D / group)]`` fp16)."""
    B, H, n, D = v.shape
    ng = -(-D // group)
    x = v.float()
    pad = ng * group - D
    if pad:
        lo = torch.nn.functional.pad(x, (0, pad), value=float("inf")).reshape(B, H, n, ng, group).amin(dim=4)
        hi = torch.nn.functional.pad(x, (0, pad), value=float("-inf")).reshape(B, H, n, ng, group).amax(dim=4)
    else:  # whole channel groups: one pass for both ends
        lo, hi = torch.aminmax(x.reshape(B, H, n, ng, group), dim=4)
    scale, zero = _params(lo, hi, bits)
    codes = _codes(x, _per_channel(scale, group, D), _per_channel(zero, group, D), bits)
    return pack(codes, bits), scale, zero


_FUSED = {"ok": True}


def _fused_ok() -> bool:
    return _FUSED["ok"]


def use_fused_kernels(enabled: bool) -> bool:
    """Whether quantized stores on a GPU use ``kernels/kv_quant_triton.py`` (on by default; off: the PyTorch
    functions, e.g. to time both ways). Returns the previous setting."""
    was, _FUSED["ok"] = _FUSED["ok"], bool(enabled)
    return was


def _fused(kernel: Any, *args: Any) -> bool:
    """Run a kernel of ``kernels/kv_quant_triton.py``; if it cannot compile or launch on this GPU and Triton, warn
    once and return False, and the PyTorch functions above serve from then on (the result is the same). Running out
    of GPU memory is no kernel failure: it is raised as it is (the PyTorch path would need more memory, not less)."""
    try:
        kernel(*args)
        return True
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, *triton_errors()) as exc:  # a compile or launch failure, not a shape mistake
        _FUSED["ok"] = False
        warnings.warn(f"headwise: the fused KIVI kernels failed on this GPU ({type(exc).__name__}: {exc}); "
                      "quantized heads use the PyTorch path", RuntimeWarning, stacklevel=3)
        return False


def triton_errors() -> tuple[type[Exception], ...]:
    """Triton's compilation and out-of-resources error classes (none where Triton does not export them)."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return ()
    return (CompilationError, OutOfResources)


def quantize_into(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, x: torch.Tensor, bits: int,
                  group: int, per_channel: bool) -> None:
    """``quantize_keys`` (``per_channel``) or ``quantize_values`` of ``x`` written into ``codes, scale, zero`` (slices
    of a store's buffers): on a GPU in one Triton launch (``kernels/kv_quant_triton.py``, the same codes and
    parameters bit for bit) where ``group`` is a power of two, elsewhere with the functions above."""
    if x.is_cuda and not group & (group - 1) and _fused_ok():
        from headwise.kernels.kv_quant_triton import quantize_into as fused

        if _fused(fused, codes, scale, zero, x, bits, group, per_channel):
            return
    c, s, z = (quantize_keys if per_channel else quantize_values)(x, bits, group)
    codes.copy_(c)
    scale.copy_(s)
    zero.copy_(z)


def _per_channel(p: torch.Tensor, group: int, head_dim: int) -> torch.Tensor:
    """``[..., ceil(D / group)]`` channel-group params -> ``[..., D]``."""
    return p.repeat_interleave(group, dim=-1)[..., :head_dim]


def dequantize_keys(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                    head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``quantize_keys``'s inverse: ``[B, H, n, D]`` in ``dtype`` (computed in fp32, then rounded)."""
    c = unpack(codes, bits, head_dim).float()
    s = scale.float().repeat_interleave(group, dim=2)[:, :, : c.shape[2]]
    z = zero.float().repeat_interleave(group, dim=2)[:, :, : c.shape[2]]
    return (c * s + z).to(dtype)


def dequantize_values(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int,
                      head_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``quantize_values``'s inverse: ``[B, H, n, D]`` in ``dtype`` (computed in fp32, then rounded)."""
    c = unpack(codes, bits, head_dim).float()
    s = _per_channel(scale.float(), group, head_dim)[:, :, : c.shape[2]]
    z = _per_channel(zero.float(), group, head_dim)[:, :, : c.shape[2]]
    return (c * s + z).to(dtype)


@dataclass(frozen=True)
class QuantizedKV:
    """The quantized part of a per-head cache (buffers may hold room beyond ``n_quant`` tokens).

    k_codes, v_codes: uint8 ``[B, H, cap, packed_dim]``; k_scale, k_zero: fp16 ``[B, H, cap / group, D]``;
    v_scale, v_zero: fp16 ``[B, H, cap, ceil(D / group)]``; the first ``n_quant`` tokens valid."""

    k_codes: torch.Tensor
    k_scale: torch.Tensor
    k_zero: torch.Tensor
    v_codes: torch.Tensor
    v_scale: torch.Tensor
    v_zero: torch.Tensor
    n_quant: int
    bits: int
    group: int
    key_bits: int = 0
    """Bits per key code where they differ from ``bits`` (the values'); 0: ``bits``."""

    @property
    def k_bits(self) -> int:
        return self.key_bits or self.bits

    def dequantize(self, head_dim: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the ``n_quant`` tokens, ``[B, H, n_quant, D]`` in ``dtype``."""
        n, g = self.n_quant, self.group
        keys = dequantize_keys(self.k_codes[:, :, :n], self.k_scale[:, :, : n // g], self.k_zero[:, :, : n // g],
                               self.k_bits, g, head_dim, dtype)
        values = dequantize_values(self.v_codes[:, :, :n], self.v_scale[:, :, :n], self.v_zero[:, :, :n],
                                   self.bits, g, head_dim, dtype)
        return keys, values

    def dequantize_into(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """``dequantize`` written into ``keys, values: [B, H, n_quant, D]`` (e.g. the first rows of a longer buffer),
        in their dtype: on a GPU in one Triton launch each (``kernels/kv_quant_triton.py``), elsewhere with the functions
        above."""
        if self.k_codes.is_cuda and _fused_ok():
            from headwise.kernels.kv_quant_triton import dequantize_into

            if (_fused(dequantize_into, keys, self.k_codes, self.k_scale, self.k_zero, self.k_bits, self.group, True)
                    and _fused(dequantize_into, values, self.v_codes, self.v_scale, self.v_zero, self.bits,
                               self.group, False)):
                return
        k, v = self.dequantize(keys.shape[-1], keys.dtype)
        keys.copy_(k)
        values.copy_(v)
