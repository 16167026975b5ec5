"""A ``streaming`` head's prompt chunk on the Triton kernel (``kernels/sink_window.py``) against its plain-PyTorch
reference, under TRITON_INTERPRET=1 on the CPU: first chunks (empty ring), chunks that start among the sinks, wrapped
rings in any slot order, no sinks (Gemma 3's sliding layers), windows shorter and longer than a tile, chunks that are
no multiple of a tile, GQA, strided views of a layer's heads, a ring with empty slots; and through the policy, where
``use_kernels`` takes the kernel and must give what the masked path gives, chunk after chunk."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from headwise.kernels.sink_window import sink_window_attention, sink_window_reference
from headwise.policies.base import AttendContext
from headwise.policies.streaming import Streaming

EMPTY = -(1 << 40)  # an empty slot's position, as SinkWindowStore marks them


def _ring(seen: int, sink: int, window: int, B: int, Hkv: int, D: int, g: torch.Generator, empty: int = 0,
          shuffle: bool = True):
    """The keys a store holds after ``seen`` tokens: sinks in slots 0 .. sink-1, the last ``window`` positions in the
    other slots (shuffled: the kernel must not care about their order), ``empty`` unused slots at the end."""
    kept = [p for p in range(seen) if p < sink or seen - p <= window]
    rest = torch.tensor(kept[min(sink, len(kept)):], dtype=torch.long)
    if shuffle and rest.numel():
        rest = rest[torch.randperm(rest.numel(), generator=g)]
    pos = torch.cat([torch.tensor(kept[:sink], dtype=torch.long), rest, torch.full((empty,), EMPTY)])
    R = pos.numel()
    return torch.randn(B, Hkv, R, D, generator=g), torch.randn(B, Hkv, R, D, generator=g), pos


@pytest.mark.parametrize(
    "seen,L,sink,window,Hq,Hkv,D",
    [
        (0, 97, 4, 16, 2, 2, 16),  # first chunk: an empty ring; L no multiple of a tile
        (3, 70, 4, 16, 8, 2, 16),  # the chunk starts among the sinks; GQA 4:1
        (100, 130, 4, 16, 4, 2, 40),  # a wrapped ring; head_dim no power of two
        (100, 130, 0, 33, 4, 1, 64),  # no sinks (a native sliding window)
        (500, 200, 64, 256, 4, 1, 64),  # the serving plan's heads: the window spans several tiles
        (10, 5, 64, 256, 1, 1, 16),  # a chunk shorter than a tile, inside the sinks
        (70, 129, 64, 20, 3, 1, 16),  # sinks wider than the window
        (2, 300, 8, 100, 2, 2, 32),  # the sinks end inside the chunk, the window spans tiles
        (40, 64, 4, 1, 2, 1, 16),  # window 1: each query sees the sinks and itself
    ],
)
def test_kernel_equals_the_reference(seen, L, sink, window, Hq, Hkv, D):
    g = torch.Generator().manual_seed(seen * 7 + L + window)
    B = 2
    q = torch.randn(B, Hq, L, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    rk, rv, rp = _ring(seen, sink, window, B, Hkv, D, g, empty=3 if seen else 0)
    want = sink_window_reference(q, k, v, rk, rv, rp, seen, sink, window, scale=0.3)
    small = L * (window + 64) <= 130 * 120  # fp32's GPU tiles (16 x 32: 4x the programs) on the small cases only
    for tiles in (None, {"block_m": 16, "block_n": 32}) if small else (None,):  # the default (64 x 32 here)
        got = sink_window_attention(q, k, v, rk, rv, rp, seen, sink, window, scale=0.3, config=tiles)
        torch.testing.assert_close(got, want, atol=2e-6, rtol=2e-5)


def test_the_reference_is_streaming_s_mask():
    """The reference is ``Streaming.allowed`` over the ring and the chunk: one query's output, by hand."""
    g = torch.Generator().manual_seed(1)
    sink, window, seen, L, D = 2, 3, 9, 4, 8
    rk, rv, rp = _ring(seen, sink, window, 1, 1, D, g)
    q = torch.randn(1, 1, L, D, generator=g)
    k, v = torch.randn(1, 1, L, D, generator=g), torch.randn(1, 1, L, D, generator=g)
    out = sink_window_reference(q, k, v, rk, rv, rp, seen, sink, window, scale=1.0)
    # the query at position 10 (row 1) sees positions 0, 1 (sinks) and 8, 9, 10 (window 3)
    keys = {int(p): (rk[0, 0, i], rv[0, 0, i]) for i, p in enumerate(rp.tolist())}
    keys |= {seen + i: (k[0, 0, i], v[0, 0, i]) for i in range(L)}
    seen_by = [0, 1, 8, 9, 10]
    Ks = torch.stack([keys[p][0] for p in seen_by])
    Vs = torch.stack([keys[p][1] for p in seen_by])
    want = torch.softmax(Ks @ q[0, 0, 1], 0) @ Vs
    torch.testing.assert_close(out[0, 0, 1], want, atol=1e-6, rtol=1e-5)


