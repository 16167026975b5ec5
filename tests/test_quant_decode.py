"""The quantized-cache decode kernel against plain-PyTorch references (Triton interpreter on CPU).

Tolerance, as in flash-attention's tests: the kernel in dtype X may err (vs an fp32 reference over the same
stored cache) at most twice as much as plain PyTorch computing in dtype X, plus a small absolute slack.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.kv_quant import QuantizedKV, quantize_keys, quantize_values
from headwise.kernels.quant_decode import quant_decode, quant_decode_reference

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cache(batch: int, kv_heads: int, group_q: int, dim: int, n_quant: int, n_res: int, bits: int | tuple[int, int],
           group: int, dtype: torch.dtype, seed: int = 0):
    """q [B, Hq, D], a quantized part of ``n_quant`` tokens (with spare capacity) and a residual with spare rows.
    ``bits``: both halves', or (key bits, value bits)."""
    kb, bits = bits if isinstance(bits, tuple) else (bits, bits)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group_q, dim, generator=g)
    k = torch.randn(batch, kv_heads, n_quant + group, dim, generator=g) + 2 * torch.randn(dim, generator=g)
    v = torch.randn(batch, kv_heads, n_quant + group, dim, generator=g)
    kc, ks, kz = quantize_keys(k, kb, group)
    vc, vs, vz = quantize_values(v, bits, group)
    kv = QuantizedKV(*(t.to(DEVICE) for t in (kc, ks, kz, vc, vs, vz)), n_quant, bits, group, kb if kb != bits else 0)
    res_k = torch.randn(batch, kv_heads, n_res + 3, dim, generator=g)
    res_v = torch.randn(batch, kv_heads, n_res + 3, dim, generator=g)
    return q.to(DEVICE, dtype), kv, res_k.to(DEVICE, dtype), res_v.to(DEVICE, dtype)


SCENARIOS = {
    # name: (batch, kv_heads, group_q, dim, n_quant, n_res, group)
    "odd-length-gqa4": (2, 2, 4, 64, 96, 37, 32),
    "residual-only": (1, 2, 4, 64, 0, 13, 32),
    "quantized-only-but-one": (1, 1, 1, 64, 128, 1, 32),
    "partial-value-groups-d80": (2, 1, 3, 80, 64, 21, 32),
    "group16-mha": (1, 3, 1, 32, 48, 5, 16),
}


@pytest.mark.parametrize("bits", [8, 4, (8, 4), 2, (4, 2)], ids=["int8", "int4", "k8v4", "int2", "k4v2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_kernel_matches_reference_over_codes_and_residual(name, dtype, bits):
    batch, kv_heads, group_q, dim, n_quant, n_res, group = SCENARIOS[name]
    q, kv, rk, rv = _cache(batch, kv_heads, group_q, dim, n_quant, n_res, bits, group, dtype)
    for splits in (1, 3):
        out = quant_decode(q, kv, rk, rv, n_res, num_splits=splits, block_n=16)
        ref = quant_decode_reference(q.float(), kv, rk.float(), rv.float(), n_res)
        pt = quant_decode_reference(q, kv, rk, rv, n_res)
        err = (out.float() - ref).abs().max().item()
        err_pt = (pt.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + 1e-4, f"{splits} splits: kernel error {err:.2e} vs PyTorch's {err_pt:.2e}"


def test_reference_is_attention_over_the_dequantized_cache_then_the_residual():
    q, kv, rk, rv = _cache(1, 1, 2, 16, 32, 4, 8, 16, torch.float32, seed=3)
    keys, values = kv.dequantize(16)
    keys = torch.cat([keys, rk[:, :, :4]], dim=2).repeat_interleave(2, dim=1)
    values = torch.cat([values, rv[:, :, :4]], dim=2).repeat_interleave(2, dim=1)
    expect = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, keys) / 4.0, dim=-1)
    torch.testing.assert_close(quant_decode_reference(q, kv, rk, rv, 4), torch.einsum("bhs,bhsd->bhd", expect, values))


FIRST_SCENARIOS = {
    # name: (batch, kv_heads, group_q, dim, n_quant, n_res, group, first): a sliding window's oldest visible token
    "first-inside-a-group-gqa4": (2, 2, 4, 64, 96, 37, 32, 45),
    "first-at-a-group-start": (1, 1, 2, 64, 64, 20, 32, 32),
    "first-in-the-residual": (1, 2, 1, 80, 64, 21, 32, 70),
    "first-is-the-last-token": (1, 1, 3, 32, 48, 5, 16, 52),
    "first-one-before-the-residual": (1, 3, 1, 32, 48, 9, 16, 47),
}


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(FIRST_SCENARIOS))
def test_kernel_skips_the_tokens_before_first_like_the_reference(name, dtype, bits):
    batch, kv_heads, group_q, dim, n_quant, n_res, group, first = FIRST_SCENARIOS[name]
    q, kv, rk, rv = _cache(batch, kv_heads, group_q, dim, n_quant, n_res, bits, group, dtype, seed=7)
    for splits in (1, 3):
        out = quant_decode(q, kv, rk, rv, n_res, first=first, num_splits=splits, block_n=16)
        ref = quant_decode_reference(q.float(), kv, rk.float(), rv.float(), n_res, first=first)
        pt = quant_decode_reference(q, kv, rk, rv, n_res, first=first)
        err = (out.float() - ref).abs().max().item()
        err_pt = (pt.float() - ref).abs().max().item()
        assert err <= 2 * err_pt + 1e-4, f"{splits} splits: kernel error {err:.2e} vs PyTorch's {err_pt:.2e}"
    # ... and the reference is attention over exactly the tokens from ``first`` on.
    full = quant_decode_reference(q.float(), kv, rk.float(), rv.float(), n_res)
    assert (ref - full).abs().max().item() > 1e-3, "skipping tokens must change the output"


def test_reference_from_first_is_attention_over_the_later_tokens_only():
    q, kv, rk, rv = _cache(1, 1, 2, 16, 32, 4, 8, 16, torch.float32, seed=3)
    keys, values = kv.dequantize(16)
    keys = torch.cat([keys, rk[:, :, :4]], dim=2)[:, :, 21:].repeat_interleave(2, dim=1)
    values = torch.cat([values, rv[:, :, :4]], dim=2)[:, :, 21:].repeat_interleave(2, dim=1)
    expect = torch.softmax(torch.einsum("bhd,bhsd->bhs", q, keys) / 4.0, dim=-1)
    torch.testing.assert_close(quant_decode_reference(q, kv, rk, rv, 4, first=21),
                               torch.einsum("bhs,bhsd->bhd", expect, values))
