"""Sparse prefill patterns (a_shape, vertical_slash, block_topk): their index builders, their semantics
through the engine, their rules, and attention recall."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.kernels.prefill_index import indices_to_mask
from headwise.metrics import attention_recall
from headwise.plan import HeadPlan
from headwise.policies import AShape, BlockTopK, Full, PageTopK, Streaming, VerticalSlash, build_policy
from headwise.policies.sparse_prefill import draw_mask
from tiny import tiny_model

L = 97  # awkward prompt length: not a multiple of any block size


def plan_of(lm, policy_for_head):
    """Plan with ``policy_for_head(layer, kv_head)`` for every head."""
    spec = lm.spec
    return HeadPlan.from_policies(
        spec, [[policy_for_head(i, h) for h in range(spec.num_kv_heads)] for i in range(spec.num_layers)]
    )


# ------------------------------------------------------------------------------ semantics through the engine
def test_a_shape_chunked_prefill_equals_one_shot():
    lm = tiny_model("llama")
    plan = plan_of(lm, lambda i, h: AShape(sink=16, local=32, block_size=16) if h == 0 else Full())
    ids = torch.randint(0, 128, (1, L))
    one = Engine(lm, plan, chunk_size=1000).logits(ids)
    # Chunks of 40, 40, 17 tokens, none block-aligned (a one-token chunk would be a decode step).
    chunked = Engine(lm, plan, chunk_size=40).logits(ids)
    assert (one - chunked).abs().max().item() <= 1e-4


def test_a_shape_changes_the_output_when_it_drops_keys():
    lm = tiny_model("llama")
    ids = torch.randint(0, 128, (1, L))
    dense = Engine(lm).logits(ids)
    sparse = Engine(lm, plan_of(lm, lambda i, h: AShape(sink=16, local=16, block_size=16))).logits(ids)
    assert torch.allclose(dense[:, :32], sparse[:, :32], atol=1e-4)  # the first two blocks see everything
    assert (dense[:, 48:] - sparse[:, 48:]).abs().max().item() > 1e-3


@pytest.mark.parametrize(
    "pattern",
    [
        VerticalSlash(vertical_size=L, slash_size=L, last_q=16, block_size=16),
        VerticalSlash(vertical_size=L, slash_size=L, last_q=16, block_size=16, columns="tokens"),
        BlockTopK(topk=L, block_size=16),
        BlockTopK(topk=L, block_size=16, hierarchical=True),
    ],
    ids=["vertical_slash", "vertical_slash_token_columns", "block_topk", "block_topk_hierarchical"],
)
def test_pattern_with_budget_covering_everything_is_dense(pattern):
    lm = tiny_model("llama")
    ids = torch.randint(0, 128, (1, L))
    dense = Engine(lm, chunk_size=40).logits(ids)
    sparse = Engine(lm, plan_of(lm, lambda i, h: pattern), chunk_size=40).logits(ids)
    assert (dense - sparse).abs().max().item() <= 1e-4


def test_each_sequence_of_a_batch_gets_its_own_pattern():
    lm = tiny_model("llama")
    plan = plan_of(lm, lambda i, h: VerticalSlash(vertical_size=4, slash_size=4, last_q=16, block_size=16))
    ids = torch.randint(0, 128, (2, L))
    eng = Engine(lm, plan, chunk_size=48)
    both = eng.logits(ids)
    for b in range(2):
        assert (both[b] - eng.logits(ids[b : b + 1])[0]).abs().max().item() <= 1e-4


def test_mixed_plan_decodes_through_the_decode_policy():
    """Greedy generation with prefill patterns whose decode policies are full / page_topk: runs end to end and
    the cache holds what the decode policies hold."""
    lm = tiny_model("llama")
    vs = VerticalSlash(vertical_size=8, slash_size=8, last_q=16, block_size=16, decode=PageTopK(page_size=16, budget=64))
    plan = plan_of(lm, lambda i, h: vs if h == 0 else AShape(sink=16, local=32, block_size=16))
    eng = Engine(lm, plan, chunk_size=32)
    events = list(eng.generate(torch.randint(0, 128, (L,)), max_new_tokens=6, stop_token_ids=[]))
    assert len([e for e in events if e.stats is None]) == 6
    total = L + 6
    expected = plan.kv_tokens(lm.spec, total)
    assert expected == lm.spec.num_layers * (PageTopK(page_size=16, budget=64).kv_tokens(total) + total)


# ------------------------------------------------------------------------------ index builders
def test_a_shape_index_is_its_mask_mod():
    p = AShape(sink=32, local=48, block_size=16)
    q, keys = torch.randn(1, 2, 70, 8), torch.randn(1, 1, 115, 8)
    got = p.mask(q, keys, q_offset=45, scale=1.0)[0, 0]
    want = p.mask_mod(torch.arange(45, 115)[:, None], torch.arange(115)[None, :])
    assert torch.equal(got, want)


def test_vertical_slash_finds_a_planted_column_and_diagonal():
    """One-hot queries q_p = 8 e_p and keys k_j = e_(j+37) put a diagonal at offset 37; key 5 also shares a
    channel with every query (score 9 vs 8), a vertical. Both must be kept in every row that can see them."""
    S, bs, o, col = 96, 16, 37, 5
    shared = S + o  # a channel no one-hot position uses
    eye = torch.eye(S + o + 1)
    q = 8.0 * eye[torch.arange(S)] + eye[shared]
    keys = eye[torch.arange(S) + o].clone()
    keys[col] += 9.0 * eye[shared]
    p = VerticalSlash(vertical_size=1, slash_size=1, last_q=16, block_size=bs)
    idx, count = p.build_index(q[None, None], keys[None, None], q_offset=0, scale=1.0)
    mask = indices_to_mask(idx, count, bs, S, S, 0)[0, 0]
    rows = torch.arange(S)
    assert mask[rows[rows >= o], rows[rows >= o] - o].all(), "diagonal at offset 37 missing"
    assert mask[rows[rows >= col], col].all(), "planted column missing"
    causal = torch.ones(S, S, dtype=torch.bool).tril()
    assert mask.sum() < 0.8 * causal.sum(), "should not be dense"
    # with token columns a planted column past the sinks' block is kept as itself: the rest of its block is not
    late_col = 21  # block 1; rows of blocks 5 (80-95) list blocks 0, 2, 3 and 5 for the diagonal, not block 1
    keys2 = eye[torch.arange(S) + o].clone()
    keys2[late_col] += 9.0 * eye[shared]
    kw = {"vertical_size": 1, "slash_size": 1, "last_q": 16, "block_size": bs}
    tmask = VerticalSlash(**kw, columns="tokens").mask(q[None, None], keys2[None, None], 0, 1.0)[0, 0]
    bmask = VerticalSlash(**kw).mask(q[None, None], keys2[None, None], 0, 1.0)[0, 0]
    assert tmask[rows[rows >= late_col], late_col].all() and tmask[rows[rows >= o], rows[rows >= o] - o].all()
    late = rows >= 5 * bs
    others = [j for j in range(bs, 2 * bs) if j != late_col]
    assert not tmask[late][:, others].any() and bmask[late][:, others].all()
    assert bool((bmask | ~tmask).all())


@pytest.mark.parametrize("B,H,R,S,first", [(1, 1, 1, 9, 8), (2, 3, 7, 40, 33), (1, 2, 16, 100, 84), (2, 2, 5, 5, 0)])
def test_vertical_slash_scores_sum_each_diagonal(B, H, R, S, first):
    """Column sums and diagonal sums (offset p - j) of causal rows at positions first.., against a plain loop."""
    from headwise.policies.vertical_slash import vertical_slash_scores

    probs = torch.rand(B, H, R, S, generator=torch.Generator().manual_seed(S))
    for r in range(R):
        probs[:, :, r, first + r + 1 :] = 0
    vertical, slash = vertical_slash_scores(probs, first)
    want = torch.zeros(B, H, S)
    for r in range(R):
        for j in range(first + r + 1):
            want[..., first + r - j] += probs[:, :, r, j]
    assert torch.allclose(vertical, probs.sum(dim=2))
    assert torch.allclose(slash, want, atol=1e-6)


@pytest.mark.parametrize("Hq,Hkv,L,S,offset,last_q", [(4, 2, 10, 30, 20, 4), (2, 1, 5, 5, 0, 8), (2, 1, 3, 40, 37, 64)])
def test_last_query_attention_is_the_causal_softmax_of_the_last_queries(Hq, Hkv, L, S, offset, last_q):
    from headwise.policies.vertical_slash import last_query_attention

    g = torch.Generator().manual_seed(L)
    q, keys = torch.randn(2, Hq, L, 8, generator=g), torch.randn(2, Hkv, S, 8, generator=g)
    R = min(last_q, L)
    scores = q[:, :, L - R :] @ keys.repeat_interleave(Hq // Hkv, dim=1).transpose(-1, -2) * 0.3
    after = torch.arange(S)[None, :] > torch.arange(offset + L - R, offset + L)[:, None]
    want = torch.softmax(scores.masked_fill(after, float("-inf")), dim=-1)
    assert torch.allclose(last_query_attention(q, keys, offset, 0.3, last_q), want, atol=1e-5)


def planted_keys(S, D, blocks, bs, seed=0):
    """Queries near the all-ones direction; keys small noise, except blocks ``blocks`` pushed along it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, S, D, generator=g) * 0.1 + 1.0
    keys = torch.randn(1, 1, S, D, generator=g) * 0.1
    for b in blocks:
        keys[:, :, b * bs : (b + 1) * bs] += 2.0
    return q, keys


