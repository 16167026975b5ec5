"""No plan holds more KV than dense, at any prompt length: shipped plans, profiler solutions, equal-memory
baselines; counted from the tensors a real cache allocates for that length."""

from pathlib import Path

import pytest
import torch

from headwise.cache import HeadwiseCache
from headwise.plan import HeadPlan
from headwise.profile.solver import solve
from headwise.spec import ModelSpec

SMOLLM2 = ModelSpec("llama", 30, 9, 3, 64, 8192, (None,) * 30)
GEMMA3 = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768,
                   tuple(None if i % 6 == 5 else 512 for i in range(18)))
LENGTHS = (1, 5, 63, 64, 65, 127, 300, 1000, 1024, 2048, 4096, 8192)
PLANS = sorted(Path(__file__).resolve().parents[1].glob("plans/*.json"))


def held_bytes(spec: ModelSpec, plan: HeadPlan, tokens: int) -> int:
    """Bytes a cache holds after ``tokens`` tokens, as ``generate`` sizes it (reserved for the length)."""
    cache = HeadwiseCache(spec, plan, "cpu", torch.bfloat16)
    cache.reserve(tokens)
    return cache.kv_bytes()


@pytest.mark.parametrize("path", PLANS, ids=[p.name for p in PLANS])
def test_shipped_plan_never_holds_more_than_dense(path):
    plan = HeadPlan.load(path)
    spec = SMOLLM2 if plan.model["architecture"] == "llama" else GEMMA3
    plan.check_model(spec)
    for n in LENGTHS:
        assert held_bytes(spec, plan, n) <= spec.dense_kv_bytes(n, 2), f"{path.name} at {n} tokens"


@pytest.mark.parametrize("budget", [0.2, 0.5, 1.0])
def test_solved_plans_never_hold_more_than_dense(budget):
    g = torch.Generator().manual_seed(0)
    for spec in (SMOLLM2, GEMMA3):
        if budget < 0.5 and spec is GEMMA3:
            continue  # below Gemma's cheapest streaming plan
        sol = solve(spec, torch.rand(spec.num_layers, spec.num_kv_heads, generator=g), budget, 1024, full_share=1.0)
        plan = HeadPlan.from_policies(spec, sol.policies, "test")
        for n in LENGTHS:
            assert held_bytes(spec, plan, n) <= spec.dense_kv_bytes(n, 2), f"budget {budget} at {n} tokens"
        assert held_bytes(spec, plan, 1024) <= budget * spec.dense_kv_bytes(1024, 2)


def test_a_short_prompt_holds_no_more_ring_slots_than_tokens():
    plan = HeadPlan.uniform(SMOLLM2, {"policy": "streaming", "params": {"sink": 64, "window": 4000}}, "wide rings")
    assert held_bytes(SMOLLM2, plan, 100) == SMOLLM2.dense_kv_bytes(100, 2)
