"""``--select-under``: a budget's plan is the best of the nested plans at or under it, judged on held-in probes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from headwise.cli import main
from headwise.plan import HeadPlan
from headwise.policies import Full
from headwise.policies.quantized import Quantized
from headwise.policies.streaming import Streaming
from headwise.profile.runner import Spans, print_selection, resolve_from_scores
from headwise.profile.select import BudgetCandidate, choose_budget, nested, probe_losses, probe_set
from headwise.profile.solver import solve

RANKING = Path(__file__).resolve().parents[1] / "bench" / "results" / \
    "retrieval_plan_smollm2-135m_h200_ablation2_2026-12-02.json"


def test_plans_solved_from_one_ranking_are_nested(smollm2):
    """The GPU ranking re-solved at the curve's budgets: each plan keeps every head at least as precisely as the
    plan of any smaller budget (streaming < 4-bit < 8-bit < full), so the smaller plans are the cheaper candidates
    of one family. Not every budget: at 0.3 what is left after the 4-bit heads buys one 8-bit head, which is 4-bit
    at 0.375, where the same bytes keep more heads whole (each head costed at its peak)."""
    meta = HeadPlan.load(RANKING).meta
    spans = Spans.from_meta(meta)
    assert spans is not None

    def at(b: float):
        return solve(smollm2.spec, torch.tensor(meta["scores"]["ablation_kv"]), b, 1024, spans.value, full_share=1.0,
                     quantize=True)

    sols = [at(b) for b in (0.25, 0.375, 0.5, 0.75)]
    assert nested([s.policies for s in sols])
    assert not nested([at(0.3).policies, sols[1].policies])
    assert [len(s.full_heads) for s in sols] == sorted(len(s.full_heads) for s in sols)
    assert len(sols[-1].full_heads) > len(sols[-2].full_heads)
    assert not nested([sols[-1].policies, sols[0].policies])  # the other way round they are not


def test_a_head_moved_to_a_less_precise_policy_breaks_nesting():
    four, eight = Quantized(bits=4), Quantized(bits=8)
    assert nested([[[Streaming(sink=4, window=8), four]], [[Streaming(sink=4, window=16), eight]], [[four, Full()]]])
    assert not nested([[[four, Full()]], [[Streaming(sink=4, window=512), Full()]]])
    assert not nested([[[eight]], [[four]]])


def _candidates(spec, answered: list[int]) -> list[BudgetCandidate]:
    score = torch.arange(spec.num_layers * spec.num_kv_heads, dtype=torch.float32).view(spec.num_layers, -1)
    out = []
    for b, a in zip((0.3, 0.5, 0.75), answered):
        c = BudgetCandidate(b, solve(spec, score, b, 1024, full_share=1.0, quantize=True))
        c.answered = a
        out.append(c)
    return out


def test_the_cheaper_plan_wins_a_tie(tiny_llama):
    cands = _candidates(tiny_llama.spec, [5, 7, 7])
    assert choose_budget(cands).budget == 0.5
    assert choose_budget(list(reversed(cands))).budget == 0.5  # not the order given
    assert cands[1].solution.fraction < cands[2].solution.fraction


def test_more_answers_beat_less_memory(tiny_llama):
    assert choose_budget(_candidates(tiny_llama.spec, [5, 6, 7])).budget == 0.75


def test_probes_see_the_rounding_of_quantized_heads(tiny_llama):
    """A 4-bit head is scored through its codes (the old positions rounded as its store holds them), not as full."""
    probes = probe_set(tiny_llama.tokenizer, [300], 2)
    full = [[Full(), Full()], [Full(), Full()]]
    four = [[Quantized(bits=4), Full()], [Full(), Quantized(bits=4)]]
    _, nll_full = probe_losses(tiny_llama, full, probes)
    _, nll_four = probe_losses(tiny_llama, four, probes)
    _, nll_dense = probe_losses(tiny_llama, None, probes)
    assert torch.allclose(nll_full, nll_dense, atol=1e-5)
    assert not torch.allclose(nll_four, nll_full, atol=1e-4)


@pytest.fixture
def source(tiny_llama) -> HeadPlan:
    """A profile's plan with a ranking in its meta (what --from-scores reads), for the tiny model."""
    spec = tiny_llama.spec
    scores = [[0.9, 0.2], [0.5, 0.7]]
    return HeadPlan.from_policies(spec, [[Full()] * spec.num_kv_heads] * spec.num_layers, tiny_llama.name,
                                  method="retrieval", target_len=512, scores={"retrieval_kv": scores})


