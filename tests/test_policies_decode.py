"""Decode-selection policies: page_topk (Quest), tidal (TidalDecode), recycled (Recycled Attention)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # the kernel path runs in Triton's interpreter on CPU tensors (on a GPU machine, setting it would switch
    # every later test's kernels to the interpreter too)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headwise.cache import HeadwiseCache
from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.kernels.common import INTERPRET
from headwise.plan import HeadPlan
from headwise.policies import AttendContext, build_policy
from headwise.policies.page_topk import PageTopK
from headwise.policies.recycled import Recycled
from headwise.policies.tidal import Tidal, tidal_policies
from tiny import tiny_model

# The tiny model runs on the CPU: its kernel path needs the interpreter (another test module may have imported
# the kernels first, compiled for a GPU).
needs_interpreter = pytest.mark.skipif(not INTERPRET,
                                       reason="kernels were decorated for a GPU; CPU tensors need TRITON_INTERPRET=1")
PROMPT = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def _generate(lm, plan, use_kernels=False, n=8):
    """Greedy tokens; the kernel path (Triton's interpreter, slow) generates 4."""
    n = 4 if use_kernels else n
    engine = Engine(lm, plan, chunk_size=32, use_kernels=use_kernels)
    return [e.token_id for e in engine.generate(PROMPT, max_new_tokens=n) if e.token_id >= 0]


@pytest.mark.parametrize(
    "head",
    [
        {"policy": "page_topk", "params": {"page_size": 16, "budget": 4096}},
        {"policy": "recycled", "params": {"budget": 4096, "stride": 3}},
    ],
    ids=["page_topk", "recycled"],
)
@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=needs_interpreter)], ids=["reference", "kernel"])
def test_full_budget_generates_like_dense(tiny, head, use_kernels):
    plan = HeadPlan.uniform(tiny.spec, head)
    assert _generate(tiny, plan, use_kernels) == _generate(tiny, HeadPlan.dense(tiny.spec), n=4 if use_kernels else 8)


def test_tidal_with_full_budget_generates_like_dense(tiny):
    plan = HeadPlan.from_policies(tiny.spec, tidal_policies(4, 2, budget=4096, selection_layers=(1,)))
    assert _generate(tiny, plan) == _generate(tiny, HeadPlan.dense(tiny.spec))


@needs_interpreter
def test_small_budgets_change_the_output_and_kernel_matches_reference(tiny):
    """With budgets far below the context the policies really select (the output moves away from dense),
    and the Triton path selects and attends exactly as the reference path."""
    plans = [
        HeadPlan.uniform(tiny.spec, {"policy": "page_topk", "params": {"page_size": 16, "budget": 32}}),
        HeadPlan.from_policies(tiny.spec, tidal_policies(4, 2, budget=20, selection_layers=(1,))),
        HeadPlan.uniform(tiny.spec, {"policy": "recycled", "params": {"budget": 10, "stride": 3}}),
    ]
    dense = _generate(tiny, HeadPlan.dense(tiny.spec))
    for plan in plans:
        ref = _generate(tiny, plan)
        assert ref != dense
        assert _generate(tiny, plan, use_kernels=True) == ref[:4]