def test_block_topk_finds_planted_blocks():
    S, bs = 160, 16
    q, keys = planted_keys(S, 16, [4, 5], bs)
    idx, count = BlockTopK(topk=2, block_size=bs).build_index(q, keys, q_offset=0, scale=1.0)
    for a in range(7, S // bs):
        for h in range(2):
            assert idx[0, h, a, : count[0, h, a]].tolist() == [0, 4, 5, a]


def test_hierarchical_block_topk_keeps_only_planted_blocks():
    """Branch halving scores a branch by its middle block, so it may miss a single planted block at a
    branch edge (unlike the flat search); with a planted region wider than topk, it picks inside it."""
    S, bs = 256, 16
    q, keys = planted_keys(S, 16, range(3, 9), bs)
    idx, count = BlockTopK(topk=2, block_size=bs, hierarchical=True).build_index(q, keys, q_offset=0, scale=1.0)
    for a in range(10, S // bs):
        for h in range(2):
            listed = idx[0, h, a, : count[0, h, a]].tolist()
            assert len(listed) == 4 and listed[0] == 0 and listed[-1] == a
            assert set(listed[1:3]) <= set(range(3, 9)), (a, listed)


# ------------------------------------------------------------------------------ rules
def test_streaming_decode_policy_is_refused():
    with pytest.raises(PlanError, match="full cache"):
        build_policy({"policy": "a_shape", "decode": {"policy": "streaming"}})


def test_pattern_keeps_the_decode_policys_memory():
    p = AShape(decode=PageTopK(page_size=16, budget=64))
    assert p.kv_tokens(1000) == PageTopK(page_size=16, budget=64).kv_tokens(1000)
    assert AShape().kv_tokens(1000) == 1000


@pytest.mark.parametrize("bad", [{"sink": 10}, {"local": 0}, {"block_size": 48}])
def test_a_shape_rejects_bad_parameters(bad):
    with pytest.raises(PlanError):
        build_policy({"policy": "a_shape", "params": bad})


def test_pattern_on_a_native_sliding_window_layer_is_refused():
    lm = tiny_model("gemma3_text")
    plan = plan_of(lm, lambda i, h: AShape(sink=16, local=16, block_size=16) if i == 0 else Full())
    with pytest.raises(PlanError, match="sliding window"):
        Engine(lm, plan).logits(torch.randint(0, 128, (1, 40)))


def test_plan_round_trip_keeps_the_decode_policy():
    p = VerticalSlash(vertical_size=32, decode=PageTopK(budget=256))
    assert build_policy(p.to_spec()) == p
    assert Streaming() != p  # plain streaming stays its own policy


# ------------------------------------------------------------------------------ recall and pictures
def test_recall_is_one_for_everything_and_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 50, 16, generator=g), torch.randn(2, 2, 80, 16, generator=g)
    assert torch.allclose(attention_recall(q, k, torch.ones(50, 80, dtype=torch.bool)), torch.ones(4))
    p = AShape(sink=16, local=16, block_size=16)
    idx, count = p.build_index(q, k, 30, 0.25)
    got = attention_recall(q, k, (idx, count, 16), scale=0.25, chunk=7)
    mask = indices_to_mask(idx, count, 16, 50, 80, 30)[0, 0]
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k.repeat_interleave(2, 1)) * 0.25
    causal = torch.arange(80)[None, :] <= torch.arange(30, 80)[:, None]
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    want = (probs * mask).sum(-1).mean(dim=(0, 2))
    assert torch.allclose(got, want, atol=1e-5)
    assert (got < 0.99).all()


