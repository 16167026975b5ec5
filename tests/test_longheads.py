"""``longheads`` (LongHeads): chunk choice, re-assigned positions, and running past the trained context."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from headwise.cache import HeadwiseCache
from headwise.engine import Engine
from headwise.errors import ContextLengthError, InputError, PlanError
from headwise.plan import HeadPlan
from headwise.policies import AttendContext, build_policy
from headwise.policies.base import causal_attention
from headwise.policies.full import Full
from headwise.policies.longheads import LongHeads, local_keys
from headwise.rope import rotate
from headwise.spec import ModelSpec
from tiny import tiny_model

INV = 1.0 / (100.0 ** (torch.arange(0, 12, 2, dtype=torch.float32) / 12))  # head_dim 12, base 100: angles wrap


def apply_rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """transformers' rotation (``x * cos + rotate_half(x) * sin``) of ``x: [..., L, D]`` at positions ``pos: [L]``."""
    freqs = pos.double()[:, None] * INV.double()
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return (x.double() * emb.cos() + torch.cat([-x2, x1], dim=-1).double() * emb.sin()).to(x.dtype)


def run_policy(policy: LongHeads, q, k, v, chunks: list[int]) -> torch.Tensor:
    """Feed q: [B, Hq, T, D], k, v: [B, Hkv, T, D] (rotated at 0 .. T-1) in chunks of the given sizes."""
    store = policy.make_store(q.shape[0], k.shape[1], q.shape[-1], q.device, q.dtype)
    outs, start = [], 0
    for n in chunks:
        ctx = AttendContext(start=start, scale=q.shape[-1] ** -0.5, rope=INV)
        sl = slice(start, start + n)
        outs.append(policy.attend(q[:, :, sl], k[:, :, sl], v[:, :, sl], store, ctx))
        start += n
    return torch.cat(outs, dim=2)


