"""KV-head placement for tensor parallelism: balancing, the plan's record of it, and the exact re-indexing."""

from __future__ import annotations

import json
import random

import pytest
import torch

from headwise.cli import main
from headwise.engine import Engine
from headwise.errors import InputError, PlanError
from headwise.placement import balance, check_tp, identity, is_identity, measure
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from headwise.policies.tidal import tidal_policies
from headwise.spec import ModelSpec
from headwise.tp import permute_kv_heads
from tiny import ARCHS, tiny_model

LLAMA3_8B = ModelSpec("llama", 32, 32, 8, 128, 131072, (None,) * 32)


def full_share_plan(spec: ModelSpec, full: float, seed: int = 0) -> HeadPlan:
    """``full`` of the KV heads (drawn at random) full, the rest streaming (sink 64, window 1024)."""
    rng = random.Random(seed)
    heads = [(i, h) for i in range(spec.num_layers) for h in range(spec.num_kv_heads)]
    chosen = set(rng.sample(heads, round(full * len(heads))))
    pols = [[Full() if (i, h) in chosen else Streaming(sink=64, window=1024) for h in range(spec.num_kv_heads)]
            for i in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, pols, "llama3-8b-shape")


def mixed_plan(spec: ModelSpec) -> HeadPlan:
    """KV head 0 of every layer full, the others streaming with small windows (the naive split's worst case)."""
    pols = [[Full() if h == 0 else Streaming(sink=2, window=6) for h in range(spec.num_kv_heads)]
            for _ in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, pols, "tiny")


@pytest.mark.parametrize("tp", [2, 4])
def test_balance_evens_a_25_percent_plan_on_llama3_8b_shapes(tp):
    plan = full_share_plan(LLAMA3_8B, 0.25)
    order = balance(plan, LLAMA3_8B, tp, 131072)
    naive, placed = measure(plan, LLAMA3_8B, tp, 131072), measure(plan, LLAMA3_8B, tp, 131072, order)
    assert sum(naive.rank_bytes) == sum(placed.rank_bytes) == plan.kv_bytes(LLAMA3_8B, 131072)
    assert placed.spread <= 0.05 < naive.spread
    assert placed.layer_excess < naive.layer_excess
    assert all(sorted(row) == list(range(8)) for row in order)


def test_balance_keeps_an_even_plan_in_place():
    plan = HeadPlan.dense(LLAMA3_8B)
    assert is_identity(balance(plan, LLAMA3_8B, 4, 4096))
    assert measure(plan, LLAMA3_8B, 4, 4096).spread == 0


def test_balance_splits_a_layer_optimally_when_heads_come_in_two_kinds():
    spec = ModelSpec("llama", 1, 8, 8, 16, 1024, (None,))
    pols = [[Full() if h < 4 else Streaming(sink=0, window=8) for h in range(8)]]  # naive: all full heads on rank 0
    plan = HeadPlan.from_policies(spec, pols)
    order = balance(plan, spec, 2, 1024)
    assert [sum(h < 4 for h in order[0][r * 4 : r * 4 + 4]) for r in range(2)] == [2, 2]  # two full heads each
    assert measure(plan, spec, 2, 1024, order).spread == 0


def test_tp_must_split_whole_heads():
    with pytest.raises(InputError, match="does not divide"):
        check_tp(ModelSpec("llama", 30, 9, 3, 64, 8192, (None,) * 30), 2)


def test_plan_records_placement_and_round_trips(tmp_path):
    plan = full_share_plan(LLAMA3_8B, 0.25)
    order = balance(plan, LLAMA3_8B, 2, 131072)
    placed = plan.with_placement(2, order, 131072)
    path = placed.save(tmp_path / "p.json")
    back = HeadPlan.load(path)
    assert back.kv_order(2) == order and back.kv_order(4) is None
    assert back.digest() == plan.digest()  # layout, not behaviour


