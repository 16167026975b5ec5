"""The budget solver: plans never exceed the budget, and the highest-scoring heads are the ones kept full."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from headwise.errors import BudgetError
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from headwise.profile.mass import SPAN_OPTIONS
from headwise.profile.solver import check_room, solve
from headwise.spec import ModelSpec

LLAMA = ModelSpec("llama", 6, 8, 4, 64, 8192, (None,) * 6)
GEMMA = ModelSpec("gemma3_text", 6, 4, 1, 256, 32768, (512, 512, None, 512, 512, None))


def _plan_fraction(spec: ModelSpec, sol, T: int) -> float:
    return HeadPlan.from_policies(spec, sol.policies).kv_fraction(spec, T)


@pytest.mark.parametrize("budget", [0.1, 0.25, 0.5, 1.0])
def test_plan_kv_memory_is_at_most_the_budget(budget):
    scores = torch.rand(6, 4, generator=torch.Generator().manual_seed(1))
    sol = solve(LLAMA, scores, budget, 4096)
    plan_tokens = HeadPlan.from_policies(LLAMA, sol.policies).kv_tokens(LLAMA, 4096)
    assert plan_tokens == sol.kv_tokens <= int(budget * LLAMA.dense_kv_tokens(4096))


def test_budget_is_spent_almost_entirely():
    sol = solve(LLAMA, torch.rand(6, 4), 0.25, 4096)
    # spans grow until no upgrade fits: less than one smallest span step is left over
    assert sol.cap_tokens - sol.kv_tokens < 64 * 4 * 6


def test_full_heads_are_the_highest_scoring():
    # 0.25 of 24 heads x 4096 = 24576 slots; 24 minimal spans take 24 x 128, each full head 3968 more: 5 fit
    scores = torch.zeros(6, 4)
    ranked = [(0, 1), (2, 3), (5, 0), (1, 1), (4, 2), (3, 2), (0, 0)]
    for rank, (i, j) in enumerate(ranked):
        scores[i, j] = 1.0 - 0.1 * rank
    sol = solve(LLAMA, scores, 0.25, 4096)
    assert set(sol.full_heads) == set(ranked[:5])
    assert all(isinstance(sol.policies[i][j], Full) for i, j in ranked[:5])
    assert not isinstance(sol.policies[3][2], Full)


def test_heads_scoring_zero_are_never_made_full():
    scores = torch.zeros(6, 4)
    scores[1, 2] = 0.3
    sol = solve(LLAMA, scores, 0.5, 4096)
    assert sol.full_heads == [(1, 2)]


def test_budget_one_keeps_every_scored_head_full():
    sol = solve(LLAMA, torch.rand(6, 4) + 0.01, 1.0, 4096)
    assert all(isinstance(p, Full) for row in sol.policies for p in row)


def test_spans_go_to_heads_that_lose_most_mass():
    # recall per (layer, head, option): heads of layer 0 need long spans, the others keep everything already
    recall = torch.ones(6, 4, len(SPAN_OPTIONS))
    for o, (a, b) in enumerate(SPAN_OPTIONS):
        recall[0, :, o] = min(1.0, (a + b * 4096) / 2048)
    sol = solve(LLAMA, torch.zeros(6, 4), 0.2, 4096, recall)
    windows = [[p.window for p in row] for row in sol.policies]
    assert min(windows[0]) > max(max(r) for r in windows[1:])


def test_gemma_sliding_layers_stream_inside_their_own_window():
    sol = solve(GEMMA, torch.zeros(6, 1), 0.25, 4096)
    for i, row in enumerate(sol.policies):
        if GEMMA.layer_windows[i] is not None:
            p = row[0]
            assert isinstance(p, Full) or (isinstance(p, Streaming) and p.sink == 0 and p.window < 512)


def test_gemma_global_head_is_skipped_when_it_cannot_fit():
    scores = torch.zeros(6, 1)
    scores[2, 0] = 1.0  # a global layer: full costs 4096 of the 0.25 * (4*512 + 2*4096) = 2560 allowed
    sol = solve(GEMMA, scores, 0.25, 4096)
    assert (2, 0) in sol.skipped and (2, 0) not in sol.full_heads


@pytest.mark.parametrize("budget", [0.0, -0.1, 1.5, float("nan")])
def test_budget_outside_zero_one_is_refused(budget):
    with pytest.raises(BudgetError, match=r"\(0, 1\]"):
        solve(LLAMA, torch.zeros(6, 4), budget, 4096)


def test_budget_below_smallest_streaming_plan_is_refused_with_numbers():
    with pytest.raises(BudgetError, match="below the smallest streaming plan"):
        solve(LLAMA, torch.zeros(6, 4), 0.01, 4096)


def test_a_budget_no_plan_reaches_is_refused_before_the_profile_measures(tiny_llama, monkeypatch):
    """``profile_model`` checks the room first: the same error as ``solve``'s, before minutes of measuring."""
    from headwise.profile import retrieval, runner

    monkeypatch.setattr(retrieval, "retrieval_scores", lambda *a, **k: pytest.fail("measured before the check"))
    with pytest.raises(BudgetError, match="below the smallest streaming plan"):
        runner.profile_model(tiny_llama, 0.25, target_len=256, method="ablation", full_share=1.0, progress=False)
    check_room(LLAMA, 0.5, 4096)  # room enough: no error


