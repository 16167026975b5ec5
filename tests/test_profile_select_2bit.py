"""``--select-2bit``: each head the solver holds in 2-bit values against the menu's smallest ring, on held-in probes."""

from __future__ import annotations

import pytest
import torch

from headwise.cli import main
from headwise.plan import HeadPlan
from headwise.policies import Policy
from headwise.policies.quantized import Quantized
from headwise.policies.streaming import Streaming
from headwise.profile import cli as profile_cli
from headwise.profile import select
from headwise.profile.runner import resolve_from_scores, two_bit_heads
from headwise.profile.select import RingCandidate, choose_ring
from headwise.profile.solver import QuantMenu

MENU = QuantMenu(two_bit=True, global_key_bits=2, min_ring=32)
"""2-bit codes everywhere (also on the global layer) and 32-token rings: at 0.4 the tiny Gemma below holds three heads
in 2-bit values (layer 1 head 1 and both heads of global layer 2)."""
TWO_BIT = [(1, 1), (2, 0), (2, 1)]


@pytest.fixture
def gemma(tiny_gemma):
    return tiny_gemma


@pytest.fixture
def source(gemma) -> HeadPlan:
    spec = gemma.spec
    scores = [[0.9, 0.1], [0.2, 0.8], [0.5, 0.7], [0.3, 0.4]]
    return HeadPlan.from_policies(spec, [[Streaming(sink=0, window=128)] * 2] * 4, gemma.name, method="retrieval",
                                  target_len=512, scores={"retrieval_kv": scores})


def _solve(gemma, source, **kw) -> HeadPlan:
    return resolve_from_scores(gemma, source, 0.4, 512, "retrieval", full_share=1.0, quantize=MENU, **kw)


def _scored_by(monkeypatch, answered) -> list[int]:
    """``select.probe_outcomes`` replaced (every first token 0): dense answers every probe; a plan answers ``answered(policies)`` of them.
    Returns a list that counts dense's runs."""
    dense_runs: list[int] = []

    def fake(lm, policies, probes, batch=8):
        dense_runs.extend([1] if policies is None else [])
        n = sum(x.shape[0] for x in probes.ids.values())
        k = n if policies is None else min(n, answered(policies))
        return torch.arange(n) < k, torch.ones(n), torch.zeros(n, dtype=torch.long)

    monkeypatch.setattr(select, "probe_outcomes", fake)
    return dense_runs


def _ringed(policies: list[list[Policy]]) -> list[tuple[int, int]]:
    return [h for h in TWO_BIT if isinstance(policies[h[0]][h[1]], Streaming)]


def test_the_menu_puts_three_heads_in_two_bits(gemma, source):
    assert two_bit_heads(_solve(gemma, source).policies()) == TWO_BIT


def test_a_head_whose_ring_answers_more_streams_and_the_plan_holds_less(gemma, source, monkeypatch):
    """Layer 1's 2-bit head misleads the probes: ringed, the plan answers 7 instead of 1 of 8 (p = 1/64); the others
    change nothing."""
    solved = _solve(gemma, source)
    _scored_by(monkeypatch, lambda pols: 7 if (1, 1) in _ringed(pols) else 1)
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    rings = plan.meta["select_2bit"]
    assert rings["ring"] == 32 and rings["heads"] == [list(h) for h in TWO_BIT]
    assert [c["ringed"] for c in rings["candidates"]] == [[], [[1, 1]], [[2, 0]], [[2, 1]]]
    assert rings["ringed"] == [[1, 1]]
    first = rings["candidates"][1]
    assert (first["gained_vs_plan"], first["lost_vs_plan"], first["p_vs_plan"]) == (6, 0, round(1 / 64, 4))
    assert "p_vs_plan" not in rings["candidates"][0]
    pols = plan.policies()
    assert pols[1][1] == Streaming(sink=0, window=32)  # a window of the ring on a sliding layer
    assert all(pols[i][j] == solved.policies()[i][j] for i in range(4) for j in range(2) if (i, j) != (1, 1))
    for L in (64, 512, 4096):  # never more than the solved plan, nor more than dense, at any length
        assert plan.kv_bytes(gemma.spec, L, peak=True) <= solved.kv_bytes(gemma.spec, L, peak=True)
    sol = plan.meta["solution"]
    assert sol["kv_tokens"] < solved.meta["solution"]["kv_tokens"]
    assert sol["kv_tokens"] == plan.kv_tokens(gemma.spec, 512, peak=True)
    assert [1, 1] not in sol["quantized_heads"]