def test_plan_rejects_a_placement_that_is_not_a_permutation(tmp_path):
    plan = HeadPlan.dense(LLAMA3_8B)
    bad = plan.to_dict() | {"placement": {"2": {"order": [[0] * 8] * 32, "at": 4096}}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PlanError, match="layer 0 must be a permutation"):
        HeadPlan.load(tmp_path / "bad.json")
    bad["placement"] = {"3": {"order": identity(LLAMA3_8B), "at": 4096}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(PlanError, match="divides"):
        HeadPlan.load(tmp_path / "bad.json")


def test_tidal_plans_are_not_reindexed():
    spec = ModelSpec("llama", 4, 4, 2, 16, 1024, (None,) * 4)
    plan = HeadPlan.from_policies(spec, tidal_policies(4, 2, 8, (1,)))
    with pytest.raises(PlanError, match="tidal"):
        plan.permuted([[1, 0]] * 4)


def test_shard_gives_each_rank_its_heads():
    plan = mixed_plan(ModelSpec("llama", 2, 4, 4, 16, 1024, (None, None)))
    a, b = plan.shard(0, 2), plan.shard(1, 2)
    assert a.model["num_kv_heads"] == b.model["num_kv_heads"] == 2 and a.model["num_q_heads"] == 2
    assert a.layers[0][0]["policy"] == "full" and b.layers[0] == plan.layers[0][2:]


@pytest.mark.parametrize("arch", ARCHS)
def test_permuted_model_gives_the_same_logits(arch):
    lm = tiny_model(arch, num_attention_heads=8, num_key_value_heads=4)
    ids = torch.randint(0, 128, (1, 37), generator=torch.Generator().manual_seed(1))
    plan = mixed_plan(lm.spec)
    ref = Engine(lm, plan, chunk_size=16).logits(ids)
    order = [[3, 1, 0, 2], [2, 0, 3, 1], [1, 2, 3, 0], [0, 3, 2, 1]]
    permute_kv_heads(lm.model, order, lm.spec)
    out = Engine(lm, plan.permuted(order), chunk_size=16).logits(ids)
    # The same sums in another order of heads: fp32 rounding only.
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # ... and the permutation did move the weights: the unpermuted plan now gives other logits.
    assert not torch.allclose(Engine(lm, plan, chunk_size=16).logits(ids), ref, atol=1e-3)


def test_plan_show_and_balance_cli(tmp_path, capsys):
    plan = full_share_plan(LLAMA3_8B, 0.25)
    src = plan.save(tmp_path / "p.json")
    assert main(["plan", "show", str(src), "--tp", "4", "--at", "131072"]) == 0
    out = capsys.readouterr().out
    assert "naive" in out and "balanced" in out and "rank 3" in out
    assert main(["plan", "balance", str(src), "--tp", "2", "--tp", "4", "-o", str(tmp_path / "b.json")]) == 0
    back = HeadPlan.load(tmp_path / "b.json")
    assert back.kv_order(2) is not None and back.kv_order(4) is not None
    assert main(["plan", "show", str(src), "--tp", "3"]) == 2
    assert "does not divide" in capsys.readouterr().err


def test_solver_keeps_a_multiple_of_the_ranks_full_and_stays_in_budget():
    from headwise.profile.solver import solve

    scores = torch.rand(32, 8, generator=torch.Generator().manual_seed(0))
    plain, ranked = solve(LLAMA3_8B, scores, 0.25, 131072), solve(LLAMA3_8B, scores, 0.25, 131072, ranks=4)
    assert len(plain.full_heads) % 4 != 0 and len(ranked.full_heads) % 4 == 0
    assert set(ranked.full_heads) < set(plain.full_heads)  # the lowest-scoring extra ones went
    assert ranked.kv_tokens <= ranked.cap_tokens
    plan = HeadPlan.from_policies(LLAMA3_8B, ranked.policies)
    assert measure(plan, LLAMA3_8B, 4, 131072, balance(plan, LLAMA3_8B, 4, 131072)).spread <= 0.05


def test_profile_from_scores_with_tp_records_a_placement(smollm2, tmp_path):
    from pathlib import Path

    from headwise.profile.runner import resolve_from_scores

    source = HeadPlan.load(Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m.json")
    plan = resolve_from_scores(smollm2, source, 0.25, source.meta["target_len"], source.meta["method"],
                               full_share=1.0, ranks=3)
    assert plan.counts().get("full", 0) % 3 == 0 and plan.kv_order(3) is not None
    assert plan.kv_fraction(smollm2.spec, source.meta["target_len"]) <= 0.25
    placed = measure(plan, smollm2.spec, 3, source.meta["target_len"], plan.kv_order(3))
    assert placed.spread <= measure(plan, smollm2.spec, 3, source.meta["target_len"]).spread
