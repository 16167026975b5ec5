"""``quest_decode`` (score + select + attend in one launch) against the plain-PyTorch references: Quest scores,
the exact top-k selection and masked attention (Triton interpreter on CPU; the same file runs on a GPU).

Tolerance as tests/test_kernels_decode.py: the kernel may err at most twice as much as PyTorch in the same dtype.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.quest_decode import quest_decode
from headwise.kernels.sparse_decode import (
    quest_page_scores_reference,
    sparse_decode_reference,
    top_pages_reference,
)

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 16


def _case(batch: int, kv_heads: int, group: int, dim: int, length: int, seed: int, dtype=torch.bfloat16,
          tie_pages: tuple[int, int] | None = None):
    """q, k, v and the per-page min/max key bounds (the partial last page bounded by its valid tokens only).
    ``tie_pages=(lo, hi)`` gives pages lo..hi-1 the same bounds, so their scores tie exactly."""
    g = torch.Generator().manual_seed(seed)
    cap = length + 9
    q = torch.randn(batch, kv_heads * group, dim, generator=g).to(dtype)
    k = torch.randn(batch, kv_heads, cap, dim, generator=g).to(dtype)
    v = torch.randn(batch, kv_heads, cap, dim, generator=g).to(dtype)
    n_pages = -(-length // PAGE)
    if tie_pages is not None:
        lo, hi = tie_pages
        k[:, :, lo * PAGE : hi * PAGE] = k[:, :, lo * PAGE : (lo + 1) * PAGE].repeat(1, 1, hi - lo, 1)
    bounds = torch.zeros(batch, kv_heads, n_pages + 2, 2, dim, dtype=dtype)  # spare page capacity
    for p in range(n_pages):
        keys = k[:, :, p * PAGE : min(length, (p + 1) * PAGE)]
        bounds[:, :, p, 0] = keys.amin(dim=2)
        bounds[:, :, p, 1] = keys.amax(dim=2)
    return [t.to(DEVICE) for t in (q, k, v, bounds)]


def _run_and_check(q, k, v, bounds, length, budget, calls: int = 2, **kw):
    B, Hkv = k.shape[:2]
    n_pages = -(-length // PAGE)
    for _ in range(calls):  # the second call checks that the first left the scratch state clean
        scores = torch.full((B, Hkv, n_pages), float("nan"), device=DEVICE)
        selected = torch.full((B, Hkv, n_pages), -1, dtype=torch.int8, device=DEVICE)
        out = quest_decode(q, k, v, length, bounds, budget, PAGE, scores_out=scores, selected_out=selected, **kw)
        ref_scores = quest_page_scores_reference(q, bounds, n_pages, keep_ends=kw.get("keep_ends", True))
        torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-4)
        chosen = top_pages_reference(scores, budget)  # the exact selection on the kernel's own scores
        expected = torch.zeros(B, Hkv, n_pages, dtype=torch.int8, device=DEVICE).scatter_(2, chosen, 1)
        assert torch.equal(selected, expected)
        ref = sparse_decode_reference(q.float(), k.float(), v.float(), length, chosen, None, PAGE)
        err = (out.float() - ref).abs().max().item()
        err_pt = (sparse_decode_reference(q, k, v, length, chosen, None, PAGE).float() - ref).abs().max().item()
        assert err <= 2 * err_pt + 1e-4, f"kernel error {err:.2e} vs PyTorch-same-dtype error {err_pt:.2e}"
    return chosen


@pytest.mark.parametrize(("group", "dim", "budget", "splits"),
                         [(4, 64, 7, 4), (1, 80, 3, 3), (4, 64, 40, 5), (2, 64, 1, 2)],
                         ids=["gqa4-7of40-4splits", "mha-d80-3of40", "all-pages", "one-page"])
def test_quest_decode_is_score_select_attend(group, dim, budget, splits):
    """Batch 2, 2 KV heads, 40 pages with a partial last one, each program owning 8-20 interleaved pages (so
    several attention steps of one page each)."""
    q, k, v, bounds = _case(2, 2, group, dim, 40 * PAGE - 5, seed=group + dim)
    _run_and_check(q, k, v, bounds, 40 * PAGE - 5, budget, num_splits=splits, tokens_per_iter=PAGE)


def test_quest_decode_ranks_ties_across_the_kth_place():
    """Pages 6-29 share their bounds, so their scores tie and the k-th place falls inside the tie: the lower
    pages win, as in ``top_pages_reference`` (the per-page rank path, not the whole-bin shortcut)."""
    q, k, v, bounds = _case(1, 2, 4, 64, 36 * PAGE, seed=3, tie_pages=(6, 30))
    n_pages = 36
    scores = quest_page_scores_reference(q, bounds, n_pages)
    for budget in (5, 12):
        chosen = _run_and_check(q, k, v, bounds, 36 * PAGE, budget, calls=1, num_splits=4)
        tied = scores[0, 0, 6]
        inside = (scores[0, 0, chosen[0, 0]] == tied).sum().item()
        total_tied = (scores[0, 0] == tied).sum().item()
        assert 0 < inside < total_tied, "the budget must cut through the tie for this test to mean anything"


def test_quest_decode_without_ends_and_with_fp32():
    q, k, v, bounds = _case(1, 3, 4, 64, 33 * PAGE, seed=5, dtype=torch.float32)
    _run_and_check(q, k, v, bounds, 33 * PAGE, 6, keep_ends=False, num_splits=3)


def test_quest_decode_budget_smaller_than_the_kept_ends():
    """Budget 1 with both ends at +inf: the first page (ties to the lower index)."""
    q, k, v, bounds = _case(1, 1, 4, 64, 20 * PAGE, seed=6)
    chosen = _run_and_check(q, k, v, bounds, 20 * PAGE, 1, num_splits=2)
    assert chosen.flatten().tolist() == [0]



def test_quest_decode_resolves_a_crowded_coarse_bin_by_the_fine_one():
    """A large common offset in one channel puts every score within ~1% of the others, so many pages share the
    coarse bin (the score's top 16 bits) of the k-th place and the fine level decides."""
    q, k, v, bounds = _case(1, 2, 4, 64, 48 * PAGE, seed=11, dtype=torch.float32)
    bounds[..., 0] += 2000.0
    n = 48
    scores = quest_page_scores_reference(q, bounds, n)
    finite = scores[0, 0, 1 : n - 1]
    assert (finite.max() - finite.min()) / finite.abs().mean() < 0.02, "scores must crowd for this test"
    _run_and_check(q, k, v, bounds, 48 * PAGE, 9, num_splits=4)


def test_quest_decode_falls_back_to_ranking_when_fine_bins_alias():
    """Pages holding 4x the bounds of the threshold page score exactly 4x (coarse bins 256 apart, the same fine
    entries): the fine level's total disagrees with the coarse bin's count, and the kernel ranks inside the
    coarse bin instead. Page 20 copies the threshold page 12, so the k-th place is a tie (the lower page wins)."""
    q, k, v, bounds = _case(1, 1, 4, 64, 40 * PAGE, seed=12)
    bounds[:, :, 30] = 4 * bounds[:, :, 12]
    bounds[:, :, 31] = 4 * bounds[:, :, 12]
    bounds[:, :, 20] = bounds[:, :, 12]
    scores = quest_page_scores_reference(q, bounds, 40)
    assert scores[0, 0, 20] == scores[0, 0, 12] and scores[0, 0, 30] == 4 * scores[0, 0, 12]
    if scores[0, 0, 12] <= 0:
        pytest.skip("the threshold page must score above zero for the 4x copies to rank above it")
    budget = int((scores[0, 0] > scores[0, 0, 12]).sum().item()) + 1  # page 12 is the k-th, page 20 just out
    chosen = _run_and_check(q, k, v, bounds, 40 * PAGE, budget, calls=1, num_splits=3)
    assert 12 in chosen.flatten().tolist() and 20 not in chosen.flatten().tolist()
