"""HyperAttention (policy ``hyper``): its pieces against exact attention, its error where LSH finds the heavy
entries, and its place in the engine."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.plan import HeadPlan
from headwise.policies import Full, Hyper, build_policy
from headwise.policies.hyper import (
    exact_lse,
    gray_rank,
    hyper_causal,
    hyper_unmasked,
    lsh_buckets,
    merge,
    relative_error,
)
from tiny import tiny_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_merging_two_disjoint_key_sets_is_exact_attention():
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 30, 8, seed=1), rand(1, 2, 30, 8, seed=2)
    o, lse = exact_lse(q, k, v, 0.3, causal=False)
    o1, l1 = exact_lse(q, k[:, :, :11], v[:, :, :11], 0.3, causal=False)
    o2, l2 = exact_lse(q, k[:, :, 11:], v[:, :, 11:], 0.3, causal=False)
    om, lm = merge(o1, l1, o2, l2)
    assert torch.allclose(om, o, atol=1e-5) and torch.allclose(lm, lse, atol=1e-5)


def test_gray_order_puts_buckets_one_bit_apart_next_to_each_other():
    rank = gray_rank(5)
    by_rank = torch.argsort(rank)  # bucket ids in sorted order
    flips = by_rank[1:] ^ by_rank[:-1]
    assert all(bin(int(f)).count("1") == 1 for f in flips)


@pytest.mark.parametrize("n", [97, 128])
def test_causal_recursion_with_blocks_covering_every_key_is_exact(n):
    """min_seq_len 16 forces four levels of halving (odd lengths padded); blocks of 1000 keys make every unmasked
    quarter exact, so what is left to check is the recursion and the merges."""
    cfg = Hyper(block_size=1000, sample_size=8, lsh_bits=3, min_seq_len=16)
    q, k, v = rand(2, 3, n, 16), rand(2, 3, n, 16, seed=1), rand(2, 3, n, 16, seed=2)
    want, lse_want = exact_lse(q, k, v, 0.25, causal=True)
    got, lse = hyper_causal(q, k, v, 0.25, cfg, cfg.planes(16, 0, "cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(lse, lse_want, atol=1e-4)


def test_sorted_blocks_attend_inside_their_block_and_padded_keys_are_masked():
    """No samples: each query attends exactly the keys of the sorted key block paired with its sorted query block;
    90 keys in blocks of 32 leave 6 padded slots that must get no weight."""
    cfg = Hyper(block_size=32, sample_size=0, lsh_bits=3, min_seq_len=16)
    q, k, v = rand(1, 1, 50, 8), rand(1, 1, 90, 8, seed=1), rand(1, 1, 90, 8, seed=2)
    planes = cfg.planes(8, 0, "cpu")
    got, _ = hyper_unmasked(q, k, v, 0.3, cfg, planes, torch.Generator().manual_seed(0))
    q_block, k_block = torch.empty(50, dtype=torch.long), torch.empty(90, dtype=torch.long)
    q_block[torch.argsort(lsh_buckets(q, planes)[0, 0], stable=True)] = torch.arange(50) // 17  # 3 blocks of 17
    k_block[torch.argsort(lsh_buckets(k, planes)[0, 0], stable=True)] = torch.arange(90) // 32
    want, _ = exact_lse(q, k, v, 0.3, causal=False, key_ok=q_block[:, None] == k_block[None, :])
    assert torch.allclose(got, want, atol=1e-5)


def paired(n=512, D=32, seed=0):
    """Each query points at one key (its partner, in shuffled order): attention is one heavy entry per row."""
    k = rand(1, 2, n, D, seed=seed)
    k = k / k.norm(dim=-1, keepdim=True) * D**0.5
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    q = k[:, :, perm] * 1.5 + 0.1 * rand(1, 2, n, D, seed=seed + 2)
    return q, k, rand(1, 2, n, D, seed=seed + 3)


def test_sort_lsh_finds_the_heavy_entries():
    """With one heavy key per query, sortLSH blocks must hold the partner for most queries: the relative error stays
    far below that of the same budget spent on uniform samples alone (blocks of one key)."""
    q, k, v = paired()
    exact, _ = exact_lse(q, k, v, 32**-0.5, causal=False)
    cfg = Hyper(block_size=64, sample_size=64, lsh_bits=6, min_seq_len=16)
    got, _ = hyper_unmasked(q, k, v, 32**-0.5, cfg, cfg.planes(32, 0, "cpu"), torch.Generator().manual_seed(0))
    err = relative_error(got, exact)
    blind = Hyper(block_size=1, sample_size=128, lsh_bits=1, min_seq_len=16)
    base, _ = hyper_unmasked(q, k, v, 32**-0.5, blind, blind.planes(32, 0, "cpu"), torch.Generator().manual_seed(0))
    assert (err < 0.45).all(), err  # 0.38 measured; uniform samples alone: 0.92
    assert (err < 0.5 * relative_error(base, exact)).all()


def test_hyper_prefill_in_the_engine_is_close_to_dense_and_reproducible():
    lm = tiny_model("llama")
    pol = Hyper(block_size=16, sample_size=16, lsh_bits=3, min_seq_len=16)
    plan = HeadPlan.from_policies(lm.spec, [[pol, Full()] for _ in range(lm.spec.num_layers)])
    ids = torch.randint(0, 128, (1, 130))
    dense = Engine(lm, chunk_size=64).logits(ids)
    a = Engine(lm, plan, chunk_size=64).logits(ids)  # chunks of 64, 64, 2: the prefix path runs
    b = Engine(lm, plan, chunk_size=64).logits(ids)
    assert torch.equal(a, b)
    assert torch.allclose(a[:, :16], dense[:, :16], atol=1e-5)  # the first 16 queries are exact
    assert 1e-4 < (a - dense).abs().max().item() < 5.0


def test_hyper_below_min_seq_len_is_dense():
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, Hyper().to_spec())
    ids = torch.randint(0, 128, (2, 90))
    assert (Engine(lm, plan, chunk_size=40).logits(ids) - Engine(lm).logits(ids)).abs().max().item() <= 1e-4


def test_hyper_refuses_a_decode_policy_that_drops_tokens():
    with pytest.raises(PlanError, match="full cache"):
        build_policy({"policy": "hyper", "decode": {"policy": "streaming"}})
    assert build_policy(Hyper(sample_size=128).to_spec()) == Hyper(sample_size=128)


@pytest.mark.gpu
def test_flash_log_sum_exp_matches_the_reference_on_cuda():
    q, k, v = (rand(1, 4, 300, 64, seed=s).cuda().bfloat16() for s in range(3))
    o, lse = exact_lse(q, k, v, 0.125, causal=True)
    o_ref, lse_ref = exact_lse(q.float(), k.float(), v.float(), 0.125, causal=True)
    assert (lse - lse_ref).abs().max().item() < 2e-2 and (o - o_ref).abs().max().item() < 3e-2


@pytest.mark.gpu
def test_hyper_flash_path_matches_its_reference_path_in_the_engine():
    lm = tiny_model("llama")
    lm.model.to("cuda", torch.bfloat16)
    pol = Hyper(block_size=16, sample_size=16, lsh_bits=3, min_seq_len=16)
    plan = HeadPlan.from_policies(lm.spec, [[pol, Full()] for _ in range(lm.spec.num_layers)])
    ids = torch.randint(0, 128, (1, 256), device="cuda")
    ref = Engine(lm, plan, chunk_size=256, use_kernels=False).logits(ids).float()
    fast = Engine(lm, plan, chunk_size=256, use_kernels=True).logits(ids).float()
    dense = Engine(lm, chunk_size=256, use_kernels=False).logits(ids).float()
    assert (fast - ref).abs().max().item() <= 0.05 + 0.1 * (ref - dense).abs().max().item()
