"""The one-launch Quest pipeline (``quest_decode``) against the plain-PyTorch references (Triton interpreter on
CPU: programs run one after another, so every wait is already satisfied; on a GPU the same tests run for real)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.quest_pipeline import _scratch, quest_decode
from headwise.kernels.sparse_decode import (
    quest_page_scores_reference,
    sparse_decode_reference,
    top_pages_reference,
)
from headwise.policies.stores import PagedStore, dequantize_bounds, quantize_bounds

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _setup(batch: int, kv_heads: int, group: int, dim: int, length: int, page: int, seed: int, ties: bool = False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, kv_heads * group, dim, generator=g)
    k = torch.randn(batch, kv_heads, length + 5, dim, generator=g)
    v = torch.randn(batch, kv_heads, length + 5, dim, generator=g)
    if ties:  # whole pages of equal keys: equal scores across the k-th place
        k[:, :, : 8 * page] = k[:, :, :1]
    q, k, v = (t.to(DEVICE, torch.bfloat16) for t in (q, k, v))
    store = PagedStore(batch, kv_heads, dim, torch.device(DEVICE), torch.bfloat16, page)
    store.append(k[:, :, :length], v[:, :, :length])
    return q, k, v, store


@pytest.mark.parametrize(("batch", "kv_heads", "group", "dim", "length", "page", "budget", "scorers", "att", "ties"),
                         [(1, 2, 4, 64, 300, 16, 5, 3, 2, False),
                          (2, 3, 1, 80, 257, 8, 9, 2, 3, True),
                          (1, 1, 4, 64, 100, 16, 99, 1, 1, False)],
                         ids=["gqa4-3-scorers", "mha-d80-batch2-ties", "budget-over-all-pages"])
def test_pipeline_selects_the_reference_pages_and_attends_them(batch, kv_heads, group, dim, length, page, budget,
                                                             scorers, att, ties):
    q, k, v, store = _setup(batch, kv_heads, group, dim, length, page, seed=1, ties=ties)
    n_pages = store.num_pages
    for _ in range(2):  # the scratch is left clean: a second call gives the same answer
        table = torch.full((batch, kv_heads, min(budget, n_pages)), -7, dtype=torch.int32, device=DEVICE)
        scores = torch.empty(batch, kv_heads, n_pages, device=DEVICE)
        out = quest_decode(q, k, v, length, store.bounds, budget, page, table_out=table, scores_out=scores,
                           scorers=scorers, attenders_per_head=att, tokens_per_iter=page)
        ref_scores = quest_page_scores_reference(q, store.bounds, n_pages)
        torch.testing.assert_close(scores, ref_scores, atol=1e-3, rtol=1e-4)
        expected = top_pages_reference(scores, budget)
        assert torch.equal(table.long(), expected)
        ref = sparse_decode_reference(q.float(), k.float(), v.float(), length, expected, None, page)
        err = (out.float() - ref).abs().max().item()
        err_pt = (sparse_decode_reference(q, k, v, length, expected, None, page).float() - ref).abs().max().item()
        assert err <= 2 * err_pt + 1e-4
        sync, hist = _scratch(torch.device(DEVICE), batch * kv_heads)
        assert not sync.any() and not hist.any(), "scratch left dirty"


def test_pipeline_reads_8bit_bounds():
    q, k, v, store = _setup(1, 2, 4, 64, 200, 16, seed=2)
    codes, scales = quantize_bounds(store.bounds)
    scores = torch.empty(1, 2, store.num_pages, device=DEVICE)
    table = torch.empty(1, 2, 4, dtype=torch.int32, device=DEVICE)
    quest_decode(q, k, v, 200, codes, 4, 16, scales=scales, table_out=table, scores_out=scores, scorers=2,
                 tokens_per_iter=16)
    ref = quest_page_scores_reference(q, dequantize_bounds(codes, scales), store.num_pages)
    torch.testing.assert_close(scores, ref, atol=1e-3, rtol=1e-4)
    assert torch.equal(table.long(), top_pages_reference(scores, 4))