def _needle_kv(seq: int = 160, dim: int = 16, needle: int = 77):
    """One KV head whose keys are noise except one page holding a key aligned with the query."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 1, dim, generator=g)
    k = 0.1 * torch.randn(1, 1, seq, dim, generator=g)
    v = torch.zeros(1, 1, seq, dim)
    k[0, 0, needle] = 4 * q[0, :, 0].mean(0)
    v[0, 0, needle] = 1.0
    return q, k, v


def test_page_topk_finds_the_page_holding_the_needle():
    q, k, v = _needle_kv()
    policy = PageTopK(page_size=16, budget=48)  # first + newest + one more page
    store = policy.make_store(1, 1, 16, torch.device("cpu"), torch.float32)
    policy.attend(q.expand(1, 2, 159, 16), k[:, :, :159], v[:, :, :159], store, AttendContext(0, 1.0))
    table = policy.select(q[:, :, 0], store, use_kernels=False)  # before the decode token
    assert 77 // 16 in table[0, 0].tolist() and 0 in table[0, 0].tolist()
    out = policy.attend(q, k[:, :, 159:], v[:, :, 159:], store, AttendContext(159, 1.0))
    assert out[0, :, 0].mean() > 0.5  # most of the attention mass reached the needle's value


def test_page_topk_counts_page_bounds_in_kv_bytes():
    policy = PageTopK(page_size=16, budget=64)
    assert policy.kv_tokens(97) == 97 + 7
    store = policy.make_store(1, 2, 8, torch.device("cpu"), torch.float32)
    store.reserve(97)
    store.append(torch.zeros(1, 2, 97, 8), torch.zeros(1, 2, 97, 8))
    assert sum(t.numel() for t in store.tensors()) == policy.kv_tokens(97) * 2 * 2 * 8


def test_page_topk_rejects_a_page_size_that_is_not_a_power_of_two():
    with pytest.raises(PlanError, match="power of two"):
        build_policy({"policy": "page_topk", "params": {"page_size": 12}})


def test_tidal_reuses_the_selection_layers_positions_per_kv_head():
    g = torch.Generator().manual_seed(2)
    shared: dict = {}
    S, D = 40, 8
    q = torch.randn(1, 4, 1, D, generator=g)  # 2 KV heads x 2 query heads
    keys = [torch.randn(1, 2, S, D, generator=g) for _ in range(2)]
    vals = [torch.randn(1, 2, S, D, generator=g) for _ in range(2)]
    sel, reuse = Tidal(budget=5, select=True), Tidal(budget=5)
    stores = [p.make_store(1, 2, D, torch.device("cpu"), torch.float32) for p in (sel, reuse)]
    for i, (policy, store) in enumerate(zip((sel, reuse), stores)):
        ctx = AttendContext(0, 1.0, layer_idx=i, shared=shared, kv_heads=(0, 1))
        policy.attend(q.expand(1, 4, S - 1, D), keys[i][:, :, :-1], vals[i][:, :, :-1], store, ctx)
    outs = []
    for i, (policy, store) in enumerate(zip((sel, reuse), stores)):
        ctx = AttendContext(S - 1, 1.0, layer_idx=i, shared=shared, kv_heads=(0, 1))
        outs.append(policy.attend(q, keys[i][:, :, -1:], vals[i][:, :, -1:], store, ctx))
    # The selection layer attended fully and picked, per KV head, the positions with the most mass.
    probs = torch.softmax(torch.einsum("bhd,bhsd->bhs", q[:, :, 0], keys[0].repeat_interleave(2, 1)), -1)
    top = probs.view(1, 2, 2, S).sum(2).topk(5, dim=-1).indices
    assert [sorted(r.tolist()) for r in top[0]] == [sorted(shared["tidal"]["selected"][h][0].tolist()) for h in (0, 1)]
    torch.testing.assert_close(outs[0], F.scaled_dot_product_attention(q, keys[0], vals[0], scale=1.0, enable_gqa=True))
    # The next layer attended, per KV head, to exactly those positions.
    mask = torch.zeros(1, 2, S, dtype=torch.bool)
    mask.scatter_(2, top, True)
    expected = F.scaled_dot_product_attention(q, keys[1], vals[1], scale=1.0, enable_gqa=True,
                                              attn_mask=mask.repeat_interleave(2, 1)[:, :, None])
    torch.testing.assert_close(outs[1], expected)


def test_tidal_heads_before_the_first_selection_layer_attend_fully():
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 2, 1, 8, generator=g), torch.randn(1, 1, 30, 8, generator=g), torch.randn(1, 1, 30, 8, generator=g)
    policy = Tidal(budget=3)
    store = policy.make_store(1, 1, 8, torch.device("cpu"), torch.float32)
    store.append(k[:, :, :-1], v[:, :, :-1])
    out = policy.attend(q, k[:, :, -1:], v[:, :, -1:], store, AttendContext(29, 1.0, shared={}, kv_heads=(0,)))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=1.0, enable_gqa=True))


def test_recycled_refreshes_every_stride_and_attends_remembered_plus_new_tokens_in_between():
    g = torch.Generator().manual_seed(4)
    S, D, steps = 50, 8, 5
    q = torch.randn(1, 2, steps, D, generator=g)
    k, v = torch.randn(1, 1, S + steps, D, generator=g), torch.randn(1, 1, S + steps, D, generator=g)
    policy = Recycled(budget=6, stride=3)
    store = policy.make_store(1, 1, D, torch.device("cpu"), torch.float32)
    store.append(k[:, :, :S], v[:, :, :S])
    for t in range(steps):
        p = S + t
        out = policy.attend(q[:, :, t : t + 1], k[:, :, p : p + 1], v[:, :, p : p + 1], store, AttendContext(p, 1.0))
        if t % 3 == 0:  # full step: exact attention, and it remembers the top positions before it
            assert store.anchor == p and store.selected is not None and store.selected.shape[-1] == 6
            mask = torch.ones(p + 1, dtype=torch.bool)
        else:
            mask = torch.zeros(p + 1, dtype=torch.bool)
            mask[store.selected[0, 0]] = True
            mask[store.anchor :] = True
        expected = F.scaled_dot_product_attention(q[:, :, t : t + 1], k[:, :, : p + 1], v[:, :, : p + 1], scale=1.0,
                                                  enable_gqa=True, attn_mask=mask[None, :])
        torch.testing.assert_close(out, expected)


def test_decode_policies_keep_the_full_cache(tiny):
    plan = HeadPlan.uniform(tiny.spec, {"policy": "tidal", "params": {"budget": 8}})
    cache = HeadwiseCache(tiny.spec, plan)
    Engine(tiny, plan).prefill(PROMPT, cache)
    assert cache.kv_bytes() == tiny.spec.dense_kv_bytes(100, 4)


def _decode_kernel_matches_reference(policy, group: int) -> None:
    """Feed two stores the same 7-token prompt and 23 decode steps; the kernel path's outputs equal the
    reference path's at every step."""
    g = torch.Generator().manual_seed(5)
    B, Hkv, D = 2, 2, 16
    stores = [policy.make_store(B, Hkv, D, torch.device("cpu"), torch.float32) for _ in range(2)]
    prompt_k, prompt_v = torch.randn(2, B, Hkv, 7, D, generator=g)
    for store in stores:  # a 7-token prompt (a streaming ring is not full yet)
        policy.attend(torch.randn(B, Hkv * group, 7, D, generator=g), prompt_k, prompt_v, store,
                      AttendContext(start=0, scale=D**-0.5))
    for pos in range(7, 30):
        q = torch.randn(B, Hkv * group, 1, D, generator=g)
        k, v = torch.randn(2, B, Hkv, 1, D, generator=g)
        outs = [policy.attend(q, k, v, store, AttendContext(start=pos, scale=D**-0.5, use_kernels=use))
                for store, use in zip(stores, (False, True))]
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_full_decode_kernel_matches_the_reference(group):
    _decode_kernel_matches_reference(build_policy({"policy": "full"}), group)