def naive_longheads(policy: LongHeads, q_pre, k_pre, v) -> torch.Tensor:
    """LongHeads from first principles, one query at a time, on vectors *before* RoPE: chunk representatives from
    the chunk's queries and keys rotated at their offsets inside the chunk, the choice per KV head (or per query
    head, each with its own representatives), then keys and query rotated at their re-assigned positions."""
    B, Hq, T, D = q_pre.shape
    Hkv, C, n = k_pre.shape[1], policy.chunk_size, policy.top_k + 3
    G, scale = Hq // Hkv, D ** -0.5
    per_q = policy.choose_per == "query_head"
    reps = []  # per chunk: [B, Hkv, D], or [B, Hq, D] per query head
    for c in range(T // C):
        local = torch.arange(C)
        qc, kc = apply_rope(q_pre[:, :, c * C : (c + 1) * C], local), apply_rope(k_pre[:, :, c * C : (c + 1) * C], local)
        feats = F.scaled_dot_product_attention(qc, kc.repeat_interleave(G, 1), v[:, :, c * C : (c + 1) * C].repeat_interleave(G, 1), scale=scale)
        if per_q:
            s = feats.mean(dim=2)  # [B, Hq, D]
            w = torch.softmax(torch.einsum("bhd,bhcd->bhc", s, kc.repeat_interleave(G, 1)) / math.sqrt(D), dim=-1)
            reps.append(torch.einsum("bhc,bhcd->bhd", w, kc.repeat_interleave(G, 1)))
            continue
        s = feats.view(B, Hkv, G, C, D).mean(dim=(2, 3))
        w = torch.softmax(torch.einsum("bhd,bhcd->bhc", s, kc) / math.sqrt(D), dim=-1)
        reps.append(torch.einsum("bhc,bhcd->bhd", w, kc))
    out = torch.empty_like(q_pre)
    for p in range(T):
        if p < policy.window:
            qr = apply_rope(q_pre[:, :, p : p + 1], torch.tensor([p]))
            kr = apply_rope(k_pre[:, :, : p + 1], torch.arange(p + 1))
            out[:, :, p : p + 1] = F.scaled_dot_product_attention(qr, kr.repeat_interleave(G, 1),
                                                                  v[:, :, : p + 1].repeat_interleave(G, 1), scale=scale)
            continue
        cq = p // C
        for b in range(B):
            for h, heads in ([(j // G, [j]) for j in range(Hq)] if per_q
                             else [(h, list(range(h * G, (h + 1) * G))) for h in range(Hkv)]):
                rep_head = heads[0] if per_q else h
                score = torch.stack([(q_pre[b, heads, p].sum(0) * reps[c][b, rep_head]).sum()
                                     for c in range(1, cq - 1)])
                chosen = sorted((score.topk(policy.top_k).indices + 1).tolist())
                chunks = [0, *chosen, cq - 1, cq]
                idx = torch.cat([torch.arange(c * C, min((c + 1) * C, p + 1)) for c in chunks])
                assigned = torch.cat([s * C + torch.arange(min(C, p + 1 - c * C)) for s, c in enumerate(chunks)])
                kr = apply_rope(k_pre[b, h, idx], assigned)
                qr = apply_rope(q_pre[b, heads, p : p + 1], torch.tensor([(n - 1) * C + p % C]))
                out[b, heads, p : p + 1] = F.scaled_dot_product_attention(qr, kr[None], v[b, h, idx][None],
                                                                          scale=scale)
    return out


def random_qkv(B=2, Hq=6, Hkv=2, T=61, D=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g),
            torch.randn(B, Hkv, T, D, generator=g))


def test_rotate_moves_a_rotated_vector_to_another_position():
    x = torch.randn(3, 5, 12)
    pos = torch.tensor([0, 3, 17, 250, 4000])
    moved = rotate(apply_rope(x, pos), torch.tensor([7, -3, 100, -250, 60000]), INV)
    assert torch.allclose(moved, apply_rope(x, pos + torch.tensor([7, -3, 100, -250, 60000])), atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_spec_rope_is_what_the_model_rotates_with(arch):
    lm = tiny_model(arch)
    rotary = lm.model.model.rotary_emb
    x = torch.randn(1, 1, 9, lm.spec.head_dim)
    pos = torch.arange(9)[None] * 37
    types = getattr(lm.model.config, "layer_types", None) or ["full_attention"] * lm.spec.num_layers
    for layer, ltype in enumerate(types):
        cos, sin = rotary(x, pos, ltype) if arch == "gemma3_text" else rotary(x, pos)
        half = x.shape[-1] // 2
        want = x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin
        inv = torch.tensor(lm.spec.rope_inv_freq(layer))
        assert torch.allclose(rotate(x, pos[0], inv), want, atol=1e-5), f"layer {layer} ({ltype})"


def test_within_the_window_it_is_full_attention_bit_for_bit():
    q, k, v = random_qkv(T=40)
    qr, kr = apply_rope(q, torch.arange(40)), apply_rope(k, torch.arange(40))
    policy = LongHeads(chunk_size=8, top_k=2)  # window 40: every query attends everything
    out = run_policy(policy, qr, kr, v, [13, 13, 13, 1])
    full = Full()
    store = full.make_store(2, 2, 12, q.device, q.dtype)
    want = [full.attend(qr[:, :, a:b], kr[:, :, a:b], v[:, :, a:b], store, AttendContext(start=a, scale=12 ** -0.5))
            for a, b in ((0, 13), (13, 26), (26, 39), (39, 40))]
    assert torch.equal(out, torch.cat(want, dim=2))
    assert torch.allclose(out, causal_attention(qr, kr, v, 0, 12 ** -0.5), atol=1e-6)


@pytest.mark.parametrize("choose_per", ["kv_head", "query_head"])
@pytest.mark.parametrize("chunks", [[61], [7] * 8 + [5], [30] + [1] * 31], ids=["one-shot", "chunks-of-7", "decode"])
def test_past_the_window_matches_a_first_principles_reference(chunks, choose_per):
    q, k, v = random_qkv()
    policy = LongHeads(chunk_size=5, top_k=2, choose_per=choose_per)  # window 25, 12 complete chunks at 61 tokens
    pos = torch.arange(61)
    out = run_policy(policy, apply_rope(q, pos), apply_rope(k, pos), v, chunks)
    ref = naive_longheads(policy, q, k, v)
    assert (out - ref).abs().max() < 1e-4


def planted_case(Hq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Small random q, k, v (``B = 1``, one KV head, 120 tokens, D 12) and a needle direction in the lowest frequency
    pair (it barely turns inside a chunk) for a test to plant."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(1, Hq, 120, 12, generator=g) * 0.1, torch.randn(1, 1, 120, 12, generator=g) * 0.1, \
        torch.randn(1, 1, 120, 12, generator=g)
    needle = torch.zeros(12)
    needle[12 // 2 - 1], needle[12 - 1] = 1.0, 1.0
    return q, k, v, needle


def test_chooses_the_chunk_holding_a_planted_key():
    B, Hq, Hkv, C, T, D = 1, 2, 1, 8, 120, 12
    q, k, v, needle = planted_case(Hq, 1)
    planted = 6  # chunk 6 = positions 48 .. 55
    k[0, 0, planted * C : (planted + 1) * C] = 6 * needle
    v[0, 0, planted * C : (planted + 1) * C] = 5.0
    q[0, :, -1] = 6 * needle  # the last query looks for it
    policy = LongHeads(chunk_size=C, top_k=1)  # window 32: chunks 1 .. 12 compete for one place
    pos = torch.arange(T)
    store = policy.make_store(B, Hkv, D, q.device, q.dtype)
    ctx = AttendContext(start=0, scale=D ** -0.5, rope=INV)
    out = policy.attend(apply_rope(q, pos), apply_rope(k, pos), v, store, ctx)
    chosen = policy.choose(apply_rope(q, pos)[:, :, -1:], pos[-1:], store, INV)
    assert chosen[0, 0, 0].tolist() == [0, planted, T // C - 2, T // C - 1]
    assert out[0, :, -1].mean() > 4.0  # attention went to the planted values


def test_a_longheads_plan_runs_past_the_trained_context_where_dense_stops():
    lm = tiny_model("llama", max_position_embeddings=64)
    prompt = torch.randint(0, 128, (1, 150), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ContextLengthError, match="longheads"):
        list(Engine(lm, HeadPlan.dense(lm.spec)).generate(prompt, max_new_tokens=2))
    plan = HeadPlan.uniform(lm.spec, {"policy": "longheads", "params": {"chunk_size": 8, "top_k": 5}})
    assert plan.max_context(lm.spec) is None
    engine = Engine(lm, plan, chunk_size=32)
    tokens = [e.token_id for e in engine.generate(prompt, max_new_tokens=12) if e.token_id >= 0]
    assert len(tokens) == 12
    # A window past the trained length keeps the limit.
    wide = HeadPlan.uniform(lm.spec, {"policy": "longheads", "params": {"chunk_size": 32, "top_k": 1}})
    assert wide.max_context(lm.spec) == 64


def test_on_gemma_the_sliding_layers_keep_their_window():
    lm = tiny_model("gemma3_text")
    plan = HeadPlan.uniform(lm.spec, {"policy": "longheads", "params": {"chunk_size": 8, "top_k": 2}})
    cache = HeadwiseCache(lm.spec, plan)
    names = [layer.groups[0].policy.name for layer in cache.layers]
    assert names == ["streaming", "streaming", "longheads", "streaming"]
    assert plan.max_context(lm.spec) is None


def filled_cache(policy: LongHeads) -> tuple[ModelSpec, HeadPlan, HeadwiseCache]:
    """A two-layer cache (6 query / 2 KV heads, D 12, fp32) under ``policy`` on every head, after 61 tokens."""
    spec = ModelSpec("llama", 2, 6, 2, 12, 4096, (None, None), (tuple(INV.tolist()),) * 2)
    plan = HeadPlan.uniform(spec, policy.to_spec())
    cache = HeadwiseCache(spec, plan, "cpu", torch.float32)
    cache.reserve(61)
    q, k, v = random_qkv(B=1, T=61)
    for layer in cache.layers:
        policy.attend(q, k, v, cache._ensure_store(layer.groups[0]), AttendContext(start=0, scale=0.3, rope=INV))
    return spec, plan, cache


def test_cache_holds_the_planned_bytes_plus_the_filling_chunks_queries():
    policy = LongHeads(chunk_size=5, top_k=2)
    spec, plan, cache = filled_cache(policy)
    pending = 2 * 6 * 5 * 12 * 4  # per layer: the group's queries of one chunk
    assert cache.kv_bytes() == plan.kv_bytes(spec, 61, 4) + pending


def test_bad_parameters_and_missing_rope_are_reported():
    with pytest.raises(PlanError, match="chunk_size"):
        build_policy({"policy": "longheads", "params": {"chunk_size": 0}})
    policy = LongHeads(chunk_size=4, top_k=1)
    q, k, v = random_qkv(B=1, T=8)
    store = policy.make_store(1, 2, 12, q.device, q.dtype)
    with pytest.raises(PlanError, match="RoPE"):
        policy.attend(q, k, v, store, AttendContext(start=0, scale=0.3))



def test_eval_runs_longheads_past_the_context_and_skips_dense_there(smollm2, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from headwise.eval.runner import EvalConfig, resolve_plans, run_eval
    from headwise.models import LoadedModel

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    lm = LoadedModel("tiny-256", LlamaForCausalLM(cfg).eval(), smollm2.tokenizer, ModelSpec.from_config(cfg), "random")
    with pytest.raises(InputError, match="multiple of the chunk"):
        resolve_plans(["longheads@100/16"], lm)
    res = run_eval(EvalConfig(model="tiny", plans=["dense", "longheads@128/16"], tasks=["passkey"], lengths=[200, 400],
                              depths=[0.5], samples=1, max_new_tokens=4, out=tmp_path, progress=False,
                              command="pytest"), lm)
    ran = {(r["plan"], r["length"]) for r in res["rows"] if r["task"] == "passkey"}
    assert ran == {("dense", 200), ("longheads@128/16", 200), ("longheads@128/16", 400)}
    assert any(n.startswith("dense: length 400") and "skipped" in n for n in res["notes"])


def test_the_server_takes_prompts_past_the_context_under_a_longheads_plan(smollm2):
    from headwise.server.app import AppContext, ServerConfig
    from headwise.server.scheduler import Scheduler

    def limit(plan):
        return AppContext.build(Scheduler(Engine(smollm2, plan)), "m", ServerConfig()).max_context

    assert limit(HeadPlan.dense(smollm2.spec)) == 8192
    assert limit(HeadPlan.uniform(smollm2.spec, {"policy": "longheads"})) is None


def choosers(policy: LongHeads, Hq: int, Hkv: int) -> list[tuple[int, list[int]]]:
    """(KV head, its query heads that choose together): the whole group per KV head, or each query head alone."""
    G = Hq // Hkv
    if policy.choose_per == "query_head":
        return [(j // G, [j]) for j in range(Hq)]
    return [(h, list(range(h * G, (h + 1) * G))) for h in range(Hkv)]


def naive_choice(policy: LongHeads, Hq: int, Hkv: int, B: int, p: int, score) -> list[list[list[int]]]:
    """Chunks chosen for the query at ``p`` per batch row and chooser, ``score(b, h, heads, c)`` scoring candidate
    chunk ``c`` of KV head ``h`` for the query heads ``heads``: the first, the ``top_k`` best, the previous, its own."""
    cq = p // policy.chunk_size
    out = []
    for b in range(B):
        rows = []
        for h, heads in choosers(policy, Hq, Hkv):
            scores = torch.stack([torch.as_tensor(score(b, h, heads, c)) for c in range(1, cq - 1)])
            chosen = sorted((scores.topk(policy.top_k).indices + 1).tolist())
            rows.append([0, *chosen, cq - 1, cq])
        out.append(rows)
    return out


def naive_bound_choice(policy: LongHeads, q_rot: torch.Tensor, k_rot: torch.Tensor, p: int) -> list[list[list[int]]]:
    """Chunks chosen for the query at ``p`` under bound scores, from first principles: per KV head and candidate
    chunk, the best over its pages of the sum over the query heads of ``sum_d max(q_d * min_d, q_d * max_d)`` over
    the page's rotated keys (per query head with ``choose_per="query_head"``: that head's alone)."""
    C, P = policy.chunk_size, policy.bound_page

    def score(b: int, h: int, heads: list[int], c: int) -> float:
        best = []
        for a in range(c * C, (c + 1) * C, P):
            lo, hi = k_rot[b, h, a : a + P].min(dim=0).values, k_rot[b, h, a : a + P].max(dim=0).values
            best.append(sum(torch.maximum(q * lo, q * hi).sum() for q in q_rot[b, heads, p]))
        return max(best)

    return naive_choice(policy, q_rot.shape[1], k_rot.shape[1], q_rot.shape[0], p, score)


@pytest.mark.parametrize("score", ["bound", "max"])
@pytest.mark.parametrize("choose_per", ["kv_head", "query_head"])
@pytest.mark.parametrize("chunks", [[61], [30, 1, 1, 29], [7] * 8 + [5]])
def test_bound_and_max_scores_choose_the_chunks_their_rule_ranks_highest(chunks, choose_per, score):
    """``chunk_score="bound"``: every query past the window attends the chunks whose Quest bound (over the keys as
    rotated, summed over the group, or per query head) is highest; ``"max"``: the chunks holding its best-matching
    keys, each key seen at its offset inside its chunk and the query before RoPE (the positions the paper scores at).
    Fed in one chunk, in pieces or token by token. Neither keeps queries; max keeps nothing besides the keys and
    values. The attention over the chosen chunks is the paper's (re-assigned positions), tested above."""
    q, k, v = random_qkv()
    policy = LongHeads(chunk_size=5, top_k=2, chunk_score=score, bound_page=1 + (len(chunks) == 4) * 4,
                       choose_per=choose_per)
    pos = torch.arange(61)
    qr, kr = apply_rope(q, pos), apply_rope(k, pos)
    store = policy.make_store(2, 2, 12, q.device, q.dtype)
    start = 0
    for n in chunks:
        policy.attend(qr[:, :, start : start + n], kr[:, :, start : start + n], v[:, :, start : start + n], store,
                      AttendContext(start=start, scale=12 ** -0.5, rope=INV))
        start += n
    assert store.pending is None and store.n_reps == 12 and store.reps.numel() == 0
    assert (store.kmin.numel() == 0) == (score == "max")  # max keeps nothing besides the keys and values
    for p in (25, 40, 60):
        got = policy.choose(qr[:, :, p : p + 1], torch.tensor([p]), store, INV)[:, :, 0].tolist()
        want = naive_bound_choice(policy, qr, kr, p) if score == "bound" else naive_max_choice(policy, q, k, p)
        assert got == want, p
        if score == "max":  # the other route: the query before RoPE against the keys at their offsets in their chunks
            local = local_keys(store, INV)
            assert policy.choose(qr[:, :, p : p + 1], torch.tensor([p]), store, INV, local)[:, :, 0].tolist() == want
            one = policy.chunk_scores(qr[:, :, p : p + 1], torch.tensor([p]), store, INV)
            assert torch.allclose(policy.chunk_scores(qr[:, :, p : p + 1], torch.tensor([p]), store, INV, local), one,
                                  atol=1e-5)


def test_bound_scores_find_one_matching_key_in_a_chunk_of_others():
    """A chunk holding a single key the query matches, among keys that pull its average elsewhere, is chosen under
    bound scores: the bound is at least that key's logit, whatever the chunk's other keys are."""
    B, Hq, Hkv, C, T, D = 1, 2, 1, 8, 120, 12
    q, k, v, needle = planted_case(Hq, 4)
    planted = 6
    k[0, 0, planted * C : (planted + 1) * C] = -2 * needle  # the chunk's other keys point away from the query
    k[0, 0, planted * C + 3] = 6 * needle  # one key matches it
    v[0, 0, planted * C + 3] = 5.0
    q[0, :, -1] = 6 * needle
    pos = torch.arange(T)
    policy = LongHeads(chunk_size=C, top_k=1, chunk_score="bound", bound_page=4)
    store = policy.make_store(B, Hkv, D, q.device, q.dtype)
    out = policy.attend(apply_rope(q, pos), apply_rope(k, pos), v, store,
                        AttendContext(start=0, scale=D ** -0.5, rope=INV))
    chosen = policy.choose(apply_rope(q, pos)[:, :, -1:], pos[-1:], store, INV)
    assert chosen[0, 0, 0].tolist() == [0, planted, T // C - 2, T // C - 1]
    assert out[0, :, -1].mean() > 2.0  # attention went to the matching key's value


def test_bound_scores_hold_two_vectors_per_chunk_and_no_queries():
    policy = LongHeads(chunk_size=5, top_k=2, chunk_score="bound", bound_page=5)
    spec, plan, cache = filled_cache(policy)
    assert cache.kv_bytes() == plan.kv_bytes(spec, 61, 4)
    assert policy.kv_tokens(61) == 61 + 12 and LongHeads(chunk_size=5, top_k=2).kv_tokens(61) == 61 + 6
    assert LongHeads(chunk_size=8, top_k=2, chunk_score="bound", bound_page=2).kv_tokens(61) == 61 + 7 * 4
    with pytest.raises(PlanError, match="chunk_score"):
        build_policy({"policy": "longheads", "params": {"chunk_score": "mean"}})
    with pytest.raises(PlanError, match="bound_page"):
        build_policy({"policy": "longheads", "params": {"chunk_size": 8, "chunk_score": "bound", "bound_page": 3}})


def test_eval_spec_longheads_bound_builds_the_bound_plan():
    from headwise.eval.runner import longheads_plan

    spec = ModelSpec("llama", 2, 6, 2, 12, 4096, (None, None), (tuple(INV.tolist()),) * 2)
    plan = longheads_plan(spec, "m", 2048, 128, "bound")
    assert plan.layers[0][0]["params"] == {"chunk_size": 128, "top_k": 13, "chunk_score": "bound"}
    assert build_policy(plan.layers[0][0]).bound_page == 16
    with pytest.raises(InputError, match="longheads-bound@1000/128"):
        longheads_plan(spec, "m", 1000, 128, "bound")
    with pytest.raises(InputError, match="longheads-max-qhead@1000/128"):
        longheads_plan(spec, "m", 1000, 128, "max", "query_head")


@pytest.mark.parametrize(("item", "score", "per", "top_k"), [
    ("longheads-max-qhead@2048/128", "max", "query_head", 13), ("longheads-qhead", "paper", "query_head", 13),
    ("longheads-max", "max", "kv_head", 13), ("longheads-bound-qhead@1024", "bound", "query_head", 1)])
def test_eval_specs_name_the_score_and_the_chooser(item, score, per, top_k):
    from headwise.eval.runner import resolve_plans

    lm = tiny_model("llama")
    (entry,) = resolve_plans([item], lm)
    policy = build_policy(entry.plan_for(512).layers[0][0])
    assert (policy.chunk_score, policy.choose_per, policy.top_k) == (score, per, top_k)


@pytest.mark.parametrize("score", ["paper", "bound", "max"])
def test_a_query_head_alone_finds_the_chunk_its_group_outvotes(score):
    """One query head of a group seeks a planted key; the group's three other heads point away from it, so their
    summed scores leave its chunk out (one choice per KV head). With ``choose_per="query_head"`` the seeking head
    chooses it and attends its values; the others still choose by themselves."""
    B, Hq, Hkv, C, T, D = 1, 4, 1, 8, 120, 12
    q, k, v, needle = planted_case(Hq, 2)
    planted = 6
    k[0, 0, planted * C : (planted + 1) * C] = 6 * needle
    v[0, 0, planted * C : (planted + 1) * C] = 5.0
    q[0, 0, -1] = 6 * needle  # head 0 looks for it
    q[0, 1:, -1] = -4 * needle  # the rest of its group looks away
    pos = torch.arange(T)
    chosen, outs = {}, {}
    for per in ("kv_head", "query_head"):
        policy = LongHeads(chunk_size=C, top_k=1, chunk_score=score, bound_page=4, choose_per=per)
        store = policy.make_store(B, Hkv, D, q.device, q.dtype)
        outs[per] = policy.attend(apply_rope(q, pos), apply_rope(k, pos), v, store,
                                  AttendContext(start=0, scale=D ** -0.5, rope=INV))
        chosen[per] = policy.choose(apply_rope(q, pos)[:, :, -1:], pos[-1:], store, INV)[0, :, 0].tolist()
    assert len(chosen["kv_head"]) == 1 and chosen["kv_head"][0][1] != planted
    assert len(chosen["query_head"]) == Hq and chosen["query_head"][0][1] == planted
    assert all(row[1] != planted for row in chosen["query_head"][1:])
    assert outs["query_head"][0, 0, -1].mean() > 4.0 > outs["kv_head"][0, 0, -1].mean()


def test_per_query_head_representatives_are_counted_in_the_cache():
    """The paper's scores chosen per query head keep one representative per query head of every complete chunk:
    the cache's bytes hold ``group - 1`` more per KV head than the plan's per-KV-head count."""
    policy = LongHeads(chunk_size=5, top_k=2, choose_per="query_head")
    spec, plan, cache = filled_cache(policy)
    pending = 2 * 6 * 5 * 12 * 4
    extra_reps = 2 * 2 * (3 - 1) * 12 * 12 * 4  # layers x KV heads x (group - 1) x 12 chunks x D x fp32
    assert cache.kv_bytes() == plan.kv_bytes(spec, 61, 4) + pending + extra_reps
    assert policy.short() == "longheads2x5q"
    with pytest.raises(PlanError, match="choose_per"):
        build_policy({"policy": "longheads", "params": {"choose_per": "layer"}})


def naive_max_choice(policy: LongHeads, q_pre: torch.Tensor, k_pre: torch.Tensor, p: int) -> list[list[list[int]]]:
    """Chunks chosen for the query at ``p`` under ``chunk_score="max"``, from first principles on vectors before
    RoPE: a candidate chunk's score is its best logit ``q~ . R(o) k`` over its keys at their offsets ``o`` inside it
    (summed over the group's query heads per KV head, or each query head's own)."""
    C = policy.chunk_size

    def score(b: int, h: int, heads: list[int], c: int) -> float:
        local = apply_rope(k_pre[b, h, c * C : (c + 1) * C], torch.arange(C))  # keys at offsets 0 .. C-1
        return sum((local @ q_pre[b, j, p]).max() for j in heads)

    return naive_choice(policy, q_pre.shape[1], k_pre.shape[1], q_pre.shape[0], p, score)


def test_max_scores_hold_the_keys_and_values_only():
    policy = LongHeads(chunk_size=5, top_k=2, chunk_score="max", choose_per="query_head")
    spec, plan, cache = filled_cache(policy)
    assert policy.kv_tokens(61) == 61 and cache.kv_bytes() == plan.kv_bytes(spec, 61, 4)
    assert policy.short() == "longheads2x5mq"


@pytest.mark.parametrize("tokens", [1, 39, 40, 41, 61, 64])
def test_max_scores_hold_no_more_than_dense_at_any_length(tokens):
    """A chosen chunk is read in place up to the last token, so the store keeps a dense head's slots, not whole
    chunks (it held up to ``chunk_size - 1`` unwritten slots more than dense before): the tensors a filled cache holds
    (``HeadwiseCache.kv_bytes``) equal a dense cache's at lengths inside and past the window and at chunk edges."""
    policy = LongHeads(chunk_size=8, top_k=2, chunk_score="max")  # window 40
    spec = ModelSpec("llama", 2, 6, 2, 12, 4096, (None, None), (tuple(INV.tolist()),) * 2)
    held = {}
    for name, plan in (("longheads", HeadPlan.uniform(spec, policy.to_spec())), ("dense", HeadPlan.dense(spec))):
        cache = HeadwiseCache(spec, plan, "cpu", torch.float32)
        cache.reserve(tokens)
        q, k, v = random_qkv(B=1, T=tokens)
        for layer in cache.layers:
            store = cache._ensure_store(layer.groups[0])
            if name == "dense":
                store.append(k, v)
            else:
                policy.attend(q, k, v, store, AttendContext(start=0, scale=0.3, rope=INV))
        held[name] = cache.kv_bytes()
    assert held["longheads"] == held["dense"] == 2 * 2 * 2 * tokens * 12 * 4