def test_a_budget_choice_never_holds_more_than_its_budget_and_is_recorded(tiny_llama, source, capsys):
    plan = resolve_from_scores(tiny_llama, source, 0.65, 512, "retrieval", full_share=1.0, select_probes=2,
                               quantize=True, select_under=(0.5, 0.3))
    sel = plan.meta["selection"]
    cands = sel["candidates"]
    assert [c["budget"] for c in cands] == [0.3, 0.5, 0.65]
    # recorded, not required: at 0.5 head (0, 0) is 8-bit, at 0.65 every head is whole, one with 8-bit keys
    assert sel["nested"] is False and [c["plan"] for c in cands][1:] == ["1 8-bit + 1 4-bit + 2 streaming",
                                                                         "1 8-bit keys + 3 4-bit"]
    assert sel["lengths"] == [512, 992] and sel["probes"] == 4  # twice 512 within the 1024-token context
    assert all(c["kv_fraction"] <= c["budget"] for c in cands)
    assert all(sum(c["answered_by_length"].values()) == c["probes_answered"] for c in cands)
    assert all(sum(c["answered_by_haystack"].values()) == c["probes_answered"] for c in cands)
    assert sum(sel["probes_by_haystack"].values()) == 4 and set(sel["dense_by_haystack"]) == set(sel["probes_by_haystack"])
    best = max(c["probes_answered"] for c in cands)
    chosen = min((c for c in cands if c["probes_answered"] == best), key=lambda c: c["kv_fraction"])
    assert sel["chosen"] == chosen
    assert plan.meta["solution"]["kv_fraction"] == chosen["kv_fraction"] <= 0.65
    assert plan.kv_fraction(tiny_llama.spec, 512, peak=True) <= 0.65 and plan.meta["budget"] == 0.65
    print_selection(sel)
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + len(cands) and "*" in table[1 + cands.index(chosen)]


def test_select_lengths_set_where_the_candidates_are_measured(tiny_llama, source):
    plan = resolve_from_scores(tiny_llama, source, 0.6, 512, "retrieval", full_share=1.0, select_probes=1,
                               select_under=(0.3,), select_lengths=(300,))
    assert plan.meta["selection"]["lengths"] == [300] and plan.meta["selection"]["probes"] == 1


@pytest.mark.parametrize(("extra", "says"), [
    (["--select-under", "0.25,0.75", "--full-share", "1.0"], "0.75"),
    (["--select-under", "", "--full-share", "1.0"], "at least one budget"),
    (["--select-under", ",", "--full-share", "1.0"], "at least one budget"),
    (["--select-under", "0.25,half", "--full-share", "1.0"], "comma-separated list of budgets"),
    (["--select-under", "0,0.25", "--full-share", "1.0"], "(0, 0.5]"),
    (["--select-under", "0.25"], "--full-share"),
    (["--select-lengths", "2k"], "--select-lengths sets where the --select-under, --select-2bit or --select-deals"),
    (["--select-probes", "0"], "--select-probes must be at least 1"),
    (["--select-deals", "-1"], "--select-deals is how many re-deals"),
])
def test_bad_selection_flags_are_a_one_line_error_before_loading(extra, says, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["profile", "smollm2-135m", "--budget", "0.5", "-o", str(out), "--from-scores", str(RANKING),
               "--method", "ablation", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and "\n" not in err, err
    assert not out.exists()


def test_a_listed_budget_too_small_for_any_plan_is_named(tiny_llama, source):
    from headwise.errors import BudgetError

    with pytest.raises(BudgetError, match=r"--select-under 0\.05: .*drop it from the list"):
        resolve_from_scores(tiny_llama, source, 0.6, 512, "retrieval", full_share=1.0, select_probes=1,
                            select_under=(0.05, 0.3))


def test_a_plan_file_is_scored_as_it_is(smollm2):
    """``BudgetCandidate.from_plan``: the shipped plan's own policies (resolved for the model), its KV at its peak as
    the budget, and measured like a re-solved candidate (what the experiments that score plan files beside the budgets
    rely on)."""
    plan = HeadPlan.load(Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m.json")
    c = BudgetCandidate.from_plan(plan, smollm2.spec, 2048)
    assert c.solution.fraction == pytest.approx(plan.kv_fraction(smollm2.spec, 2048, peak=True))
    assert c.budget == round(c.solution.fraction, 4) and 0.2 < c.budget < 0.3
    kinds = {type(p) for layer in c.solution.policies for p in layer}
    assert kinds == {Quantized, Streaming} and len(c.solution.policies) == smollm2.spec.num_layers
    assert c.info()["kv_fraction"] == c.budget