@needs_interpreter
@pytest.mark.parametrize("group", [1, 4], ids=["mha", "gqa4"])
def test_streaming_decode_kernel_matches_the_reference_as_the_ring_wraps(group):
    """A streaming head's decode steps on the decode kernel (the ring attended in place) give the reference
    path's output, before the ring fills, as it wraps and long after; compensation stays on the reference."""
    _decode_kernel_matches_reference(build_policy({"policy": "streaming", "params": {"sink": 4, "window": 9}}), group)
    g = torch.Generator().manual_seed(6)
    B, Hkv, D = 2, 2, 16
    comp = build_policy({"policy": "streaming", "params": {"sink": 4, "window": 9, "compensation": True}})
    store = comp.make_store(B, Hkv, D, torch.device("cpu"), torch.float32)
    comp.attend(torch.randn(B, Hkv, 20, D, generator=g), *torch.randn(2, B, Hkv, 20, D, generator=g), store,
                AttendContext(start=0, scale=D**-0.5))
    assert comp.attend(torch.randn(B, Hkv, 1, D, generator=g), *torch.randn(2, B, Hkv, 1, D, generator=g), store,
                       AttendContext(start=20, scale=D**-0.5, use_kernels=True)).shape == (B, Hkv, 1, D)


def test_page_topk_e4m3_bounds_still_bound_every_key_and_find_the_needle():
    """``bounds="e4m3"``: after chunked appends the store holds ``quantize_bounds`` of the exact page bounds
    (codes + one scale per page row), which still bound every key of their page; the needle's page is chosen;
    the bounds take half the bytes (plus the scales)."""
    from headwise.policies.stores import quantize_bounds

    q, k, v = _needle_kv()
    policy = PageTopK(page_size=16, budget=48, bounds="e4m3")
    store = policy.make_store(1, 1, 16, torch.device("cpu"), torch.float32)
    for a, b in [(0, 5), (5, 40), (40, 41), (41, 159)]:
        policy.attend(q.expand(1, 2, b - a, 16), k[:, :, a:b], v[:, :, a:b], store, AttendContext(a, 1.0))
    pages = k[:, :, :160].view(1, 1, 10, 16, 16)[:, :, :, :, :]
    exact = torch.stack([pages.amin(dim=3), pages.amax(dim=3)], dim=3)
    exact[:, :, 9] = torch.stack([k[:, :, 144:159].amin(dim=2), k[:, :, 144:159].amax(dim=2)], dim=2)
    codes, scales = quantize_bounds(exact)
    assert torch.equal(store.bounds[:, :, :10].view(torch.uint8), codes.view(torch.uint8))
    torch.testing.assert_close(store.bound_scales[:, :, :10], scales)
    deq = store.page_bounds()
    assert bool((deq[..., 0, :] <= exact[..., 0, :]).all() and (deq[..., 1, :] >= exact[..., 1, :]).all())
    table = policy.select(q[:, :, 0], store, use_kernels=False)
    assert 77 // 16 in table[0, 0].tolist()
    assert policy.kv_tokens(160) == 160 + 5
    assert store.bounds.element_size() == 1 and store.bound_scales.shape == store.bounds.shape[:4]