def test_pattern_picture_is_written(tmp_path):
    p = AShape(sink=16, local=32, block_size=16)
    mask = p.mask_mod(torch.arange(200)[:, None], torch.arange(200)[None, :])
    path = draw_mask(mask, tmp_path / "a_shape.png", title=p.short())
    assert path.stat().st_size > 1000


@pytest.mark.gpu
def test_kernel_path_matches_reference_path_in_the_engine():
    """On CUDA, the Triton kernel (use_kernels) and the reference mask path give the same logits (bf16)."""
    lm = tiny_model("llama")
    lm.model.to("cuda", torch.bfloat16)
    for columns in ("blocks", "tokens"):
        plan = plan_of(lm, lambda i, h, c=columns: VerticalSlash(vertical_size=8, slash_size=8, last_q=16,
                                                                   block_size=16, columns=c)
                       if h == 0 else AShape(sink=16, local=32, block_size=16))
        ids = torch.randint(0, 128, (2, L), device="cuda")
        ref = Engine(lm, plan, chunk_size=48, use_kernels=False).logits(ids).float()
        ker = Engine(lm, plan, chunk_size=48, use_kernels=True).logits(ids).float()
        dense = Engine(lm, chunk_size=48, use_kernels=False).logits(ids).float()
        assert (ker - ref).abs().max().item() <= 0.05 + 0.1 * (ref - dense).abs().max().item(), columns


