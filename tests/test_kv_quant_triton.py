"""The one-launch KIVI dequantization kernel against ``kv_quant``'s plain-PyTorch functions (Triton's interpreter on
a CPU, the real kernel on a GPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.kv_quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from headwise.kernels.kv_quant_triton import dequantize_into

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _codes(B: int, H: int, n: int, D: int, kbits: int, vbits: int, group: int, extra: int):
    """Codes of ``n`` tokens in buffers with ``extra`` spare groups of room, as a store holds them."""
    g = torch.Generator().manual_seed(n * 31 + D)
    total = n + extra * group
    k = torch.randn(B, H, total, D, generator=g) * 3 + torch.randn(D, generator=g) * 5  # outlier channels
    v = torch.randn(B, H, total, D, generator=g)
    return quantize_keys(k, kbits, group), quantize_values(v, vbits, group)


@pytest.mark.parametrize("kbits,vbits,D,n", [(8, 8, 64, 96), (4, 4, 64, 64), (8, 4, 80, 160), (4, 4, 80, 32),
                                             (8, 8, 256, 64), (4, 4, 40, 224), (2, 2, 64, 96), (4, 2, 80, 160),
                                             (2, 2, 37, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_into_matches_the_reference(kbits, vbits, D, n, dtype):
    B, H, G = 2, 3, 32
    (kc, ks, kz), (vc, vs, vz) = _codes(B, H, n, D, kbits, vbits, G, extra=2)
    want_k = dequantize_keys(kc[:, :, :n], ks[:, :, : n // G], kz[:, :, : n // G], kbits, G, D, dtype)
    want_v = dequantize_values(vc[:, :, :n], vs[:, :, :n], vz[:, :, :n], vbits, G, D, dtype)
    # The outputs are the first rows of a longer buffer (as QuantizedStore.view writes them), filled with a marker
    # that must survive past row n.
    out_k = torch.full((B, H, n + 7, D), 123.0, dtype=dtype, device=DEVICE)
    out_v = torch.full_like(out_k, 123.0)
    to = [t.to(DEVICE) for t in (kc, ks, kz, vc, vs, vz)]
    dequantize_into(out_k[:, :, :n], to[0], to[1], to[2], kbits, G, per_channel=True)
    dequantize_into(out_v[:, :, :n], to[3], to[4], to[5], vbits, G, per_channel=False)
    tol = {"atol": 1e-5, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}  # one bf16 unit
    torch.testing.assert_close(out_k[:, :, :n].cpu(), want_k, **tol)
    torch.testing.assert_close(out_v[:, :, :n].cpu(), want_v, **tol)
    assert (out_k[:, :, n:] == 123.0).all() and (out_v[:, :, n:] == 123.0).all()


def test_dequantize_into_an_empty_range_writes_nothing():
    (kc, ks, kz), _ = _codes(1, 1, 32, 64, 4, 4, 32, extra=0)
    out = torch.zeros(1, 1, 0, 64, device=DEVICE)
    assert dequantize_into(out, kc.to(DEVICE), ks.to(DEVICE), kz.to(DEVICE), 4, 32, per_channel=True) is out


def test_dequantize_into_refuses_a_strided_last_dimension():
    (kc, ks, kz), _ = _codes(1, 1, 32, 64, 8, 8, 32, extra=0)
    out = torch.zeros(1, 1, 32, 128, device=DEVICE)[..., ::2]
    with pytest.raises(ValueError, match="unit stride"):
        dequantize_into(out, kc.to(DEVICE), ks.to(DEVICE), kz.to(DEVICE), 8, 32, per_channel=True)


@pytest.mark.parametrize("window", [0, 96])
def test_a_quantized_store_view_is_its_codes_dequantized_then_residual_then_chunk(window):
    """``QuantizedStore.view`` writes the dequantized codes (on a GPU with this kernel) into the first rows of the
    buffer the chunk's attention reads, then the residual and the chunk: the same as dequantizing and
    concatenating."""
    from headwise.policies import Quantized

    pol = Quantized(bits=4, key_bits=8, group=32, residual=40, window=window)
    store = pol.make_store(1, 2, 80, torch.device(DEVICE), torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    for n in (70, 61, 33):
        store.append(torch.randn(1, 2, n, 80, generator=g).to(DEVICE, torch.bfloat16),
                     torch.randn(1, 2, n, 80, generator=g).to(DEVICE, torch.bfloat16))
    assert store.n_quant > store.first  # some codes held (and, with the window, some dropped)
    chunk_k = torch.randn(1, 2, 9, 80, generator=g).to(DEVICE, torch.bfloat16)
    chunk_v = torch.randn(1, 2, 9, 80, generator=g).to(DEVICE, torch.bfloat16)
    keys, values = store.view(chunk_k, chunk_v)
    dk, dv = store.quantized().dequantize(80, torch.float32)
    n = store.n_res
    want_k = torch.cat([dk.to(torch.bfloat16), store.res_k[:, :, :n], chunk_k], dim=2)
    want_v = torch.cat([dv.to(torch.bfloat16), store.res_v[:, :, :n], chunk_v], dim=2)
    assert keys.shape == (1, 2, store.length - store.first + 9, 80)
    torch.testing.assert_close(keys, want_k, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(values, want_v, atol=1e-2, rtol=8e-3)
    k_only, _ = store.view()
    torch.testing.assert_close(k_only, want_k[:, :, :-9], atol=1e-2, rtol=8e-3)


@pytest.mark.parametrize("bits,D,n", [(8, 64, 96), (4, 64, 64), (4, 80, 160), (8, 80, 32), (4, 40, 224),
                                      (4, 256, 64), (8, 37, 64), (4, 37, 32), (2, 64, 96), (2, 80, 160), (2, 37, 64),
                                      (2, 6, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_into_gives_the_references_codes_and_parameters_bit_for_bit(bits, D, n, dtype):
    from headwise.kernels.kv_quant import packed_dim
    from headwise.kernels.kv_quant_triton import quantize_into

    B, H, G = 2, 3, 32
    g = torch.Generator().manual_seed(n + D + bits)
    k = (torch.randn(B, H, n, D, generator=g) * 3 + torch.randn(D, generator=g) * 5).to(dtype)
    v = torch.randn(B, H, n, D, generator=g).to(dtype)
    k[0, 0, :G, 1] = 0.25  # a constant key channel in one group: scale 1
    v[1, 2, 3, :] = -0.0
    want_k, want_v = quantize_keys(k, bits, G), quantize_values(v, bits, G)
    P, ng = packed_dim(D, bits), -(-D // G)
    # slices of longer buffers, as the store writes them
    kc = torch.full((B, H, n + 64, P), 7, dtype=torch.uint8, device=DEVICE)
    ks = torch.zeros(B, H, (n + 64) // G, D, dtype=torch.float16, device=DEVICE)
    kz = torch.zeros_like(ks)
    vc = torch.full((B, H, n + 5, P), 7, dtype=torch.uint8, device=DEVICE)
    vs = torch.zeros(B, H, n + 5, ng, dtype=torch.float16, device=DEVICE)
    vz = torch.zeros_like(vs)
    quantize_into(kc[:, :, 32 : 32 + n], ks[:, :, 1 : 1 + n // G], kz[:, :, 1 : 1 + n // G], k.to(DEVICE), bits, G,
                  per_channel=True)
    quantize_into(vc[:, :, :n], vs[:, :, :n], vz[:, :, :n], v.to(DEVICE), bits, G, per_channel=False)
    for got, want in zip((kc[:, :, 32 : 32 + n], ks[:, :, 1 : 1 + n // G], kz[:, :, 1 : 1 + n // G]), want_k):
        assert torch.equal(got.cpu(), want)
    for got, want in zip((vc[:, :, :n], vs[:, :, :n], vz[:, :, :n]), want_v):
        assert torch.equal(got.cpu(), want)
    assert (kc[:, :, :32] == 7).all() and (kc[:, :, 32 + n :] == 7).all() and (vc[:, :, n:] == 7).all()


def test_a_quantized_store_quantizes_as_the_reference_would():
    """``QuantizedStore`` writes its codes through ``kv_quant.quantize_into`` (this module's kernel on a GPU): after
    prompt chunks and eager steps, its codes and parameters are ``quantize_keys`` / ``quantize_values`` of the
    tokens that left the residual."""
    from headwise.policies import Quantized

    pol = Quantized(bits=4, key_bits=8, group=32, residual=40)
    store = pol.make_store(1, 2, 80, torch.device(DEVICE), torch.bfloat16)
    g = torch.Generator().manual_seed(9)
    ks, vs = [], []
    for n in (70, 61, 1, 1, 33):
        k, v = torch.randn(2, 1, 2, n, 80, generator=g).to(torch.bfloat16)
        ks.append(k)
        vs.append(v)
        store.append(k.to(DEVICE), v.to(DEVICE))
    k, v, nq = torch.cat(ks, dim=2), torch.cat(vs, dim=2), store.n_quant
    want_k, want_v = quantize_keys(k[:, :, :nq], 8, 32), quantize_values(v[:, :, :nq], 4, 32)
    held = store.quantized()
    for got, want in zip((held.k_codes[:, :, :nq], held.k_scale[:, :, : nq // 32], held.k_zero[:, :, : nq // 32],
                          held.v_codes[:, :, :nq], held.v_scale[:, :, :nq], held.v_zero[:, :, :nq]),
                         (*want_k, *want_v)):
        assert torch.equal(got.cpu(), want)


def test_a_kernel_that_fails_on_the_gpu_warns_once_and_the_pytorch_path_serves(monkeypatch):
    from headwise.kernels import kv_quant

    monkeypatch.setitem(kv_quant._FUSED, "ok", True)

    def broken(*args):
        raise RuntimeError("no kernel image is available for execution on the device")

    with pytest.warns(RuntimeWarning, match="fused KIVI kernels failed"):
        assert kv_quant._fused(broken, 1, 2) is False
    assert not kv_quant._fused_ok()

    def shape_mistake(*args):
        raise ValueError("unit stride")

    monkeypatch.setitem(kv_quant._FUSED, "ok", True)
    with pytest.raises(ValueError):  # a caller's mistake is not swallowed
        kv_quant._fused(shape_mistake)
    assert kv_quant._fused_ok()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(torch.OutOfMemoryError):  # memory, not the kernel: raised, and the kernels stay on
        kv_quant._fused(out_of_memory)
    assert kv_quant._fused_ok()


def test_the_fused_kernels_can_be_turned_off_and_on():
    from headwise.kernels import kv_quant

    was = kv_quant.use_fused_kernels(False)
    try:
        assert not kv_quant._fused_ok()
        assert kv_quant.use_fused_kernels(True) is False and kv_quant._fused_ok()
    finally:
        kv_quant.use_fused_kernels(was)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_the_pytorch_functions_give_the_cpus_codes_on_a_gpu(bits):
    """The reference is the same on both devices: PyTorch on a GPU divides by a Python number as a multiply by its
    reciprocal, which moved some scales by one unit in the last place (H200, 2026-12-04: the timing script's
    fused and PyTorch codes differed); ``_params`` divides by a tensor since."""
    g = torch.Generator().manual_seed(bits)
    k = (torch.randn(1, 8, 8192, 128, generator=g) * 3 + torch.randn(128, generator=g) * 5).to(torch.bfloat16)
    v = torch.randn(1, 8, 8192, 128, generator=g).to(torch.bfloat16)
    for fn, x in ((quantize_keys, k), (quantize_values, v)):
        for got, want in zip(fn(x.cuda(), bits, 32), fn(x, bits, 32)):
            assert torch.equal(got.cpu(), want)
