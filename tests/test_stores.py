"""KV stores: the streaming ring's compensation slot (RazorAttention) holds the mean of exactly the dropped tokens."""

from __future__ import annotations

import pytest
import torch

from headwise.policies.stores import SinkWindowStore


@pytest.mark.parametrize("chunks", [[1] * 40, [5] * 8, [40], [3, 17, 1, 1, 18], [2, 9, 4, 6, 1, 12, 6]],
                         ids=["tokens", "fives", "one", "mixed", "mixed2"])
def test_compensation_is_the_mean_of_the_tokens_that_left_the_window(chunks):
    sink, window = 3, 7
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(2, 2, 2, sum(chunks), 4, generator=g)
    store = SinkWindowStore(2, 2, 4, torch.device("cpu"), torch.float32, sink, window, compensation=True)
    pos = 0
    for n in chunks:
        store.append(keys[:, :, pos : pos + n], values[:, :, pos : pos + n])
        pos += n
        gone = slice(sink, max(sink, pos - window))  # positions sink .. pos - window - 1 have left the ring
        n_gone = max(0, pos - window - sink)
        assert store.dropped == n_gone
        comp = store.compensation_kv()
        if n_gone == 0:
            assert comp is None
            continue
        torch.testing.assert_close(comp[0], keys[:, :, gone].mean(dim=2, keepdim=True))
        torch.testing.assert_close(comp[1], values[:, :, gone].mean(dim=2, keepdim=True))
    kept = sorted(p for p in store.slot_pos.tolist() if p >= 0)
    assert kept == list(range(sink)) + list(range(pos - window, pos))