@pytest.mark.gpu
@pytest.mark.parametrize("chunk,keys", [(97, 1025), (512, 4096), (1024, 8192)])
def test_a_later_prompt_chunk_on_the_gpu_matches_the_masked_reference(chunk, keys):
    """``causal_attention`` of a chunk after the first, in bf16 on a GPU, goes through a bottom-right CausalBias
    (flash) instead of a boolean mask (SDPA's math path): it may err at most twice as much as the masked bf16 call
    against the fp32 reference."""
    import torch.nn.functional as F

    from headwise.policies.base import causal_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, 32, chunk, 128, device="cuda", generator=g)
    k, v = (torch.randn(1, 8, keys, 128, device="cuda", generator=g) for _ in range(2))
    start, scale = keys - chunk, 128 ** -0.5
    mask = torch.arange(keys, device="cuda")[None, :] <= torch.arange(start, keys, device="cuda")[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    bf = [t.bfloat16() for t in (q, k, v)]
    masked = F.scaled_dot_product_attention(*bf, attn_mask=mask, scale=scale, enable_gqa=True)
    out = causal_attention(*bf, start, scale)
    assert (out.float() - ref).abs().max() <= 2 * (masked.float() - ref).abs().max() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (24, 6, 128), (4, 1, 256), (9, 3, 64)])
def test_masked_attention_with_gqa_on_the_gpu_leaves_sdpas_math_path(heads, kv_heads, head_dim):
    """``masked_attention`` of a streaming head's prompt chunk (sinks + ring + the chunk, an A-shape mask) in bf16
    with GQA: query heads folded into rows of their KV head, so SDPA's efficient kernel takes it (the call runs with
    the math backend disabled), erring at most twice as much as SDPA's own GQA (math) call against the fp32 reference."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from headwise.policies.base import masked_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    chunk, held, sink, window = 2048, 320, 64, 256
    q = torch.randn(1, heads, chunk, head_dim, device="cuda", generator=g)
    k, v = (torch.randn(1, kv_heads, held + chunk, head_dim, device="cuda", generator=g) for _ in range(2))
    slots = torch.arange(held, device="cuda")
    old = torch.where(slots < sink, slots, 10_000 - (10_000 - slots) % window)
    new = torch.arange(10_001, 10_001 + chunk, device="cuda")
    keys = torch.cat([old, new])
    mask = (keys[None, :] <= new[:, None]) & ((keys[None, :] < sink) | (new[:, None] - keys[None, :] < window))
    scale = head_dim ** -0.5
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    bf = [t.bfloat16() for t in (q, k, v)]
    math = F.scaled_dot_product_attention(*bf, attn_mask=mask, scale=scale, enable_gqa=True)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        out = masked_attention(*bf, mask, scale)
    assert (out.float() - ref).abs().max() <= 2 * (math.float() - ref).abs().max() + 1e-6


@pytest.mark.parametrize("mask_shape", ["LS", "1S", "B1LS", "BHLS", "1HLS", "BH1S"])
@pytest.mark.parametrize("heads,kv_heads,L", [(6, 2, 7), (9, 3, 1), (4, 1, 13), (3, 3, 5)])
def test_masked_attention_folds_query_heads_into_rows_with_every_mask_layout(mask_shape, heads, kv_heads, L):
    """``masked_attention`` folds the query heads sharing a KV head into that head's rows; for every mask layout
    (2-D, broadcast over batch, heads or rows, per query head) it equals SDPA on K/V repeated to the query heads."""
    import torch.nn.functional as F

    from headwise.policies.base import masked_attention

    g = torch.Generator().manual_seed(L * heads + len(mask_shape))
    B, S, D = 2, 11, 16
    q = torch.randn(B, heads, L, D, generator=g)
    k, v = torch.randn(B, kv_heads, S, D, generator=g), torch.randn(B, kv_heads, S, D, generator=g)
    sizes = {"L": L, "S": S, "B": B, "H": heads, "1": 1}
    mask = torch.rand(*(sizes[c] for c in mask_shape), generator=g) < 0.6
    mask[..., 0] = True  # no empty row
    group = heads // kv_heads
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                          attn_mask=mask, scale=0.3)
    got = masked_attention(q, k, v, mask, 0.3)
    assert got.shape == (B, heads, L, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