def test_page_topk_rejects_an_unknown_bound_format():
    with pytest.raises(PlanError, match="bounds"):
        build_policy({"policy": "page_topk", "params": {"bounds": "int4"}})




@needs_interpreter
@pytest.mark.parametrize(("bounds", "fused_max"), [("exact", 0), ("exact", 10**6), ("e4m3", 10**6)],
                         ids=["top-k-kernel", "selection-in-attention-kernel", "e4m3-bounds"])
def test_page_topk_kernel_paths_both_match_the_reference(tiny, monkeypatch, bounds, fused_max):
    """Both kernel paths of ``page_topk`` (a top-k kernel feeding the attention kernel, or the selection inside
    it, chosen by ``FUSED_SELECT_MAX_HEADS``), and the kernel path with 8-bit bounds, generate what the
    reference path generates."""
    import headwise.policies.page_topk as page_topk_module

    monkeypatch.setattr(page_topk_module, "FUSED_SELECT_MAX_HEADS", fused_max)
    plan = HeadPlan.uniform(tiny.spec, {"policy": "page_topk", "params": {"page_size": 16, "budget": 32,
                                                                          "bounds": bounds}})
    assert _generate(tiny, plan, use_kernels=True) == _generate(tiny, plan)[:4]


@pytest.mark.gpu
@pytest.mark.parametrize("bounds", ["exact", "e4m3"])
def test_page_topk_on_gpu_kernel_paths_generate_like_the_reference(bounds):
    """On CUDA (fp32 model, so the kernels multiply in full fp32): both kernel paths of ``page_topk`` (the
    selection inside the attention kernel, and the top-k kernel, forced by the switch) generate the reference
    path's tokens with a budget far below the context."""
    import headwise.policies.page_topk as page_topk_module

    lm = tiny_model("llama")
    lm.model.to("cuda")
    plan = HeadPlan.uniform(lm.spec, {"policy": "page_topk", "params": {"page_size": 16, "budget": 48,
                                                                        "bounds": bounds}})
    prompt = torch.randint(0, 128, (1, 300), generator=torch.Generator().manual_seed(3)).cuda()

    def gen(use_kernels: bool) -> list[int]:
        engine = Engine(lm, plan, chunk_size=128, use_kernels=use_kernels)
        return [e.token_id for e in engine.generate(prompt, max_new_tokens=12) if e.token_id >= 0]

    ref = gen(False)
    assert gen(True) == ref
    old = page_topk_module.FUSED_SELECT_MAX_HEADS
    page_topk_module.FUSED_SELECT_MAX_HEADS = 0
    try:
        assert gen(True) == ref
    finally:
        page_topk_module.FUSED_SELECT_MAX_HEADS = old


@pytest.mark.parametrize("name", ["full", "streaming", "page_topk", "tidal", "recycled", "a_shape", "vertical_slash",
                                  "block_topk", "quantized"])
def test_a_policy_class_declares_keeping_every_token_as_its_store_does(name):
    """``keeps_every_token`` is declared on the class (no store is built to ask); it must say what the store is."""
    from headwise.policies.stores import DenseStore

    policy = build_policy({"policy": name})
    store = policy.make_store(1, 1, 16, torch.device("cpu"), torch.float32)
    assert type(policy).keeps_every_token == isinstance(store, DenseStore)


def test_graph_decode_is_declared_per_class_and_a_parameter_that_rules_it_out_says_why():
    assert build_policy({"policy": "full"}).graph_blocker() is None
    assert build_policy({"policy": "a_shape", "decode": {"policy": "page_topk"}}).graph_blocker() is None
    why = build_policy({"policy": "streaming", "params": {"compensation": True}}).graph_blocker()
    assert why is not None and "compensation" in why
    assert "has no CUDA-graph decode" in build_policy({"policy": "a_shape", "decode": {"policy": "tidal"}}).graph_blocker()
    with pytest.raises(PlanError, match="does not keep the full cache"):
        build_policy({"policy": "a_shape", "decode": {"policy": "streaming"}})
