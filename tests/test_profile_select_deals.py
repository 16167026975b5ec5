"""``--select-deals``: the solved plan against re-deals of its own policies over the heads, judged on held-in probes."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from headwise.cli import main
from headwise.eval.runner import MAX_DRAWS, RANDOM_SEED, random_baseline
from headwise.plan import HeadPlan, deal_heads
from headwise.policies import Policy
from headwise.policies.quantized import Quantized
from headwise.policies.streaming import Streaming
from headwise.profile import cli as profile_cli
from headwise.profile import select
from headwise.profile.runner import DEAL_SEED, resolve_from_scores
from headwise.profile.select import DealCandidate, choose_deal
from headwise.spec import ModelSpec

GEMMA = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))
"""Gemma 3 270M's shape: layers 5, 11 and 17 global, the rest sliding-window 512, one KV head each."""


def _h200_plan() -> list[list[Policy]]:
    """The plan of the H200 run behind the flag: 4-bit on the global heads and sliding 3, 6, 14, 16, streaming
    (sink 0, window 128) on the other sliding heads."""
    return [[Quantized(bits=4) if i in (3, 5, 6, 11, 14, 16, 17) else Streaming(sink=0, window=128)]
            for i in range(GEMMA.num_layers)]


def _by_group(spec: ModelSpec, policies: list[list[Policy]]) -> dict[int | None, Counter[str]]:
    out: dict[int | None, Counter[str]] = {}
    for i, row in enumerate(policies):
        out.setdefault(spec.layer_windows[i], Counter()).update(str(p) for p in row)
    return out


def test_deals_keep_each_groups_policies_and_the_kv_bytes():
    plan = _h200_plan()
    held = HeadPlan.from_policies(GEMMA, plan)
    for k in range(8):
        deal = deal_heads(GEMMA, plan, f"{DEAL_SEED}:{k}")
        assert deal != plan and _by_group(GEMMA, deal) == _by_group(GEMMA, plan)
        assert all(deal[i] == plan[i] for i in (5, 11, 17))  # the three global heads are all 4-bit: nothing to deal
        dealt = HeadPlan.from_policies(GEMMA, deal)
        assert all(dealt.kv_bytes(GEMMA, L, peak=True) == held.kv_bytes(GEMMA, L, peak=True) for L in (2048, 8192))


def test_the_profilers_deals_are_not_the_evaluations_random_draws():
    assert not DEAL_SEED.startswith(RANDOM_SEED) and not RANDOM_SEED.startswith(DEAL_SEED)
    plan = _h200_plan()
    reference = HeadPlan.from_policies(GEMMA, plan, "gemma3-270m")
    draws = [random_baseline(GEMMA, reference, "gemma3-270m", seed).layers for seed in range(MAX_DRAWS)]
    deals = [HeadPlan.from_policies(GEMMA, deal_heads(GEMMA, plan, f"{DEAL_SEED}:{k}")).layers for k in range(16)]
    assert not any(d in draws for d in deals)
    assert deal_heads(GEMMA, plan, f"{RANDOM_SEED}:3") == random_baseline(GEMMA, reference, "g", 3).policies()


@pytest.fixture
def gemma(tiny_gemma):
    return tiny_gemma


@pytest.fixture
def source(gemma) -> HeadPlan:
    """A profile's plan with a ranking in its meta: at 0.6 it solves to 4-bit on both global heads and, on the
    sliding heads, one 8-bit, one 4-bit and four streaming."""
    spec = gemma.spec
    scores = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.7], [0.3, 0.4]]
    return HeadPlan.from_policies(spec, [[Streaming(sink=0, window=128)] * 2] * 4, gemma.name, method="retrieval",
                                  target_len=512, scores={"retrieval_kv": scores})


def source_solved(gemma, source) -> list[list[Policy]]:
    """The plan ``source``'s ranking solves to at 0.6, without deals."""
    return resolve_from_scores(gemma, source, 0.6, 512, "retrieval", full_share=1.0, quantize=True).policies()


def _scored_by(monkeypatch, answered, nll=lambda policies: 1.0):
    """``select.probe_outcomes`` replaced (every first token 0): dense answers every probe; a plan answers ``answered(policies)`` of them,
    at an answer NLL of ``nll(policies)`` per probe."""
    def fake(lm, policies, probes, batch=8):
        n = sum(x.shape[0] for x in probes.ids.values())
        k = n if policies is None else min(n, answered(policies))
        return (torch.arange(n) < k, torch.full((n,), 1.0 if policies is None else nll(policies)),
                torch.zeros(n, dtype=torch.long))

    monkeypatch.setattr(select, "probe_outcomes", fake)


