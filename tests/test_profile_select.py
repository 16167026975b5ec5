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
