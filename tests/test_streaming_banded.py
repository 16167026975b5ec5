"""A ``streaming`` head's long prompt chunk in bands (``policies/streaming.sink_window_banded``) against the same
chunk under one ``[L, S]`` mask: token-exact A-shape either way, fp32 on the CPU, on awkward shapes (a wrapped ring,
a chunk that starts among the sinks, no sinks, GQA, a batch of two, a last band of one row)."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from headwise.policies.base import AttendContext, masked_attention
from headwise.policies.streaming import Streaming, banded_pays, sink_window_banded


def _ring_after(policy: Streaming, prior: int, B: int, Hkv: int, D: int, g: torch.Generator):
    store = policy.make_store(B, Hkv, D, "cpu", torch.float32)
    for a in range(0, prior, 97):  # prior tokens in chunks of 97: the ring wraps at its own offsets
        n = min(97, prior - a)
        store.append(torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g))
    return store


@pytest.mark.parametrize(
    "sink,window,prior,L,rows,B,Hq,Hkv,D",
    [
        (64, 256, 700, 1000, 256, 1, 4, 2, 16),  # the serving plan's heads after a wrapped ring; L not a band multiple
        (0, 512, 0, 1300, 256, 2, 3, 1, 8),  # Gemma 3's sliding layers: no sinks, first chunk, a batch of two
        (4, 8, 3, 70, 16, 1, 2, 2, 8),  # the chunk starts among the sinks; bands wider than the window
        (5, 7, 40, 33, 32, 1, 6, 3, 4),  # a last band of one row
    ],
)
def test_bands_equal_one_mask(sink, window, prior, L, rows, B, Hq, Hkv, D):
    g = torch.Generator().manual_seed(sink + window + L)
    policy = Streaming(sink=sink, window=window)
    store = _ring_after(policy, prior, B, Hkv, D, g)
    old_k, old_v, old_pos = store.view()
    q = torch.randn(B, Hq, L, D, generator=g)
    k, v = torch.randn(B, Hkv, L, D, generator=g), torch.randn(B, Hkv, L, D, generator=g)
    keys, values = torch.cat([old_k, k], 2), torch.cat([old_v, v], 2)
    new_pos = torch.arange(prior, prior + L)
    k_pos = torch.cat([old_pos, new_pos])
    want = masked_attention(q, keys, values, policy.allowed(new_pos[:, None], k_pos[None, :]), D**-0.5)
    got = sink_window_banded(q, keys, values, k_pos, prior, sink, window, D**-0.5, rows=rows)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_long_chunk_through_the_policy_equals_small_chunks():
    """``Streaming.attend`` takes the bands for a long chunk (``banded_pays``) and the mask for short ones; both
    leave the ring as it should be, so what follows is the same too."""
    g = torch.Generator().manual_seed(0)
    policy = Streaming(sink=16, window=64)
    B, Hq, Hkv, D, n = 1, 4, 2, 16, 1500
    q = torch.randn(B, Hq, n, D, generator=g)
    k, v = torch.randn(B, Hkv, n, D, generator=g), torch.randn(B, Hkv, n, D, generator=g)
    assert banded_pays(1200, 1200 + 80, 16, 64) and not banded_pays(100, 180, 16, 64)
    outs = []
    for store, cuts in ((policy.make_store(B, Hkv, D, "cpu", torch.float32), [0, 300, 1500]),
                        (policy.make_store(B, Hkv, D, "cpu", torch.float32), [*range(0, 1500, 100), 1500])):
        parts = [policy.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], store, AttendContext(start=a, scale=D**-0.5))
                 for a, b in pairwise(cuts)]
        outs.append(torch.cat(parts, 2))
        assert torch.equal(store.view()[2].sort().values, torch.cat([torch.arange(16), torch.arange(n - 64, n)]))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