def test_full_share_caps_what_full_heads_take_and_keeps_the_budget():
    spec = ModelSpec("llama", 4, 4, 2, 16, 4096, (None,) * 4)
    scores = torch.arange(8, dtype=torch.float32).reshape(4, 2) + 1
    everything = solve(spec, scores, 0.5, 4096, full_share=1.0)
    half = solve(spec, scores, 0.5, 4096, full_share=0.5)
    none = solve(spec, scores, 0.5, 4096, full_share=0.0)
    assert len(none.full_heads) == 0 < len(half.full_heads) < len(everything.full_heads)
    for sol in (everything, half, none):
        assert sol.kv_tokens <= sol.cap_tokens


def test_fit_lengths_keep_the_budget_at_every_listed_length():
    """Solved for 4K with 4-bit heads, a Gemma-shaped plan held more than its budget at 2K (sliding layers cost the
    same at every length past their window); with fit_lengths the solver spends less until every length fits."""
    from headwise.profile.solver import held_fraction

    spec = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i in (5, 11, 17) else 512 for i in range(18)))
    over_somewhere = 0
    for seed in range(12):
        scores = torch.rand(18, 1, generator=torch.Generator().manual_seed(seed))
        plain = solve(spec, scores, 0.5, 4096, full_share=1.0, quantize=True)
        over_somewhere += any(held_fraction(spec, plain.policies, L) > 0.5 for L in (2048, 8192))
        fit = solve(spec, scores, 0.5, 4096, full_share=1.0, quantize=True, fit_lengths=(2048, 8192))
        for L in (2048, 4096, 8192):
            assert held_fraction(spec, fit.policies, L) <= 0.5 + 1e-9, (seed, L)
        assert fit.spent is not None and fit.spent <= 0.5
        assert fit.info()["spent_budget"] == fit.spent
    assert over_somewhere  # without fit_lengths the check above would fail for some of these rankings


def test_fit_lengths_that_no_plan_meets_are_refused_with_numbers():
    spec = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i in (5, 11, 17) else 512 for i in range(18)))
    with pytest.raises(BudgetError, match=r"no plan holds at most 0\.15 of dense KV"):
        solve(spec, torch.rand(18, 1), 0.15, 32768, full_share=1.0, quantize=True, fit_lengths=(600,))


def test_quant_menu_with_8_bit_global_keys_leaves_no_global_head_with_4_bit_keys():
    from headwise.policies import Quantized
    from headwise.profile.solver import QuantMenu

    scores = torch.rand(6, 1, generator=torch.Generator().manual_seed(3))
    plain = solve(GEMMA, scores, 0.5, 4096, quantize=True, full_share=1.0)
    menu = solve(GEMMA, scores, 0.5, 4096, quantize=QuantMenu(global_key_bits=8, residual=64), full_share=1.0)
    glob = [i for i in range(6) if GEMMA.native_window(i) is None]
    assert any(isinstance(plain.policies[i][0], Quantized) and plain.policies[i][0].k_bits == 4 for i in glob)
    quantized = {i: pol for i, (pol,) in enumerate(menu.policies) if isinstance(pol, Quantized)}
    assert all(i in quantized for i in glob)
    assert all(pol.residual == 64 for pol in quantized.values())
    assert all(quantized[i].k_bits == 8 for i in glob)
    assert any(pol.k_bits == 4 for i, pol in quantized.items() if i not in glob)  # sliding heads may keep 4-bit keys
    assert menu.kv_tokens <= menu.cap_tokens
    assert solve(GEMMA, scores, 0.5, 4096, quantize=QuantMenu(), full_share=1.0).policies == plain.policies


