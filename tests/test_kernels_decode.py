"""The paged sparse decode kernel and Quest scoring against plain-PyTorch references (Triton interpreter on CPU).

Tolerance, as in flash-attention's tests: the kernel in dtype X may err (vs an fp32 reference) at most twice
as much as plain PyTorch computing in dtype X, plus a small absolute slack.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.decode_reference import (
    quest_page_scores_reference,
    sparse_decode_reference,
    top_pages_reference,
)
from headwise.kernels.paged_decode import merge_splits, sparse_decode, topk_sparse_decode
from headwise.kernels.quest import quest_page_scores, select_pages
from headwise.policies.stores import PagedStore

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, PAGE = 97, 16  # 7 pages, the last one holding a single token


def _cache(batch: int, kv_heads: int, group: int, dim: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, kv_heads, S + 11, dim, generator=g)  # capacity beyond the valid length
    v = torch.randn(batch, kv_heads, S + 11, dim, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


def _permuted_table(batch: int, kv_heads: int, seed: int = 0):
    """A different number of pages per (sequence, head), listed in a random order, -1 padded."""
    g = torch.Generator().manual_seed(seed)
    n_pages = -(-S // PAGE)
    table = torch.full((batch, kv_heads, n_pages), -1, dtype=torch.int32)
    counts = torch.zeros(batch, kv_heads, dtype=torch.int32)
    for b in range(batch):
        for h in range(kv_heads):
            n = 1 + (2 * (b * kv_heads + h)) % n_pages  # 1, 3, 5, 7 pages
            table[b, h, :n] = torch.randperm(n_pages, generator=g)[:n].int()
            counts[b, h] = n
    return table.to(DEVICE), counts.to(DEVICE)


def _check(out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor) -> None:
    err = (out.float() - out_ref).abs().max().item()
    err_pt = (out_pt.float() - out_ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-4, f"kernel error {err:.2e} vs PyTorch-same-dtype error {err_pt:.2e}"


@pytest.mark.parametrize(
    ("group", "dim", "dtype"),
    [(4, 64, torch.bfloat16), (1, 128, torch.float16), (4, 128, torch.float32)],
    ids=["gqa4-d64-bf16", "mha-d128-fp16", "gqa4-d128-fp32"],
)
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "three-splits"])
def test_kernel_reads_only_listed_pages(group, dim, dtype, num_splits):
    q, k, v = _cache(2, 2, group, dim, dtype)
    table, counts = _permuted_table(2, 2)
    # One page per iteration, so three splits each hold pages (and some heads leave a split empty).
    out = sparse_decode(q, k, v, S, table, counts, PAGE, num_splits=num_splits, tokens_per_iter=PAGE)
    ref = sparse_decode_reference(q.float(), k.float(), v.float(), S, table, counts, PAGE)
    _check(out, sparse_decode_reference(q, k, v, S, table, counts, PAGE), ref)


def test_all_pages_is_dense_attention_over_the_valid_slots():
    q, k, v = _cache(2, 2, 4, 64, torch.bfloat16, seed=1)
    out = sparse_decode(q, k, v, S, None, page_size=PAGE)
    qf, kf, vf = q.float()[:, :, None], k.float()[:, :, :S], v.float()[:, :, :S]
    ref = F.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True)[:, :, 0]
    _check(out, sparse_decode_reference(q, k, v, S, None, page_size=PAGE), ref)


def test_second_group_in_the_same_launch_attends_its_own_cache():
    """Full heads over a long cache and streaming heads over their ring buffer, one launch (plan_a's layer)."""
    q, k, v = _cache(2, 5, 4, 64, torch.bfloat16, seed=7)  # KV heads 0-1: first group, 2-4: second group
    ring_k, ring_v = k[:, 2:, :40].contiguous(), v[:, 2:, :40].contiguous()
    out = sparse_decode(q, k[:, :2], v[:, :2], S, None, page_size=PAGE, second=(ring_k, ring_v, 37), num_splits=3)
    for heads, args in ((slice(0, 8), (k[:, :2], v[:, :2], S)), (slice(8, 20), (ring_k, ring_v, 37))):
        ref = sparse_decode_reference(q[:, heads].float(), args[0].float(), args[1].float(), args[2], page_size=PAGE)
        pt = sparse_decode_reference(q[:, heads], *args, page_size=PAGE)
        _check(out[:, heads], pt, ref)


def test_page_size_one_takes_token_positions_and_writes_into_a_given_slice():
    q, k, v = _cache(1, 2, 4, 64, torch.float32, seed=2)
    positions = torch.tensor([[[96, 3, 50, 0, 17], [5, 95, -1, -1, -1]]], device=DEVICE)
    out = torch.full((1, 12, 64), float("nan"), device=DEVICE)[:, 2:10]  # write into a slice, in place
    sparse_decode(q, k, v, S, positions, page_size=1, num_splits=3, out=out, tokens_per_iter=16)
    mask = torch.zeros(1, 2, S, dtype=torch.bool, device=DEVICE)
    mask[0, 0, [96, 3, 50, 0, 17]] = True
    mask[0, 1, [5, 95]] = True
    ref = F.scaled_dot_product_attention(q[:, :, None], k[:, :, :S], v[:, :, :S], enable_gqa=True,
                                         attn_mask=mask.repeat_interleave(4, dim=1)[:, :, None])[:, :, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_quest_score_bounds_every_key_of_its_page():
    q, k, _ = _cache(1, 2, 4, 64, torch.float32, seed=3)
    store = PagedStore(1, 2, 64, torch.device(DEVICE), torch.float32, PAGE)
    store.append(k[:, :, :S], k[:, :, :S])
    scores = quest_page_scores_reference(q, store.page_bounds(), store.num_pages, keep_ends=False)
    qk = torch.einsum("bhgd,bhsd->bhs", q.view(1, 2, 4, 64), k[:, :, :S])  # q.k summed over the group
    for p in range(store.num_pages):
        page_max = qk[:, :, p * PAGE : (p + 1) * PAGE].amax(dim=-1)
        assert bool((scores[:, :, p] >= page_max - 1e-4).all())


def test_quest_kernel_matches_reference_and_keeps_the_ends():
    q, _, _ = _cache(2, 2, 4, 64, torch.bfloat16, seed=4)
    bounds = torch.randn(2, 2, 9, 2, 64).to(DEVICE, torch.bfloat16)
    bounds = torch.stack([bounds.amin(dim=3), bounds.amax(dim=3)], dim=3)
    ref = quest_page_scores_reference(q, bounds, 7)
    for tiles in ({}, {"block_p": 4, "num_warps": 2}):  # several programs per head, the last one partial
        out = quest_page_scores(q, bounds, 7, **tiles)
        assert bool(torch.isinf(out[:, :, [0, 6]]).all())
        torch.testing.assert_close(out[:, :, 1:6], ref[:, :, 1:6], atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "triton"])
def test_select_pages_takes_the_top_scores_within_the_budget(use_kernel):
    scores = torch.tensor([[[float("inf"), 1.0, 5.0, 3.0, -2.0, float("inf")]]], device=DEVICE)
    chosen = select_pages(scores, budget_pages=4, use_kernel=use_kernel)
    assert sorted(chosen[0, 0].tolist()) == [0, 2, 3, 5]
    assert sorted(select_pages(scores, budget_pages=99, use_kernel=use_kernel)[0, 0].tolist()) == list(range(6))


def test_triton_top_k_selects_the_same_scores_as_torch_with_ties_and_negatives():
    g = torch.Generator().manual_seed(6)
    scores = torch.randn(2, 3, 300, generator=g).round(decimals=1).to(DEVICE)  # many ties
    scores[..., 0] = scores[..., -1] = float("inf")
    chosen = select_pages(scores, 37, use_kernel=True).long()
    expected = torch.topk(scores, 37, dim=-1).values
    assert all(len(set(row.tolist())) == 37 for row in chosen.view(-1, 37))
    torch.testing.assert_close(scores.gather(2, chosen).sort(-1).values, expected.sort(-1).values)


def test_paged_store_bounds_follow_chunked_appends():
    g = torch.Generator().manual_seed(5)
    keys = torch.randn(2, 3, S, 8, generator=g)
    store = PagedStore(2, 3, 8, torch.device("cpu"), torch.float32, PAGE)
    for a, b in [(0, 5), (5, 40), (40, 41), (41, 97)]:  # partial pages, a one-token step, page-crossing chunks
        store.append(keys[:, :, a:b], keys[:, :, a:b])
    pages = torch.nn.functional.pad(keys, (0, 0, 0, 7 * PAGE - S), value=float("nan")).view(2, 3, 7, PAGE, 8)
    torch.testing.assert_close(store.page_bounds()[:, :, :, 0], pages.nan_to_num(float("inf")).amin(dim=3))
    torch.testing.assert_close(store.page_bounds()[:, :, :, 1], pages.nan_to_num(float("-inf")).amax(dim=3))
    assert any(t is store.bounds for t in store.tensors())  # metadata bytes are counted


def _tied_scores(batch: int, kv_heads: int, n_pages: int, seed: int) -> torch.Tensor:
    """Scores with many ties (one decimal), -0.0 next to 0.0, and +inf at both ends (``keep_ends``)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, kv_heads, n_pages, generator=g).round(decimals=0)
    scores[..., 1] = -0.0
    scores[..., 2] = 0.0
    scores[..., 0] = scores[..., -1] = float("inf")
    return scores.to(DEVICE)


@pytest.mark.parametrize("fused_merge", [0, 1], ids=["merge-kernel", "last-program-merges"])
@pytest.mark.parametrize(("group", "dim", "budget", "num_splits"),
                         [(4, 64, 3, 2), (1, 80, 5, 3), (4, 64, 7, 4), (4, 64, 1, 1)],
                         ids=["gqa4-3of7-2splits", "mha-d80-5of7-3splits", "all-pages-4splits", "one-page"])
def test_topk_decode_selects_in_kernel_and_attends_those_pages(group, dim, budget, num_splits, fused_merge):
    """Selection inside the attention kernel: the exact ``top_pages_reference`` set (ties to the lower page, -0.0
    == 0.0), attended with a partial last page, over several splits (some empty), batch 2, 3 KV heads."""
    q, k, v = _cache(2, 3, group, dim, torch.bfloat16, seed=8)
    scores = _tied_scores(2, 3, -(-S // PAGE), seed=9)
    table = torch.full((2, 3, min(budget, scores.shape[-1])), -7, dtype=torch.int32, device=DEVICE)
    out = topk_sparse_decode(q, k, v, S, scores, budget, PAGE, num_splits=num_splits, tokens_per_iter=PAGE,
                             table_out=table, fused_merge=fused_merge)
    expected = top_pages_reference(scores, budget)
    assert torch.equal(table.long(), expected)
    ref = sparse_decode_reference(q.float(), k.float(), v.float(), S, expected, None, PAGE)
    _check(out, sparse_decode_reference(q, k, v, S, expected, None, PAGE), ref)


def test_select_pages_kernel_is_the_reference_selection():
    scores = _tied_scores(2, 3, 300, seed=10)
    for budget in (1, 2, 37, 300):
        torch.testing.assert_close(select_pages(scores, budget, use_kernel=True).long(),
                                   top_pages_reference(scores, budget), rtol=0, atol=0)


@pytest.mark.parametrize("num_splits", [2, 5], ids=["two-splits", "five-splits"])
def test_last_program_merge_matches_the_merge_kernel(num_splits):
    """``fused_merge=1`` (the last program of a head merges, counters reset for the next call) on a page table
    with empty splits, then on all pages with a second group, each twice: the same answer every call."""
    q, k, v = _cache(2, 2, 4, 64, torch.bfloat16, seed=11)
    table, counts = _permuted_table(2, 2, seed=12)
    ref = sparse_decode(q, k, v, S, table, counts, PAGE, num_splits=num_splits, tokens_per_iter=PAGE)
    for _ in range(2):
        torch.testing.assert_close(sparse_decode(q, k, v, S, table, counts, PAGE, num_splits=num_splits,
                                                 tokens_per_iter=PAGE, fused_merge=1), ref)
    ring_k, ring_v = k[:, 1:, :40].contiguous(), v[:, 1:, :40].contiguous()
    two = {"second": (ring_k, ring_v, 37), "num_splits": num_splits, "tokens_per_iter": PAGE, "page_size": PAGE}
    ref = sparse_decode(q, k[:, :1], v[:, :1], S, None, **two)
    for _ in range(2):
        torch.testing.assert_close(sparse_decode(q, k[:, :1], v[:, :1], S, None, fused_merge=1, **two), ref)


def _hard_scores() -> torch.Tensor:
    """Rows that stress the histogram selection: ties with -0.0, all equal, many +inf (the k-th largest
    among the keys above the finite range), tiny and huge magnitudes with -inf, and a smooth random row."""
    g = torch.Generator().manual_seed(13)
    rows = _tied_scores(1, 2, 300, seed=14)[0].cpu()
    equal = torch.full((300,), 2.5)
    infs = torch.randn(300, generator=g)
    infs[::3] = float("inf")
    wide = torch.randn(300, generator=g) * 1e-30
    wide[5], wide[9], wide[11] = float("-inf"), 3e38, -3e38
    smooth = torch.randn(300, generator=g)
    return torch.stack([rows[0], rows[1], equal, infs, wide, smooth])[None].to(DEVICE)


@pytest.mark.parametrize("bins", [8, 256], ids=["8-bins", "256-bins"])
def test_histogram_selection_is_the_reference_selection(bins):
    """``bins`` > 0 (the histogram select): the exact ``top_pages_reference`` set, in ascending order, on rows
    where the k-th largest sits in a crowded bin, in a run of ties, among +inf, or at the range's ends."""
    scores = _hard_scores()
    for budget in (1, 2, 37, 100, 299, 300):
        torch.testing.assert_close(select_pages(scores, budget, use_kernel=True, bins=bins).long(),
                                   top_pages_reference(scores, budget), rtol=0, atol=0)


def test_topk_decode_with_histogram_selection_attends_the_reference_pages():
    q, k, v = _cache(2, 3, 4, 64, torch.bfloat16, seed=15)
    scores = _tied_scores(2, 3, -(-S // PAGE), seed=16)
    table = torch.full((2, 3, 3), -7, dtype=torch.int32, device=DEVICE)
    out = topk_sparse_decode(q, k, v, S, scores, 3, PAGE, num_splits=2, tokens_per_iter=PAGE, table_out=table,
                             select_bins=4)
    expected = top_pages_reference(scores, 3)
    assert torch.equal(table.long(), expected)
    ref = sparse_decode_reference(q.float(), k.float(), v.float(), S, expected, None, PAGE)
    _check(out, sparse_decode_reference(q, k, v, S, expected, None, PAGE), ref)


def test_quest_kernel_reads_8bit_bounds_with_their_scales():
    """e4m3 bounds rounded outward (``quantize_bounds``): the kernel's scores match the reference on the
    dequantized bounds, and still bound ``q . k`` over every page (looser than the exact bounds)."""
    from headwise.policies.stores import dequantize_bounds, quantize_bounds

    q, k, _ = _cache(1, 2, 4, 64, torch.float32, seed=21)
    store = PagedStore(1, 2, 64, torch.device(DEVICE), torch.float32, PAGE)
    store.append(k[:, :, :S], k[:, :, :S])
    codes, scales = quantize_bounds(store.page_bounds())
    out = quest_page_scores(q, codes, store.num_pages, keep_ends=False, scales=scales)
    ref = quest_page_scores_reference(q, dequantize_bounds(codes, scales), store.num_pages, keep_ends=False)
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
    exact = quest_page_scores_reference(q, store.page_bounds(), store.num_pages, keep_ends=False)
    qk = torch.einsum("bhgd,bhsd->bhs", q.view(1, 2, 4, 64), k[:, :, :S])
    for p in range(store.num_pages):
        assert bool((out[:, :, p] >= qk[:, :, p * PAGE : (p + 1) * PAGE].amax(dim=-1) - 1e-4).all())
    assert bool((out >= exact - 1e-4).all())


@pytest.mark.parametrize(("splits", "splits2"), [(1, 1), (3, 63), (64, 2), (65, 130)])
def test_merge_weighs_each_split_by_its_log_sum_exp(splits, splits2):
    """``merge_splits`` with split counts on both sides of its one block of 64 (one compiled kernel up to there), a
    second head group with its own count, stale values past each head's count and a head with no keys at all: the
    softmax-weighted mean of the partial outputs, as plain PyTorch computes it."""
    g = torch.Generator().manual_seed(7)
    B, Hq, D, first = 2, 6, 40, 4  # heads 4 and 5 are the second group
    most = max(splits, splits2)
    o_part = torch.randn(B, Hq, most + 3, D, generator=g)
    lse_part = torch.randn(B, Hq, most + 3, generator=g) * 4  # log2 units
    lse_part[1, 2] = float("-inf")  # no keys: the output is 0
    out = torch.empty(B, Hq, D)
    args = [t.to(DEVICE) for t in (o_part, lse_part, out)]
    merge_splits(*args, splits, first, splits2)
    want = torch.empty(B, Hq, D)
    for h in range(Hq):
        n = splits if h < first else splits2
        w = torch.exp2(lse_part[:, h, :n] - lse_part[:, h, :n].amax(-1, keepdim=True)).nan_to_num(0.0)
        want[:, h] = (w[..., None] * o_part[:, h, :n]).sum(1) / w.sum(-1, keepdim=True).clamp_min(1e-30)
    want[1, 2] = 0.0
    torch.testing.assert_close(args[2].cpu(), want, rtol=1e-5, atol=1e-5)
