"""``Engine.decode_batch`` (the server's batched step) equals decoding each sequence alone, on every
supported architecture, with sequences at different positions and heterogeneous per-head caches."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.plan import HeadPlan
from server_common import mixed_plan as server_mixed_plan
from tiny import ARCHS, tiny_model


def mixed_plan(spec) -> HeadPlan:
    """The prompts below overflow the streaming heads' window of 6."""
    return server_mixed_plan(spec, window=6)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_decode_rows_equal_each_sequence_alone(arch):
    lm = tiny_model(arch)
    engine = Engine(lm, mixed_plan(lm.spec), chunk_size=16)
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 23, 40]  # 40 also passes Gemma 3's native sliding window of 16
    alone, batched = [], []
    for n in lengths:
        ids = torch.randint(0, 128, (1, n), generator=gen)
        for caches in (alone, batched):
            c = engine.new_cache(1, reserve=n + 4)
            engine.prefill(ids, c)
            caches.append(c)
    tokens = torch.randint(0, 128, (4, len(lengths)), generator=gen)
    for step in range(4):
        got = engine.decode_batch(batched, tokens[step])
        assert got.shape == (len(lengths), 128)
        for i, c in enumerate(alone):
            c.decode_step += 1
            want = engine.forward(tokens[step, i].view(1, 1), c)[0]
            assert (got[i] - want).abs().max().item() <= 1e-4
    assert [c.get_seq_length() for c in batched] == [n + 4 for n in lengths]
    assert [c.kv_bytes() for c in batched] == [c.kv_bytes() for c in alone]


def test_decode_batch_needs_one_token_per_cache():
    from headwise.errors import InputError

    lm = tiny_model("llama")
    engine = Engine(lm)
    caches = [engine.new_cache(1, reserve=4) for _ in range(2)]
    with pytest.raises(InputError, match="one token per cache"):
        engine.decode_batch(caches, [1, 2, 3])
