"""Plan selection by held-in retrieval: the masks are the policies' patterns, the scoring is greedy-exact."""

import pytest
import torch

from headwise.engine import Engine
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import Full
from headwise.policies.streaming import Streaming
from headwise.profile.select import plan_mask_attention, plan_masks, probe_set, retrieval_on_probes
from headwise.spec import ModelSpec


@pytest.fixture
def tiny(tiny_llama) -> LoadedModel:
    return tiny_llama


MIXED = [[Full(), Streaming(sink=4, window=8)], [Streaming(sink=2, window=16), Full()]]


def test_streaming_mask_is_the_policy_pattern_inside_the_native_window():
    spec = ModelSpec("gemma3_text", 2, 2, 1, 8, 128, (6, None))
    masks = plan_masks(spec, [[Streaming(sink=0, window=4)], [Streaming(sink=2, window=3)]], 10, torch.device("cpu"))
    pos = torch.arange(10)
    q, k = pos[:, None], pos[None, :]
    assert torch.equal(masks[0][0], (k <= q) & (q - k < 4))  # the narrower of the two windows
    assert torch.equal(masks[1][0], (k <= q) & ((k < 2) | (q - k < 3)))


def test_masked_forward_equals_the_engine_on_a_mixed_plan(tiny):
    """The selection's masked forward computes what the engine's caches compute for the same plan."""
    ids = torch.randint(0, 1000, (1, 40))
    plan = HeadPlan.from_policies(tiny.spec, MIXED, tiny.name)
    want = Engine(tiny, plan, chunk_size=16).logits(ids)
    from headwise.attention import attention_implementation
    from headwise.profile.select import PLAN_MASK_NAME

    assert plan_mask_attention is not None
    with torch.no_grad(), attention_implementation(tiny.model, PLAN_MASK_NAME):
        got = tiny.model(input_ids=ids, use_cache=False,
                         headwise_plan_masks=plan_masks(tiny.spec, MIXED, 40, torch.device("cpu"))).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_all_full_candidate_scores_as_dense(tiny):
    probes = probe_set(tiny.tokenizer, [300], 3)
    full = [[Full(), Full()], [Full(), Full()]]
    assert retrieval_on_probes(tiny, full, probes) == pytest.approx(retrieval_on_probes(tiny, None, probes))
    assert probes.ids[300].shape[0] == 3 and probes.ids[300].shape[1] > 300


def test_first_tokens_are_the_greedy_start_and_count_against_dense(tiny):
    """``probe_outcomes``' first token is what the model writes first after each probe's prompt (its argmax there,
    the answer not yet fed), and ``measure_budgets`` counts the probes a plan starts differently from dense: none
    for a plan of full heads, as many as differ for a streaming one."""
    from types import SimpleNamespace

    from headwise.profile.select import BudgetCandidate, measure_budgets, probe_outcomes

    probes = probe_set(tiny.tokenizer, [300], 4)
    hits, nll, first = probe_outcomes(tiny, None, probes)
    with torch.no_grad():
        want = tiny.model(input_ids=probes.ids[300][:, :300]).logits[:, -1].argmax(-1)
    assert torch.equal(first, want) and hits.shape == nll.shape == first.shape == (4,)
    ring = [[Streaming(sink=2, window=8)] * 2] * 2
    full = BudgetCandidate(1.0, SimpleNamespace(policies=[[Full(), Full()], [Full(), Full()]], fraction=1.0))
    narrow = BudgetCandidate(0.1, SimpleNamespace(policies=ring, fraction=0.1))
    measure_budgets(tiny, [full, narrow], probes)
    _, _, ringed = probe_outcomes(tiny, ring, probes)
    assert full.first_flips == 0 and narrow.first_flips == int((ringed != first).sum())
    assert narrow.info()["first_tokens_changed"] == narrow.first_flips


def test_probe_set_asks_for_one_fact_among_as_many_as_told(tiny):
    """``distractors`` reaches each probe: with 0 every probe holds its one fact (a passkey's shape), and the rows
    are the prompts of ``retrieval_probe`` with that count (the default, 2, the profiler's keyed facts)."""
    from headwise.probes import retrieval_probe

    single, keyed = probe_set(tiny.tokenizer, [300], 3, distractors=0), probe_set(tiny.tokenizer, [300], 3)
    assert not torch.equal(single.ids[300], keyed.ids[300])
    first = retrieval_probe(tiny.tokenizer, 300, 0.5 / 3, 1_000_003, 0)
    assert first.distractors == 0
    assert single.ids[300][0, :300].tolist() == first.ids


def test_a_quantized_head_is_scored_with_every_token_visible():
    from headwise.policies.quantized import Quantized

    spec = ModelSpec("llama", 1, 2, 2, 8, 128, (None,))
    full, quant = plan_masks(spec, [[Full(), Quantized(bits=4)]], 12, torch.device("cpu"))[0]
    assert torch.equal(full, quant)


def test_gemma_plan_resolved_with_quantize_keeps_global_heads_reachable(gemma3):
    """Issue 19: at a budget where Gemma's global heads cannot all stay full, --quantize keeps the ones the ranking
    scores (above 0) in 4-8 bits instead of streaming them."""
    from pathlib import Path

    from headwise.policies.quantized import Quantized
    from headwise.profile.runner import resolve_from_scores

    source = HeadPlan.load(Path(__file__).resolve().parents[1] / "plans" / "gemma3-270m-run9.json")
    args = (gemma3, source, 0.35, source.meta["target_len"], source.meta["method"])
    plain = resolve_from_scores(*args, full_share=1.0)
    quant = resolve_from_scores(*args, full_share=1.0, quantize=True)
    scores = source.meta["scores"][f"{source.meta['method']}_kv"]
    ranked = [i for i, w in enumerate(gemma3.spec.layer_windows) if w is None and scores[i][0] > 0]
    reach = lambda plan: sum(isinstance(plan.policies()[i][0], Full | Quantized) for i in ranked)  # noqa: E731
    assert reach(quant) == len(ranked) > reach(plain)  # every global head the ranking wants stays reachable
    assert quant.kv_fraction(gemma3.spec, source.meta["target_len"]) <= 0.35