def test_the_best_scoring_deal_is_kept_and_recorded(gemma, source, monkeypatch):
    """Probes answered = twice the 8-bit head's layer: the solved plan has it on layer 0, some deal on layer 3 (6 of
    8, beyond chance: p = 1/64)."""
    solved = source_solved(gemma, source)
    assert sorted(_by_group(gemma.spec, solved)[256].values()) == [1, 1, 4]  # 8-bit, 4-bit, 4 streaming
    _scored_by(monkeypatch, lambda pols: 2 * next(i for i, row in enumerate(pols) for p in row
                                                  if isinstance(p, Quantized) and p.bits == 8))
    plan = resolve_from_scores(gemma, source, 0.6, 512, "retrieval", full_share=1.0, quantize=True,
                               select_deals=6, select_lengths=(300,), select_probes=8)
    deals = plan.meta["select_deals"]
    cands = deals["candidates"]
    assert deals["deals"] == 6 and [c["deal"] for c in cands] == [None, *range(6)]
    assert cands[0]["differs"] == [] and all(c["differs"] for c in cands[1:])
    best = max(c["probes_answered"] for c in cands)
    assert best == 6 > cands[0]["probes_answered"]
    assert all(c["p_vs_plan"] == round(select.sign_test(c["probes_answered"], 0), 4) for c in cands[1:])
    assert deals["kept"] == next(c["deal"] for c in cands if c["probes_answered"] == best)
    assert plan.policies() == deal_heads(gemma.spec, solved, f"{DEAL_SEED}:{deals['kept']}")
    assert plan.meta["solution"]["kv_fraction"] == cands[0]["kv_fraction"]
    assert all(c["kv_fraction"] == cands[0]["kv_fraction"] for c in cands)
    assert _by_group(gemma.spec, plan.policies()) == _by_group(gemma.spec, solved)


def test_the_solved_plan_wins_a_tie(gemma, source, monkeypatch):
    solved = source_solved(gemma, source)
    _scored_by(monkeypatch, lambda pols: 1, lambda pols: 1.0 if pols == solved else 0.5)  # the deals' NLL is lower
    plan = resolve_from_scores(gemma, source, 0.6, 512, "retrieval", full_share=1.0, select_probes=2, quantize=True,
                               select_deals=4, select_lengths=(300,))
    deals = plan.meta["select_deals"]
    assert all(c["probe_nll"] < deals["candidates"][0]["probe_nll"] for c in deals["candidates"][1:])
    assert deals["kept"] is None and plan.policies() == solved


def test_a_tie_among_deals_goes_to_the_lower_nll():
    sol, sure = object(), select.Versus(6, 0, 1 / 64)
    cands = [DealCandidate(0.5, sol, answered=3, nll=0.5), DealCandidate(0.5, sol, answered=9, nll=0.9, deal=0, versus=sure),
             DealCandidate(0.5, sol, answered=9, nll=0.7, deal=1, versus=sure),
             DealCandidate(0.5, sol, answered=2, nll=0.1, deal=2, versus=sure)]
    assert choose_deal(cands).deal == 1
    cands[1].versus = cands[2].versus = select.Versus(6, 2, select.sign_test(6, 2))  # ahead by 4 of 8: chance
    assert choose_deal(cands).deal is None
    cands[0].answered = 9
    assert choose_deal(cands).deal is None  # the solved plan first on a tie, whatever its NLL


def test_deals_run_on_the_real_probes(gemma, source):
    """No scoring replaced: the candidates run as masks with their quantized heads rounded, on a sliding-window
    model."""
    plan = resolve_from_scores(gemma, source, 0.6, 512, "retrieval", full_share=1.0, select_probes=1, quantize=True,
                               select_deals=2, select_lengths=(300,))
    deals = plan.meta["select_deals"]
    assert deals["probes"] == 1 and len(deals["candidates"]) == 3
    assert all(c["probe_nll"] > 0 for c in deals["candidates"])


def test_select_deals_through_the_cli(gemma, source, monkeypatch, tmp_path, capsys):
    src = tmp_path / "src.json"
    source.save(src)
    monkeypatch.setattr(profile_cli, "load_from_args", lambda args: gemma)
    _scored_by(monkeypatch, lambda pols: 1)
    out = tmp_path / "p.json"
    rc = main(["profile", "tiny", "--budget", "0.6", "-o", str(out), "--from-scores", str(src), "--method",
               "retrieval", "--target-len", "512", "--full-share", "1.0", "--quantize", "--select-deals", "3",
               "--select-lengths", "300", "--select-probes", "2"])
    assert rc == 0
    plan = HeadPlan.load(out)
    assert "--select-deals 3" in plan.meta["created_by"] and plan.meta["select_deals"]["deals"] == 3
    assert "--select-deals: kept the solved plan" in capsys.readouterr().out


def test_select_deals_refuses_knorm_twins_before_measuring(gemma):
    from headwise.errors import HeadwiseError
    from headwise.profile.runner import profile_model

    with pytest.raises(HeadwiseError, match="without --select-under, --select-2bit or --select-deals"):
        profile_model(gemma, 0.6, 512, "ablation", full_share=1.0, ablation_switch="knorm", select_deals=2)