@pytest.mark.parametrize("kwargs", [{"global_key_bits": 6}, {"residual": 0}])
def test_quant_menu_refuses_what_no_store_holds(kwargs):
    from headwise.errors import InputError
    from headwise.profile.solver import QuantMenu

    with pytest.raises(InputError):
        QuantMenu(**kwargs)


def test_the_shipped_gemma_plan_is_what_its_command_solves_from_its_scores():
    """plans/gemma3-270m.json (run 20) is what the profiler's solver makes of the scores its profile measured (or,
    with ``--from-scores``, of the scores that plan recorded) under the options its command names: not a hand edit."""
    import shlex
    from pathlib import Path

    from headwise.eval.runner import parse_length
    from headwise.profile.runner import Spans
    from headwise.profile.solver import QuantMenu

    root = Path(__file__).resolve().parents[1]
    plan = HeadPlan.load(root / "plans" / "gemma3-270m.json")
    words = shlex.split(plan.meta["created_by"])
    arg = {w: words[k + 1] for k, w in enumerate(words[:-1]) if w.startswith("--")}
    source = HeadPlan.load(root / arg["--from-scores"]) if "--from-scores" in arg else plan
    spec = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))
    spans = Spans.from_meta(source.meta)
    assert spans is not None and source.meta["span_recall_target_len"] == int(arg["--target-len"])
    sol = solve(spec, torch.tensor(source.meta["scores"][f"{arg['--method']}_kv"]), float(arg["--budget"]),
                int(arg["--target-len"]), spans.value, full_share=float(arg["--full-share"]),
                quantize=QuantMenu(int(arg["--quant-global-key-bits"]), int(arg["--quant-residual"])),
                fit_lengths=tuple(parse_length(x) for x in arg["--fit-lengths"].split(",")))
    assert HeadPlan.from_policies(spec, sol.policies, "gemma3-270m").digest() == plan.digest()


def _gemma_run10_scores():
    """Gemma 3's attention shape and run 10's mass scores and span values (plans/gemma3-270m-run10.json)."""
    from pathlib import Path

    from headwise.profile.runner import Spans

    source = HeadPlan.load(Path(__file__).resolve().parents[1] / "plans" / "gemma3-270m-run10.json")
    spec = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))
    spans = Spans.from_meta(source.meta)
    assert spans is not None
    return spec, torch.tensor(source.meta["scores"]["mass_kv"]), spans.value


def test_the_8_bit_key_floor_gives_way_where_it_would_leave_global_heads_unreachable():
    """Run 21 (H200): with 8-bit keys required on Gemma 3's global heads, budget 0.25 kept one of the three and its
    plan found no passkey (0.35 kept two). The solver now takes 4-bit keys where they keep more global heads whole,
    and keeps the floor where every global head fits at 8 bits (the shipped 0.5 plan)."""
    from headwise.policies import Full, Quantized
    from headwise.profile.solver import QuantMenu

    spec, scores, value = _gemma_run10_scores()

    def kept(sol):
        return [i for i in (5, 11, 17) if isinstance(sol.policies[i][0], Full | Quantized)]

    def run(budget, bits):
        return solve(spec, scores, budget, 4096, value, full_share=1.0, quantize=QuantMenu(bits, 64))

    low, low4 = run(0.25, 8), run(0.25, 4)
    assert len(kept(low4)) >= 2 and low.global_key_bits == 4 and low.policies == low4.policies
    assert low.info()["global_key_bits"] == 4
    mid = run(0.35, 8)
    assert mid.global_key_bits == 4 and kept(mid) == [5, 11, 17]
    floor = run(0.5, 8)
    assert floor.global_key_bits == 8 and kept(floor) == [5, 11, 17]
    assert all(floor.policies[i][0].k_bits == 8 for i in (5, 11, 17) if isinstance(floor.policies[i][0], Quantized))


