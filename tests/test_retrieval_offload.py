"""``retrieval_offload`` (RetrievalAttention): host KV behind an index, static set on the device, exact merge."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headwise.engine import Engine
from headwise.errors import InputError, PlanError
from headwise.kernels.common import INTERPRET
from headwise.plan import HeadPlan
from headwise.policies import AttendContext, build_policy
from headwise.policies.base import causal_attention
from headwise.policies.retrieval_offload import RetrievalOffload, attention_with_lse, merge_partials
from tiny import tiny_model

needs_interpreter = pytest.mark.skipif(not INTERPRET,
                                       reason="kernels were decorated for a GPU; CPU tensors need TRITON_INTERPRET=1")


def random_qkv(B=2, Hq=6, Hkv=2, T=53, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def run(policy, q, k, v, chunks, use_kernels=False):
    store = policy.make_store(q.shape[0], k.shape[1], q.shape[-1], q.device, q.dtype)
    outs, start = [], 0
    for n in chunks:
        sl = slice(start, start + n)
        ctx = AttendContext(start=start, scale=q.shape[-1] ** -0.5, use_kernels=use_kernels)
        outs.append(policy.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], store, ctx))
        start += n
    return torch.cat(outs, dim=2), store


@pytest.mark.parametrize("chunks", [[53], [20, 13] + [1] * 20, [1] * 53], ids=["prefill", "mixed", "decode"])
def test_retrieving_every_host_token_is_dense_attention(chunks):
    q, k, v = random_qkv()
    policy = RetrievalOffload(sink=3, window=5, top_k=1000, index="exact")
    out, store = run(policy, q, k, v, chunks)
    assert store.host_length == 53 - 8
    assert torch.allclose(out, causal_attention(q, k, v, 0, 12 ** -0.5), atol=1e-5)


def test_decode_attends_the_static_set_and_the_exact_top_k():
    q, k, v = random_qkv(T=40)
    policy = RetrievalOffload(sink=2, window=4, top_k=5, index="exact")
    out, _ = run(policy, q, k, v, [39, 1])
    p, G = 39, 3
    host = torch.arange(2, p - 4 + 1)  # positions 2 .. 35 live on the host
    want = torch.empty(2, 6, 12)
    for b in range(2):
        for h in range(6):
            kh, vh = k[b, h // G], v[b, h // G]
            top = host[(kh[host] @ q[b, h, p]).topk(5).indices]
            keep = torch.cat([torch.arange(2), torch.arange(p - 3, p + 1), top])
            w = torch.softmax(kh[keep] @ q[b, h, p] * 12 ** -0.5, dim=0)
            want[b, h] = w @ vh[keep]
    assert torch.allclose(out[:, :, -1], want, atol=1e-5)


@pytest.mark.parametrize(("index", "T"), [("hnsw", 600), ("ivf", 5000)])
def test_faiss_index_recall_against_the_exact_top_k(index, T):
    pytest.importorskip("faiss")
    q, k, v = random_qkv(B=1, Hq=4, Hkv=1, T=T, D=16, seed=3)
    k = k + 0.5 * torch.randn(16, generator=torch.Generator().manual_seed(1))  # a shared direction, as attention keys
    policy = RetrievalOffload(sink=4, window=16, top_k=20, index=index, ef=128, probe=0.2, exact_below=4096)
    _, store = run(policy, q, k, v, [T - 1])
    ids = store.search(q[:, :, -1].float(), 20)
    exact = (k[0, 0, 4 : 4 + store.host_length] @ q[0, :, -1].T).topk(20, dim=0).indices.T
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids[0], exact)) / exact.numel()
    assert recall >= 0.8
    out, _ = run(policy, q, k, v, [T - 1, 1])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("use_kernels", [False, pytest.param(True, marks=needs_interpreter)], ids=["torch", "kernel"])
def test_merging_partials_over_a_split_equals_attention_over_the_union(use_kernels):
    q, k, v = random_qkv(B=1, T=33)
    q1 = q[:, :, -1:]
    whole, _ = attention_with_lse(q1, k, v, 0.3)
    parts = [attention_with_lse(q1, k[:, :, :10], v[:, :, :10], 0.3), attention_with_lse(q1, k[:, :, 10:], v[:, :, 10:], 0.3)]
    empty = (torch.zeros_like(whole), torch.full(whole.shape[:3], float("-inf")))
    assert torch.allclose(merge_partials([*parts, empty], use_kernels), whole, atol=1e-5)


def test_an_offload_plan_generates_like_dense_with_an_exhaustive_index():
    lm = tiny_model("llama")
    prompt = torch.randint(0, 128, (1, 90), generator=torch.Generator().manual_seed(0))
    plan = HeadPlan.uniform(lm.spec, {"policy": "retrieval_offload",
                                      "params": {"sink": 4, "window": 16, "top_k": 4096, "index": "exact"}})

    def gen(p):
        return [e.token_id for e in Engine(lm, p, chunk_size=32).generate(prompt, max_new_tokens=8) if e.token_id >= 0]

    assert gen(plan) == gen(HeadPlan.dense(lm.spec))
    engine = Engine(lm, plan, chunk_size=32)
    cache = engine.new_cache(reserve=100)
    engine.prefill(prompt, cache)
    assert cache.kv_bytes() == plan.kv_bytes(lm.spec, 100, 4)  # the device holds sinks + window only
    store = cache.layers[0].groups[0].store
    assert store.host_length == 90 - 20 and store.host_bytes() == 2 * 1 * 2 * 80 * 16 * 4


def test_bad_parameters_are_reported():
    with pytest.raises(PlanError, match="'index' must be one of"):
        build_policy({"policy": "retrieval_offload", "params": {"index": "annoy"}})
    with pytest.raises(PlanError, match="'probe' must be a share"):
        build_policy({"policy": "retrieval_offload", "params": {"probe": 0}})
    with pytest.raises(PlanError, match="window"):
        build_policy({"policy": "retrieval_offload", "params": {"window": 0}})


def test_the_offload_bench_runs_at_cpu_size():
    from headwise.bench.offload import run

    res = run(tokens=3000, layers=2, q_heads=4, kv_heads=2, head_dim=16, steps=3, sink=8, window=32, top_k=50,
              index="exact", device="cpu", dtype=torch.float32, fill_chunk=700)
    assert res["recall_at_top_k"] == 1.0  # the exact index returns the exact top-k
    assert 0 < res["attention_mass_kept"] < 1
    assert res["device_kv_bytes_model"] == 32 * 2 * 2 * 40 * 16 * 4  # sinks + window, K and V, 32 layers
    assert res["host_kv_bytes_model"] == 32 * 2 * 2 * (3000 + 3 - 40) * 16 * 4
    assert res["decode_tokens_per_s_model"] > 0 and res["dense_decode_ms_per_layer"] > 0


def test_sizing_an_offload_cache_allocates_no_host_memory():
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, {"policy": "retrieval_offload", "params": {"sink": 4, "window": 16}})
    engine = Engine(lm, plan)
    assert engine.kv_estimate(1 << 30) == plan.kv_bytes(lm.spec, 1 << 30, 4)  # a billion tokens: the device part


def test_eval_spec_and_gemma_sliding_layers():
    from headwise.cache import HeadwiseCache
    from headwise.eval.runner import resolve_plans

    lm = tiny_model("gemma3_text")
    (entry,) = resolve_plans(["offload@50"], lm)
    plan = entry.plan_for(100)
    assert plan.layers[2][0] == {"policy": "retrieval_offload", "params": {"top_k": 50}}
    names = [layer.groups[0].policy.name for layer in HeadwiseCache(lm.spec, plan).layers]
    assert names == ["streaming", "streaming", "retrieval_offload", "streaming"]  # native windows stay
    for item, params in (("offload-exact", {"index": "exact"}), ("offload-hnsw@20", {"index": "hnsw", "top_k": 20}),
                         ("offload-hnsw@100/1024", {"index": "hnsw", "top_k": 100, "ef": 1024}),
                         ("offload-ivf@50/0.5", {"index": "ivf", "top_k": 50, "probe": 0.5})):
        (entry,) = resolve_plans([item], lm)
        assert entry.plan_for(100).layers[2][0] == {"policy": "retrieval_offload", "params": params}
    for bad, says in (("offload-exact@100/4", "goes with offload-hnsw or offload-ivf"),
                      ("offload-hnsw@100/2.5", "whole number"), ("offload-ivf@100/1.5", "probe")):
        with pytest.raises((InputError, PlanError), match=says):
            resolve_plans([bad], lm)[0].plan_for(100)


def test_ivf_scores_every_key_below_exact_below_then_trains():
    """The inverted file answers with the exact top-k until ``exact_below`` host keys are there (the default 32768:
    below it an exact search is cheap and the inverted file loses needles on Gemma 3), then trains its lists."""
    pytest.importorskip("faiss")
    from headwise.policies.retrieval_offload import make_index

    rng = np.random.default_rng(0)
    keys, q = rng.standard_normal((5000, 16)).astype(np.float32), rng.standard_normal((3, 16)).astype(np.float32)
    exact = np.sort(np.argsort(-(q @ keys.T), axis=1)[:, :10], axis=1)
    default = make_index(RetrievalOffload(), 16)
    small = make_index(RetrievalOffload(exact_below=4096, probe=0.02), 16)
    for index in (default, small):
        for a in range(0, 5000, 512):
            index.add(keys[a : a + 512])
    assert default.index is None and (np.sort(default.search(q, 10), axis=1) == exact).all()
    assert small.index is not None and small.index.nlist > 1
    with pytest.raises(PlanError, match="exact_below"):
        build_policy({"policy": "retrieval_offload", "params": {"exact_below": -1}})