def test_strided_views_of_a_layer_s_heads_and_bf16():
    """A group that is a view of the layer's heads (as ``HeadGroup.heads_of`` hands it over: token-major projections,
    a slice of the heads) is read in place; bf16 inputs give bf16 within bf16's rounding of the fp32 reference."""
    g = torch.Generator().manual_seed(2)
    L, Hq_all, Hkv_all, D = 150, 12, 3, 32
    q_all = torch.randn(1, L, Hq_all, D, generator=g).transpose(1, 2)  # [1, H, L, D], token-major storage
    k_all = torch.randn(1, L, Hkv_all, D, generator=g).transpose(1, 2)
    v_all = torch.randn(1, L, Hkv_all, D, generator=g).transpose(1, 2)
    q, k, v = q_all[:, 4:12], k_all[:, 1:3], v_all[:, 1:3]  # the last two KV heads and their query heads
    assert not q.is_contiguous()
    rk, rv, rp = _ring(300, 16, 64, 1, 2, D, g)
    for dtype, tol in ((torch.float32, 2e-6), (torch.bfloat16, 2e-2)):
        args = [t.to(dtype) for t in (q, k, v, rk, rv)]
        got = sink_window_attention(*args, rp, 300, 16, 64)
        want = sink_window_reference(*args, rp, 300, 16, 64)
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got, sink_window_attention(*[t.contiguous() for t in args], rp, 300, 16, 64))


def test_nothing_to_attend_gives_an_empty_output():
    g = torch.Generator().manual_seed(3)
    rk, rv, rp = _ring(10, 4, 8, 1, 1, 16, g)
    out = sink_window_attention(torch.zeros(1, 2, 0, 16), torch.zeros(1, 1, 0, 16), torch.zeros(1, 1, 0, 16),
                                rk, rv, rp, 10, 4, 8)
    assert out.shape == (1, 2, 0, 16)


@pytest.mark.parametrize("sink,window,cuts", [(16, 64, [0, 40, 300, 301, 700, 1000]), (0, 96, [0, 500, 530, 1000])])
def test_the_policy_on_kernels_equals_the_masked_path_chunk_after_chunk(sink, window, cuts):
    """``Streaming.attend`` with ``use_kernels`` (the kernel under the interpreter) and without (the masked or banded
    path) give the same outputs and leave the same ring, over chunks that wrap it at different offsets."""
    g = torch.Generator().manual_seed(sink + window)
    policy = Streaming(sink=sink, window=window)
    B, Hq, Hkv, D, n = 1, 4, 2, 16, cuts[-1]
    q = torch.randn(B, Hq, n, D, generator=g)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    outs, rings = [], []
    for kernels in (False, True):
        store = policy.make_store(B, Hkv, D, "cpu", torch.float32)
        parts = [policy.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], store,
                               AttendContext(start=a, scale=D**-0.5, use_kernels=kernels)) for a, b in pairwise(cuts)]
        outs.append(torch.cat(parts, 2))
        rings.append(store.view())
    torch.testing.assert_close(outs[1], outs[0], atol=2e-6, rtol=2e-5)
    for a, b in zip(*rings):
        assert torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("sink,window,D,Hq,Hkv", [(64, 256, 128, 24, 6), (0, 512, 256, 4, 1)])
def test_a_real_chunk_on_the_gpu(sink, window, D, Hq, Hkv):
    """The serving plan's streaming heads (Llama-3-8B: 24 query / 6 KV heads, d 128) and a Gemma 3 sliding layer
    (d 256, no sinks): an 8192-token chunk after a wrapped ring, bf16 on the GPU, within twice the error of the
    masked bf16 SDPA path against the fp32 reference."""
    from headwise.policies.base import masked_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    L, seen = 8192, 65536 + 37
    rk, rv, rp = _ring(seen, sink, window, 1, Hkv, D, torch.Generator().manual_seed(0))
    rk, rv, rp = rk.cuda().bfloat16(), rv.cuda().bfloat16(), rp.cuda()
    q = torch.randn(1, Hq, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(1, Hkv, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(1, Hkv, L, D, device="cuda", generator=g, dtype=torch.bfloat16)
    got = sink_window_attention(q, k, v, rk, rv, rp, seen, sink, window).float()
    want = sink_window_reference(q.float(), k.float(), v.float(), rk.float(), rv.float(), rp, seen, sink, window)
    kp = torch.cat([rp, torch.arange(seen, seen + L, device="cuda")])
    policy = Streaming(sink=sink, window=window)
    masked = masked_attention(q, torch.cat([rk, k], 2), torch.cat([rv, v], 2),
                              policy.allowed(torch.arange(seen, seen + L, device="cuda")[:, None], kp[None, :]),
                              D**-0.5).float()
    assert (got - want).abs().max().item() <= 2 * (masked - want).abs().max().item() + 1e-3
