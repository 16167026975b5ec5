"""The engine with the dense plan is transformers' own forward, on every supported architecture."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.plan import HeadPlan
from tiny import ARCHS, tiny_model


@pytest.mark.parametrize("arch", ARCHS)
def test_dense_plan_matches_transformers_on_tiny_models(arch):
    lm = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 97))
    with torch.inference_mode():
        ref = lm.model(ids).logits
    out = Engine(lm, chunk_size=1000).logits(ids)
    assert (out - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_chunked_prefill_equals_one_shot_on_tiny_models(arch):
    lm = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 97))
    one = Engine(lm, chunk_size=1000).logits(ids)
    chunked = Engine(lm, chunk_size=13).logits(ids)
    assert (one - chunked).abs().max().item() <= 1e-4


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_greedy_generation_matches_transformers_generate(arch):
    lm = tiny_model(arch)
    ids = torch.randint(0, 128, (1, 40))
    ref = lm.model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[0, 40:].tolist()
    ours = [e.token_id for e in Engine(lm, chunk_size=16).generate(ids[0], max_new_tokens=12, stop_token_ids=[])
            if e.stats is None]
    assert ours == ref


def test_batch_of_two_sequences_matches_each_alone():
    lm = tiny_model("qwen3")
    ids = torch.randint(0, 128, (2, 33))
    eng = Engine(lm, chunk_size=8)
    both = eng.logits(ids)
    for b in range(2):
        alone = eng.logits(ids[b : b + 1])
        assert (both[b] - alone[0]).abs().max().item() <= 1e-5


def test_native_sliding_window_layers_store_only_their_window():
    lm = tiny_model("gemma3_text")
    eng = Engine(lm)
    cache = eng.new_cache()
    eng.prefill(torch.randint(0, 128, (1, 70)), cache)
    for i, layer in enumerate(cache.layers):
        (group,) = layer.groups
        slots = group.store.keys.shape[2]
        assert slots == (16 if lm.spec.layer_windows[i] else 70)


def test_streaming_plan_is_chunk_size_invariant():
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, {"policy": "streaming", "params": {"sink": 3, "window": 10}})
    ids = torch.randint(0, 128, (1, 61))
    a = Engine(lm, plan, chunk_size=1000).logits(ids)
    b = Engine(lm, plan, chunk_size=7).logits(ids)
    assert (a - b).abs().max().item() <= 1e-4


def test_streaming_with_window_covering_everything_is_dense():
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, {"policy": "streaming", "params": {"sink": 0, "window": 200}})
    ids = torch.randint(0, 128, (1, 50))
    assert (Engine(lm, plan).logits(ids) - Engine(lm).logits(ids)).abs().max().item() <= 1e-5


def test_mixed_plan_groups_heads_and_differs_from_dense():
    lm = tiny_model("llama")
    spec = lm.spec
    plan = HeadPlan.dense(spec)
    plan.layers[1][0] = {"policy": "streaming", "params": {"sink": 2, "window": 4}}
    eng = Engine(lm, plan, chunk_size=9)
    cache = eng.new_cache()
    ids = torch.randint(0, 128, (1, 40))
    mixed = eng.prefill(ids, cache, all_logits=True)
    assert len(cache.layers[1].groups) == 2 and len(cache.layers[0].groups) == 1
    assert (mixed - Engine(lm).logits(ids)).abs().max().item() > 1e-3


def test_consecutive_head_groups_are_views_and_equal_a_gather():
    """A group of consecutive KV heads takes the layer's heads as a view (no copy) and writes its output back by a
    slice; an interleaved group gathers and scatters. Both give a gather's result (on the model's layout: heads a
    transposed view)."""
    from headwise.cache import group_heads
    from headwise.policies import build_policy

    full, stream = build_policy({"policy": "full"}), build_policy({"policy": "streaming", "params": {"sink": 2, "window": 4}})
    q, kv = torch.randn(2, 5, 8, 6).transpose(1, 2), torch.randn(2, 5, 4, 6).transpose(1, 2)
    for policies in ([full, full, stream, stream], [full, stream, full, stream]):
        for g in group_heads(policies, 2, torch.device("cpu")):
            assert (g.kv_range is not None) == (g.kv_heads == list(range(g.kv_heads[0], g.kv_heads[-1] + 1)))
            got_q, got_k = g.heads_of(q, 2), g.heads_of(kv)
            torch.testing.assert_close(got_q, q.index_select(1, g.q_index))
            torch.testing.assert_close(got_k, kv.index_select(1, g.kv_index))
            assert (got_k.data_ptr() == kv[:, g.kv_heads[0]].data_ptr()) == (g.kv_range is not None)
            out, want = torch.zeros_like(q), torch.zeros_like(q)
            g.write_heads(out, got_q + 1)
            want.index_copy_(1, g.q_index, got_q + 1)
            assert torch.equal(out, want)