def test_the_plan_wins_a_tie(gemma, source, monkeypatch):
    solved = _solve(gemma, source)
    _scored_by(monkeypatch, lambda pols: 2)
    plan = _solve(gemma, source, select_2bit=True, select_probes=2, select_lengths=(300,))
    assert plan.meta["select_2bit"]["ringed"] == [] and plan.policies() == solved.policies()


def test_several_heads_that_each_help_are_tried_together(gemma, source, monkeypatch):
    """Each global head's ring helps alone, within chance (3 of 8 against 1), both together beyond it (8): the
    candidate with both is measured and kept; the ring on the global layer holds half sinks."""
    dense_runs = _scored_by(monkeypatch, lambda pols: {0: 1, 1: 3, 2: 8}[len([h for h in _ringed(pols) if h[0] == 2])])
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    assert len(dense_runs) == 1  # the candidate with both heads runs on the same probes, dense not again
    rings = plan.meta["select_2bit"]
    assert rings["candidates"][-1]["ringed"] == [[2, 0], [2, 1]] and rings["ringed"] == [[2, 0], [2, 1]]
    assert plan.policies()[2] == [Streaming(sink=16, window=16)] * 2
    assert isinstance(plan.policies()[1][1], Quantized)


def test_a_tie_between_rings_goes_to_fewer_heads_moved():
    sol, sure = object(), select.Versus(6, 0, 1 / 64)
    cands = [RingCandidate(0.4, sol, answered=1), RingCandidate(0.4, sol, answered=7, ringed=[(1, 1)], versus=sure),
             RingCandidate(0.4, sol, answered=7, ringed=[(1, 1), (2, 0)], nll=0.1, versus=sure),
             RingCandidate(0.4, sol, answered=7, ringed=[(2, 0)], nll=0.5, versus=sure)]
    assert choose_ring(cands).ringed == [(1, 1)]


def test_a_lead_within_chance_keeps_the_plan(gemma, source, monkeypatch, capsys):
    """Run 32's 0.2 plan in small: rings that answer a few more probes than the plan (45 against 41 of 64 there)
    move nothing; one more answered than lost beyond chance does. What is untested never replaces the plan."""
    solved = _solve(gemma, source)
    _scored_by(monkeypatch, lambda pols: 1 + 2 * len(_ringed(pols)))  # 3 heads ringed together: 7 of 8
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    rings = plan.meta["select_2bit"]
    assert rings["candidates"][-1]["probes_answered"] == 7 and rings["candidates"][-1]["p_vs_plan"] < 0.05
    assert len(rings["ringed"]) == 3  # 6 gained, none lost: beyond chance
    _scored_by(monkeypatch, lambda pols: 1 + len(_ringed(pols)))  # together 4 of 8: 3 gained, p = 1/8
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    assert plan.meta["select_2bit"]["ringed"] == [] and plan.policies() == solved.policies()
    from headwise.profile.runner import print_rings

    print_rings(plan.meta["select_2bit"])
    out = capsys.readouterr().out
    assert "moved to the 32-token ring: none" in out and "3 together 4" in out
    assert "3 probes gained and 0 lost, is within chance (sign test p = 0.12, needs < 0.05)" in out
    assert choose_ring([RingCandidate(0.4, object(), answered=1),
                        RingCandidate(0.4, object(), answered=8, ringed=[(1, 1)])]).ringed == []


def test_the_sign_test():
    assert select.sign_test(5, 0) == 1 / 32 and select.sign_test(4, 0) == 1 / 16
    assert select.sign_test(0, 0) == 1.0 and select.sign_test(0, 3) == 1.0
    assert select.sign_test(3, 1) == 5 / 16  # 3 or 4 of 4
    assert select.sign_test(12, 2) < 0.05 < select.sign_test(11, 4)


def test_rings_run_on_the_real_probes(gemma, source):
    """No scoring replaced: every candidate runs as masks with its quantized heads rounded."""
    plan = _solve(gemma, source, select_2bit=True, select_probes=1, select_lengths=(300,))
    rings = plan.meta["select_2bit"]
    assert rings["probes"] == 1 and len(rings["candidates"]) >= 4
    assert all(c["probe_nll"] > 0 for c in rings["candidates"])


