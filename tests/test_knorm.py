"""``knorm`` (policies/knorm.py): which tokens it keeps, against a brute-force reference, whatever the chunking;
its attention against masked attention over the full sequence; its KV held; the eval's ``knorm@equal`` baseline;
and a plan with knorm heads generating through the engine."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from headwise.attention import attention_implementation
from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.eval.runner import knorm_baseline, resolve_plans
from headwise.plan import HeadPlan
from headwise.policies import Full, Quantized, Streaming, build_policy
from headwise.policies.base import AttendContext, masked_attention
from headwise.policies.knorm import KNorm
from headwise.profile.select import PLAN_MASK_NAME, KNormKeep, plan_masks, plan_rounding
from headwise.spec import ModelSpec
from tiny import tiny_model


def _expected_held(keys: torch.Tensor, tokens: int, window: int) -> list[list[set[int]]]:
    """Positions each (batch, head) holds after ``keys [B, H, n, D]``: the newest ``window``, and among the older
    ones the ``tokens`` of smallest norm (ties: the older)."""
    B, H, n, _ = keys.shape
    older = max(0, n - window)
    norms = keys.float().norm(dim=-1)
    out = []
    for b in range(B):
        row = []
        for h in range(H):
            ranked = sorted(range(older), key=lambda p, b=b, h=h: (norms[b, h, p].item(), p))
            row.append(set(ranked[:tokens]) | set(range(older, n)))
        out.append(row)
    return out


@pytest.mark.parametrize("cuts", [[0, 200], [0, 7, 50, 51, 52, 130, 200], list(range(0, 201))])
@pytest.mark.parametrize("tokens,window", [(20, 8), (0, 5), (37, 0), (300, 16)])
def test_the_store_keeps_the_smallest_norms_and_the_newest_whatever_the_chunking(cuts, tokens, window):
    g = torch.Generator().manual_seed(tokens + window)
    B, H, n, D = 2, 3, 200, 8
    keys = torch.randn(B, H, n, D, generator=g)
    keys[:, :, 100:110] = keys[:, :, 90:100]  # exact norm ties across chunks: the older one must stay
    values = torch.randn(B, H, n, D, generator=g)
    store = KNorm(tokens=tokens, window=window).make_store(B, H, D, "cpu", torch.float32)
    for a, b in pairwise(cuts):
        store.append(keys[:, :, a:b], values[:, :, a:b])
    k, v, pos = store.view()
    assert store.tokens == n and k.shape[2] == min(n, tokens + window)
    want = _expected_held(keys, tokens, window)
    for b in range(B):
        for h in range(H):
            assert set(pos[b, h].tolist()) == want[b][h]
            # each slot holds its own position's key and value
            torch.testing.assert_close(k[b, h], keys[b, h, pos[b, h]])
            torch.testing.assert_close(v[b, h], values[b, h, pos[b, h]])


def test_a_chunk_attends_exactly_what_was_held_before_it_and_itself_causally():
    g = torch.Generator().manual_seed(1)
    policy = KNorm(tokens=24, window=8)
    B, Hq, Hkv, D, prior, L = 1, 4, 2, 16, 90, 33
    keys = torch.randn(B, Hkv, prior + L, D, generator=g)
    values = torch.randn(B, Hkv, prior + L, D, generator=g)
    q = torch.randn(B, Hq, L, D, generator=g)
    store = policy.make_store(B, Hkv, D, "cpu", torch.float32)
    store.append(keys[:, :, :50], values[:, :, :50])
    store.append(keys[:, :, 50:prior], values[:, :, 50:prior])
    held = store.view()[2]
    got = policy.attend(q, keys[:, :, prior:], values[:, :, prior:], store, AttendContext(start=prior, scale=D**-0.5))
    # the reference: every position of the sequence, a mask per KV head (expanded to its query heads)
    q_pos = torch.arange(prior, prior + L)[:, None]
    k_pos = torch.arange(prior + L)[None, :]
    chunk = (k_pos >= prior) & (k_pos <= q_pos)
    masks = []
    for h in range(Hkv):
        was_held = torch.zeros(prior + L, dtype=torch.bool)
        was_held[held[0, h]] = True
        masks += [chunk | was_held[None, :]] * (Hq // Hkv)
    want = masked_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1), torch.stack(masks)[None],
                            D**-0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert store.tokens == prior + L


def test_kv_is_bounded_by_the_slots_and_by_the_tokens_seen():
    p = KNorm(tokens=100, window=20)
    assert [p.kv_tokens(n) for n in (1, 50, 120, 10_000)] == [1, 50, 120, 120]
    store = p.make_store(1, 2, 8, "cpu", torch.float32)
    store.append(torch.randn(1, 2, 1000, 8), torch.randn(1, 2, 1000, 8))
    assert sum(t.numel() for t in store.tensors()) == 2 * 120 * 2 * 8
    # and no tensor is a view that keeps the chunk alive: storage is what the slots need
    assert sum(t.untyped_storage().nbytes() for t in store.tensors()) == 2 * 120 * 2 * 8 * 4
    with pytest.raises(PlanError, match="at least 1"):
        build_policy({"policy": "knorm", "params": {"tokens": 0, "window": 0}})
    with pytest.raises(PlanError, match="non-negative"):
        build_policy({"policy": "knorm", "params": {"tokens": -1}})


def test_the_knorm_baseline_holds_the_target_and_keeps_native_windows():
    gemma_like = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i in (5, 11, 17) else 512 for i in range(18)))
    L, target = 4096, 0.3 * gemma_like.dense_kv_tokens(4096)
    base = knorm_baseline(gemma_like, "g", target, L, "knorm@0.3")
    assert target - 18 < base.kv_tokens(gemma_like, L) <= target
    assert base.layers[5][0]["policy"] == "knorm" and base.layers[0][0]["policy"] in ("full", "streaming")


def test_knorm_at_equal_memory_resolves_and_generates(smollm2, tmp_path):
    spec = smollm2.spec
    ref = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 4, "window": 60}}, "smollm2-135m")
    path = ref.save(tmp_path / "mine.json")
    entry = resolve_plans([str(path), "knorm@equal"], smollm2)[1]
    assert entry.label == "knorm@equal"
    plan = entry.plan_for(256)
    assert ref.kv_tokens(spec, 256) - spec.num_layers * spec.num_kv_heads < plan.kv_tokens(spec, 256) <= ref.kv_tokens(spec, 256)


def _run(lm, plan, prompt):
    events = list(Engine(lm, plan, chunk_size=32).generate(prompt, max_new_tokens=6, stop_token_ids=[]))
    return [e.token_id for e in events if e.token_id >= 0], events[-1].stats


def test_a_plan_with_knorm_heads_generates_and_holds_what_it_says():
    """On the tiny model, the prompt in chunks of 32: knorm heads with room for every token give dense's greedy
    tokens; tight ones generate, and the KV held is the plan's count."""
    lm = tiny_model()
    spec = lm.spec
    prompt = list(range(5, 5 + 90))
    dense, _ = _run(lm, HeadPlan.dense(spec, lm.name), prompt)
    roomy = HeadPlan.uniform(spec, {"policy": "knorm", "params": {"tokens": 200, "window": 8}}, lm.name)
    assert _run(lm, roomy, prompt)[0] == dense
    tight = HeadPlan.uniform(spec, {"policy": "knorm", "params": {"tokens": 20, "window": 8}}, lm.name)
    tight.layers[0] = [{"policy": "full"}] * spec.num_kv_heads
    ids, stats = _run(lm, tight, prompt)
    assert len(ids) == 6
    # the last token generated is never fed back: the cache holds prompt + 5 tokens
    assert stats.kv_bytes == tight.kv_bytes(spec, len(prompt) + 5, lm.dtype.itemsize)