def test_the_2_bit_rung_keeps_global_heads_reachable_below_what_4_bits_allow():
    """Gemma 3 from run 10's scores at budget 0.25: 4-bit codes keep two of the three global heads whole (run 22's
    plan); with the 2-bit options and the key floor lowered to 2 (``--quant-2bit --quant-global-key-bits 2``) all
    three stay reachable, in KIVI-2; with the default floor the global heads keep 4-bit keys (over 2-bit values) and
    the rest of the budget keeps more sliding heads whole. Without the flag no 2-bit option is handed out; every plan
    stays in budget."""
    from headwise.errors import InputError
    from headwise.policies import Full, Quantized
    from headwise.profile.solver import QuantMenu, held_fraction

    spec, scores, value = _gemma_run10_scores()

    def run(menu):
        return solve(spec, scores, 0.25, 4096, value, full_share=1.0, quantize=menu)

    def whole(sol):
        return [sol.policies[i][0] for i in (5, 11, 17) if isinstance(sol.policies[i][0], Full | Quantized)]

    def quantized(sol):
        return [p for row in sol.policies for p in row if isinstance(p, Quantized)]

    four = run(QuantMenu(residual=64))
    two = run(QuantMenu(residual=64, two_bit=True))
    two_keys = run(QuantMenu(global_key_bits=2, residual=64, two_bit=True))
    assert len(whole(four)) == 2 and len(whole(two_keys)) == 3 and all(p.bits == 2 for p in whole(two_keys))
    assert len(whole(two)) >= 2 and all(p.k_bits >= 4 for p in whole(two))
    assert len(quantized(two)) > len(quantized(four)) and all(p.bits >= 4 for p in quantized(four))
    for sol in (four, two, two_keys):
        assert held_fraction(spec, sol.policies, 4096) <= 0.25 + 1e-9
    assert QuantMenu(two_bit=True).flags() == ["--quantize", "--quant-2bit"]
    with pytest.raises(InputError, match="--quant-2bit"):
        QuantMenu(global_key_bits=2)


def test_a_smaller_ring_floor_lets_two_global_heads_stay_whole_far_below_the_spans_floor():
    """Below ~0.19 of dense at 4K no Gemma 3 plan with 128-token rings keeps two global heads (run 23: at 0.16 one, and
    no passkey). ``QuantMenu(min_ring=32)`` (``--min-ring 32``) adds a 32-token ring under the spans (a window of 32
    on a sliding layer, 16 sinks and 16 recent tokens on a global one), valued below every span: at 0.12 two global
    heads stay whole in 2 bits, the plan holds at most 0.12 of dense at 4K, and where the budget allows 128-token
    rings the solver still grows rings before it takes the last resort (0.5: no 32-token ring)."""
    from headwise.errors import InputError
    from headwise.policies import Full, Quantized
    from headwise.profile.solver import QuantMenu, head_options, held_fraction

    spec, scores, value = _gemma_run10_scores()
    menu = QuantMenu(global_key_bits=2, residual=64, two_bit=True, min_ring=32)

    def whole(sol):
        return [i for i in (5, 11, 17) if isinstance(sol.policies[i][0], Full | Quantized)]

    with pytest.raises(BudgetError, match="smallest streaming plan"):
        solve(spec, scores, 0.1, 4096, value, full_share=1.0, quantize=replace(menu, min_ring=0))
    assert whole(solve(spec, scores, 0.12, 4096, value, full_share=1.0, quantize=replace(menu, min_ring=0))) == []
    sol = solve(spec, scores, 0.12, 4096, value, full_share=1.0, quantize=menu)
    assert len(whole(sol)) >= 2 and held_fraction(spec, sol.policies, 4096) <= 0.12 + 1e-9
    rings = {p for row in sol.policies for p in row if isinstance(p, Streaming) and p.sink + p.window == 32}
    assert rings == {Streaming(sink=0, window=32), Streaming(sink=16, window=16)}
    opts = head_options(spec, 0, 4096, value[0, 0], menu)  # a sliding layer: the ring first, valued below every span
    assert opts[0].policy == Streaming(sink=0, window=32) and opts[0].cost == 32 and opts[0].value == 0.0
    assert opts[1].cost == 128 and opts[1].value > 0
    roomy = solve(spec, scores, 0.5, 4096, value, full_share=1.0, quantize=menu)
    assert not any(isinstance(p, Streaming) and p.sink + p.window < 128 for row in roomy.policies for p in row)
    assert menu.flags() == ["--min-ring", "32", "--quantize", "--quant-2bit", "--quant-global-key-bits", "2",
                            "--quant-residual", "64"]
    assert QuantMenu(quantized=False, min_ring=48).flags() == ["--min-ring", "48"]
    assert QuantMenu(quantized=False, min_ring=48).options(True) == ()
    for bad in (7, 128, True, 40.0):
        with pytest.raises(InputError, match="smallest streaming ring"):
            QuantMenu(min_ring=bad)