def test_select_2bit_through_the_cli(gemma, source, monkeypatch, tmp_path, capsys):
    src = tmp_path / "src.json"
    source.save(src)
    monkeypatch.setattr(profile_cli, "load_from_args", lambda args: gemma)
    _scored_by(monkeypatch, lambda pols: 7 if (1, 1) in _ringed(pols) else 1)
    out = tmp_path / "p.json"
    rc = main(["profile", "tiny", "--budget", "0.4", "-o", str(out), "--from-scores", str(src), "--method",
               "retrieval", "--target-len", "512", "--full-share", "1.0", "--quantize", "--quant-2bit",
               "--quant-global-key-bits", "2", "--min-ring", "32", "--select-2bit", "--select-lengths", "300",
               "--select-probes", "8"])
    assert rc == 0
    plan = HeadPlan.load(out)
    assert "--select-2bit" in plan.meta["created_by"] and plan.meta["select_2bit"]["ringed"] == [[1, 1]]
    assert "--select-2bit: moved to the 32-token ring: layer 1 head 1" in capsys.readouterr().out


def test_select_2bit_without_two_bit_codes_is_a_one_line_error_before_loading(tmp_path, capsys):
    rc = main(["profile", "no-such-model", "--budget", "0.4", "-o", str(tmp_path / "p.json"), "--quantize",
               "--select-2bit"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "--select-2bit judges the heads the solver holds in 2-bit codes" in err and "Traceback" not in err


def test_profiling_with_select_2bit_refuses_a_menu_without_two_bit_codes_before_measuring(gemma):
    from headwise.errors import InputError
    from headwise.profile.runner import profile_model

    with pytest.raises(InputError, match="give --quantize --quant-2bit"):
        profile_model(gemma, 0.4, 512, "retrieval", full_share=1.0, quantize=QuantMenu(), select_2bit=True)


def _text_costs(monkeypatch, cost) -> list[int]:
    """``select.plan_text_logprobs`` and ``select.text_kl`` replaced: a plan's KL from dense on the held-in text is
    ``cost(policies)`` nats (dense 0). Returns a list that counts the text forwards."""
    runs: list[int] = []

    def fake_logprobs(lm, policies, text, keep, batch=8):
        runs.append(1)
        assert text.dim() == 2 and 0 < keep <= text.shape[1]
        return torch.tensor(0.0 if policies is None else float(cost(policies)))

    monkeypatch.setattr(select, "plan_text_logprobs", fake_logprobs)
    monkeypatch.setattr(select, "text_kl", lambda dense, plan: float(plan - dense))
    return runs


def test_a_ring_that_costs_the_text_is_not_kept(gemma, source, monkeypatch, capsys):
    """Run 32's 0.3 plan in small: the ring the probes prefer (7 of 8 against 1) adds 0.2 nats of text KL; within the
    default allowance (0.05) the plan is kept, with 'off' (probes alone) the ring is."""
    solved = _solve(gemma, source)
    _scored_by(monkeypatch, lambda pols: 7 if (1, 1) in _ringed(pols) else 1)
    _text_costs(monkeypatch, lambda pols: 0.1 + (0.2 if (1, 1) in _ringed(pols) else 0.0))
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    rings = plan.meta["select_2bit"]
    assert rings["ringed"] == [] and plan.policies() == solved.policies()
    assert rings["text"]["allowance"] == select.SELECT_TEXT_ALLOWANCE and rings["text"]["measured"]
    assert rings["candidates"][0]["text_kl"] == 0.1 and rings["candidates"][1]["text_kl"] == pytest.approx(0.3)
    assert rings["text"]["steps"] == [{"ringed": [[1, 1]], "text_kl": 0.3, "within": False}]
    from headwise.profile.runner import print_rings

    print_rings(rings)
    out = capsys.readouterr().out
    assert "moved to the 32-token ring: none" in out
    assert "held-in text KL: plan 0.100 nats; over the 0.05-nat allowance and not kept (layer.head): 1.1 (+0.200)" in out
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,), select_text_allowance=None)
    assert plan.meta["select_2bit"]["ringed"] == [[1, 1]] and "text" not in plan.meta["select_2bit"]


