"""Issue 2's must-shows on the bundled models: exact dense equivalence at 4K, chunked prefill, greedy tokens."""

from __future__ import annotations

import pytest
import torch

from headwise.data import shakespeare
from headwise.engine import Engine

T = 4096


def _ids(lm, n: int) -> torch.Tensor:
    return lm.tokenizer(shakespeare(n * 6), return_tensors="pt").input_ids[:, :n]


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_dense_plan_logits_equal_transformers_sdpa_at_4k(fixture, request):
    lm = request.getfixturevalue(fixture)
    ids = _ids(lm, T)
    # Every 16th position plus the last 64: enough to cover all chunks, small enough for Gemma's 262K vocabulary.
    positions = torch.unique(torch.cat([torch.arange(0, T, 16), torch.arange(T - 64, T)]))
    with torch.inference_mode():
        ref = lm.model(ids, logits_to_keep=positions).logits
    one_shot = Engine(lm, chunk_size=T).logits(ids, positions)
    assert (one_shot - ref).abs().max().item() <= 1e-4
    chunked = Engine(lm, chunk_size=512).logits(ids, positions)
    assert (chunked - one_shot).abs().max().item() <= 1e-4


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_64_greedy_tokens_identical_to_transformers_at_4k(fixture, request):
    lm = request.getfixturevalue(fixture)
    ids = _ids(lm, T - 64)
    with torch.inference_mode():
        ref = lm.model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)[0, ids.shape[1]:]
    events = list(Engine(lm, chunk_size=512).generate(ids[0], max_new_tokens=64, stop_token_ids=[]))
    ours = [e.token_id for e in events if e.stats is None]
    assert ours == ref.tolist()
    stats = events[-1].stats
    assert stats.new_tokens == 64


def test_reported_kv_bytes_equal_bytes_held_by_cache_tensors(smollm2):
    from headwise.plan import HeadPlan

    spec = smollm2.spec
    plan = HeadPlan.dense(spec)
    for layer in range(0, spec.num_layers, 2):
        plan.layers[layer][1] = {"policy": "streaming", "params": {"sink": 16, "window": 64}}
    eng = Engine(smollm2, plan)
    cache = eng.new_cache(reserve=700)
    eng.prefill(_ids(smollm2, 700), cache)
    held = sum(t.numel() * t.element_size() for t in cache.all_tensors())
    assert cache.kv_bytes() == held
    assert int(cache.kv_bytes_by_head().sum()) == held
    # 15 streaming heads hold 80 slots, 75 full heads 700 tokens: exactly that many K and V rows of 64 fp32 values.
    assert held == (15 * 80 + 75 * 700) * 2 * 64 * 4


def test_dense_cache_bytes_equal_dense_kv_formula(gemma3):
    eng = Engine(gemma3)
    cache = eng.new_cache(reserve=900)
    eng.prefill(_ids(gemma3, 900), cache)
    assert cache.kv_bytes() == gemma3.spec.dense_kv_bytes(900, dtype_bytes=4)