K = KNorm(tokens=10, window=6)


@pytest.mark.parametrize("policies", [
    [[K, Full()], [K, K], [Full(), K]],
    [[K, Quantized(bits=4, group=8, residual=8)], [Streaming(sink=2, window=12), K], [K, Full()]],
])
def test_the_profilers_masked_forward_keeps_what_the_engine_keeps(policies):
    """Chunked prefill then decode steps through the engine (knorm heads in their stores) give the logits of one
    masked forward whose knorm heads see what ``select._knorm_masks`` derives from the keys' norms, per sequence of
    a batch of two (each as it would alone). Without it (every knorm head full) the masked forward misses."""
    lm = tiny_model("llama", num_hidden_layers=3)
    prompt, total, chunk = 45, 50, 16
    ids = torch.randint(0, 128, (2, total), generator=torch.Generator().manual_seed(3))
    plan = HeadPlan.from_policies(lm.spec, policies)
    real = []
    for b in range(2):
        engine = Engine(lm, plan, chunk_size=chunk)
        cache = engine.new_cache(1)
        logits = [engine.prefill(ids[b : b + 1, :prompt], cache, all_logits=True)[0]]
        logits += [engine.forward(ids[b : b + 1, p : p + 1], cache) for p in range(prompt, total)]
        real.append(torch.cat(logits))
    real = torch.stack(real)
    masks = plan_masks(lm.spec, policies, total, torch.device("cpu"))
    emulated = plan_rounding(lm.spec, policies, prompt, total, torch.device("cpu"), chunk, False)
    assert any(isinstance(g, KNormKeep) for row in emulated for g in row)
    with torch.no_grad(), attention_implementation(lm.model, PLAN_MASK_NAME):
        got = lm.model(input_ids=ids, use_cache=False, headwise_plan_masks=masks,
                       headwise_plan_rounding=emulated).logits
        unaware = lm.model(input_ids=ids, use_cache=False, headwise_plan_masks=masks,
                           headwise_plan_rounding=[[g for g in row if not isinstance(g, KNormKeep)]
                                                   for row in emulated]).logits
    err = (got - real).abs().max()
    assert err < 1e-4
    assert (unaware - real).abs().max() > 100 * err


def test_knorm_heads_under_the_page_pool_generate_what_they_generate_alone():
    """Beside the pool (their own stores, their pages counted), knorm heads batched with other sequences give each
    sequence's greedy tokens alone, as every policy must (issue 13's equivalence)."""
    from headwise.pool import PagePool

    lm = tiny_model("llama")
    plan = HeadPlan.from_policies(lm.spec, [[KNorm(tokens=12, window=4), Full()]] * 4)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (9, 40, 27)]
    want = [[e.token_id for e in Engine(lm, plan, chunk_size=16).generate(p, max_new_tokens=8, stop_token_ids=[])
             if e.token_id >= 0] for p in prompts]
    pool = PagePool(lm.spec, budget_bytes=4 * 4 * 2 * 16 * 4 * 200, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool)
    seqs = [engine.add(p, max_new_tokens=8, stop_token_ids=[]) for p in prompts]
    while not all(s.finished for s in seqs):
        engine.step()
    got = [[e.token_id for e in s.take_events() if e.token_id >= 0] for s in seqs]
    assert got == want