def test_rings_join_the_set_while_the_text_allows(gemma, source, monkeypatch):
    """Three rings each beat the plan within chance (3 of 8 against 1) and the three together beyond it (7), but each
    ring adds 0.02 nats of text: the set is built the most probes first while it stays within 0.05, so two heads
    are tried together (5 of 8, 4 gained: within chance at 8 probes, so the plan stays; at an allowance of 0.1 the
    three together are kept)."""
    _scored_by(monkeypatch, lambda pols: 1 + 2 * len(_ringed(pols)))
    forwards = _text_costs(monkeypatch, lambda pols: 0.02 * len(_ringed(pols)))
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    rings = plan.meta["select_2bit"]
    steps = rings["text"]["steps"]
    assert [s["within"] for s in steps] == [True, True, False] and len(steps[2]["ringed"]) == 3
    assert rings["candidates"][-1]["ringed"] == steps[1]["ringed"] and rings["candidates"][-1]["probes_answered"] == 5
    assert rings["candidates"][-1]["text_kl"] == pytest.approx(0.04)
    assert rings["ringed"] == []  # 4 gained, none lost: p = 1/16
    assert len(forwards) == 1 + 1 + 3 + 2  # dense, the plan, each ring, the two sets of several
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,), select_text_allowance=0.1)
    assert plan.meta["select_2bit"]["ringed"] == [list(h) for h in TWO_BIT]
    assert all(s["within"] for s in plan.meta["select_2bit"]["text"]["steps"])


def test_probe_hits_are_recorded_for_pairing_later(gemma, source, monkeypatch):
    _scored_by(monkeypatch, lambda pols: 7 if (1, 1) in _ringed(pols) else 1)
    _text_costs(monkeypatch, lambda pols: 0.0)
    plan = _solve(gemma, source, select_2bit=True, select_probes=8, select_lengths=(300,))
    cands = plan.meta["select_2bit"]["candidates"]
    assert cands[0]["probe_hits"] == "10000000" and cands[1]["probe_hits"] == "11111110"


def test_the_text_term_on_the_real_model(gemma):
    """No scoring replaced: a plan's text log-probs under its masks; dense's own KL is 0 and a plan that streams every
    head on a 32-token window loses text."""
    from headwise.profile.ablate import ablation_text

    text = ablation_text(gemma, 512, 256)
    dense = select.plan_text_logprobs(gemma, None, text, 64)
    assert dense.shape[:2] == (2, 64)
    assert select.text_kl(dense, dense) == 0.0
    ringed = [[Streaming(sink=0, window=32)] * 2] * 4
    assert select.text_kl(dense, select.plan_text_logprobs(gemma, ringed, text, 64)) > 1e-4


@pytest.mark.parametrize(("value", "said"), [("abc", "takes nats (e.g. 0.05) or 'off'"), ("-0.1", "a number >= 0"),
                                             ("nan", "a number >= 0")])
def test_a_bad_text_allowance_is_a_one_line_error(tmp_path, capsys, value, said):
    rc = main(["profile", "no-such-model", "--budget", "0.4", "-o", str(tmp_path / "p.json"), "--quantize",
               "--quant-2bit", "--select-2bit", "--select-text-allowance", value])
    err = capsys.readouterr().err
    assert rc != 0 and said in err and "Traceback" not in err


def test_a_text_allowance_without_select_2bit_is_refused(tmp_path, capsys):
    rc = main(["profile", "no-such-model", "--budget", "0.4", "-o", str(tmp_path / "p.json"),
               "--select-text-allowance", "0.1"])
    err = capsys.readouterr().err
    assert rc != 0 and "give --select-2bit" in err and "Traceback" not in err


def test_the_set_grows_while_the_text_allows():
    from headwise.profile.runner import rings_within_text

    sets = {((1, 1), (2, 0)): 0.14, ((1, 1), (2, 0), (2, 1)): 0.2, ((1, 1), (2, 1)): 0.16}
    chosen, kl, steps = rings_within_text([((2, 0), 0.11), ((1, 1), 0.12), ((2, 1), 0.3)],
                                          lambda hs: sets[tuple(hs)], 0.1, 0.05)
    assert chosen == [(1, 1), (2, 0)] and kl == 0.14
    assert [s["within"] for s in steps] == [True, True, False]
    assert steps[1]["ringed"] == [[1, 1], [2, 0]]  # sorted, as the candidate's ringed heads
    chosen, kl, steps = rings_within_text([((2, 1), 0.3), ((1, 1), 0.12)], lambda hs: sets[tuple(hs)], 0.1, 0.05)
    assert chosen == [(1, 1)] and kl == 0.12 and steps[0] == {"ringed": [[2, 1]], "text_kl": 0.3, "within": False}


def test_the_text_positions_stay_bounded():
    from headwise.profile.runner import select_text_positions

    assert select_text_positions(2, 4096) == 512 and select_text_positions(16, 512) == 64
    assert select_text_positions(1, 100) == 100 and select_text_positions(200, 512) == 16
