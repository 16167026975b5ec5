"""bench/quality.py's policy mixes really hold at most the budget of dense KV (issue 3's quality must-show)."""

from __future__ import annotations

import random

import pytest
import torch

from headwise.bench import quality as q
from headwise.cache import HeadwiseCache
from headwise.engine import Engine
from headwise.errors import InputError
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from headwise.spec import ModelSpec
from tiny import tiny_config, tiny_model


def _scores(spec: ModelSpec, seed: int = 0) -> list[list[float]]:
    rng = random.Random(seed)
    return [[rng.random() for _ in range(spec.num_kv_heads)] for _ in range(spec.num_layers)]


@pytest.mark.parametrize("budget", [0.25, 0.2])
def test_global_mixes_stay_within_budget(budget):
    spec = ModelSpec.from_config(tiny_config("llama", num_hidden_layers=8, num_key_value_heads=4, num_attention_heads=8))
    mixes = q.global_mixes(spec, 4096, budget, _scores(spec), "test")
    assert "BASELINE stream-all" in mixes and len(mixes) >= 5
    for name, plan in mixes.items():
        assert plan.kv_fraction(spec, 4096) <= budget, name


def test_gemma_like_mixes_stay_within_budget_although_no_head_can_stay_full():
    spec = ModelSpec.from_config(tiny_config("gemma3_text", num_key_value_heads=2))
    seq_len = 256  # dense: 2 global heads x 256 + 6 sliding heads x 16; 25% is less than one global head
    assert q.budget_tokens(spec, seq_len, 0.25) < seq_len
    for name, plan in q.gemma3_mixes(spec, seq_len, 0.25, _scores(spec), "test").items():
        assert plan.kv_fraction(spec, seq_len) <= 0.25, name
        assert not any(isinstance(p, Full) and spec.layer_windows[i] is None
                       for i, row in enumerate(plan.policies()) for p in row), name


def test_fill_plan_gives_streaming_heads_the_largest_slot_count_that_fits():
    spec = ModelSpec.from_config(tiny_config("llama"))
    target = q.budget_tokens(spec, 1024, 0.25)
    plan = q.fill_plan(spec, 1024, target, {(0, 0): Full()})
    slots = plan.meta["stream_slots"]
    assert plan.kv_tokens(spec, 1024) <= target
    bigger = q.fill_plan(spec, 1024, target + 10**6, {(0, 0): Full()})
    assert bigger.meta["stream_slots"] > slots
    rows = [[Full() if (i, j) == (0, 0) else q._stream(spec, i, slots + 1, False) for j in range(spec.num_kv_heads)]
            for i in range(spec.num_layers)]
    assert HeadPlan.from_policies(spec, rows).kv_tokens(spec, 1024) > target


def test_fill_plan_refuses_fixed_heads_over_the_budget():
    spec = ModelSpec.from_config(tiny_config("llama"))
    fixed = {(i, j): Full() for i in range(spec.num_layers) for j in range(spec.num_kv_heads)}
    with pytest.raises(InputError):
        q.fill_plan(spec, 1024, q.budget_tokens(spec, 1024, 0.25), fixed)


def test_mix_kv_fraction_matches_the_bytes_the_cache_holds():
    lm = tiny_model("llama", max_position_embeddings=4096)
    mixes = q.global_mixes(lm.spec, 2048, 0.5, _scores(lm.spec), "test")
    plan = next(p for name, p in mixes.items() if name.endswith("(test)+stream+comp"))
    engine = Engine(lm, plan, chunk_size=512)
    cache: HeadwiseCache = engine.new_cache(1)
    engine.forward(torch.randint(0, 128, (1, 2048)), cache)
    dense = lm.spec.dense_kv_bytes(2048, dtype_bytes=torch.finfo(lm.dtype).bits // 8)
    assert cache.kv_bytes() / dense == pytest.approx(plan.kv_fraction(lm.spec, 2048))
    assert any(isinstance(p, Streaming) and p.compensation for row in plan.policies() for p in row)


def test_mass_criterion_scores_every_kv_head_between_0_and_1():
    lm = tiny_model("gemma3_text")
    scores = q.mass_scores(lm, torch.randint(0, 128, (1, 96)))
    assert len(scores) == lm.spec.num_layers and all(len(r) == lm.spec.num_kv_heads for r in scores)
    assert all(0.0 <= v <= 1.0 for r in scores for v in r)
