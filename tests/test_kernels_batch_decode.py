"""The batched varlen decode kernel over a paged pool (``kernels/batch_decode.py``) against its plain-PyTorch
reference and against each policy's own semantics, under Triton's interpreter on CPU.

Every pool starts as random garbage and each row's pages are scattered over it in a shuffled order, so a kernel
that reads a slot it should not, or indexes the wrong page, gets a wrong answer rather than a lucky zero. The
tolerance is flash-attention's: at most twice the error of plain PyTorch in the same dtype, plus 1e-4.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.batch_decode import batch_decode
from headwise.kernels.decode_reference import batch_decode_reference
from headwise.policies.base import PagedLayout
from pools import noise_pool

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 16


class Pool:
    """A garbage-filled pool and, per row, a shuffled set of its pages; ``history[b]`` is row ``b``'s keys and
    values by position ``[H, length, D]``, written into its pages through ``PagePool.write`` one token at a time
    (as decode steps write them)."""

    def __init__(self, lengths: list[int], heads: int, group: int, dim: int, dtype: torch.dtype, page_slots: int,
                 sink: int = 0, window: int = 0, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.lengths, self.heads, self.group, self.dim, self.dtype = lengths, heads, group, dim, dtype
        per_row = -(-page_slots // PAGE)
        n_pages = len(lengths) * heads * per_row + 3
        pool = noise_pool(heads, group, dim, dtype, n_pages, PAGE, DEVICE, g)
        self.k_pool, self.v_pool = pool.keys, pool.values
        order = torch.randperm(n_pages, generator=g)[: len(lengths) * heads * per_row]
        self.table = order.view(len(lengths), heads, per_row).int().to(DEVICE)
        self.q = torch.randn(len(lengths), heads * group, dim, generator=g).to(DEVICE, dtype)
        self.history = [torch.randn(2, heads, n, dim, generator=g).to(DEVICE, dtype) for n in lengths]
        self.lengths_t = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        for b, n in enumerate(lengths):
            for p in range(n):
                pos = torch.tensor([[p]], device=DEVICE)
                slot = PagedLayout(sink, window).slots(pos)
                k, v = self.history[b][:, :, p : p + 1][:, None]  # [1, H, 1, D] each
                pool.write(self.table[b : b + 1], slot, k, v)

    def semantic(self, visible) -> torch.Tensor:
        """fp32 attention of each row's query over the positions ``visible(b, n)`` (a bool [n]) of its history."""
        out = torch.zeros(self.q.shape, dtype=torch.float32, device=DEVICE)
        for b, n in enumerate(self.lengths):
            keep = visible(b, n)
            if n == 0 or not keep.any():
                continue
            k = self.history[b][0].float()[:, keep].repeat_interleave(self.group, 0)  # [Hq, m, D]
            v = self.history[b][1].float()[:, keep].repeat_interleave(self.group, 0)
            probs = torch.softmax(torch.einsum("hd,hmd->hm", self.q[b].float(), k) * self.dim**-0.5, dim=-1)
            out[b] = torch.einsum("hm,hmd->hd", probs, v)
        return out


def _check(out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor) -> None:
    err = (out.float() - out_ref).abs().max().item()
    err_pt = (out_pt.float() - out_ref).abs().max().item()
    assert err <= 2 * err_pt + 1e-4, f"kernel error {err:.2e} vs PyTorch-same-dtype error {err_pt:.2e}"


RAGGED = [37, 1, 0, 64, 97]  # a partial page, one token, an empty row, whole pages, 7 pages with 1 token in the last


@pytest.mark.parametrize(("group", "dtype"), [(4, torch.float32), (1, torch.bfloat16)], ids=["gqa4-fp32", "mha-bf16"])
@pytest.mark.parametrize("num_splits", [1, 3], ids=["one-split", "three-splits"])
def test_full_group_attends_every_token_of_each_row_through_its_pages(group, dtype, num_splits):
    pool = Pool(RAGGED, heads=2, group=group, dim=64, dtype=dtype, page_slots=max(RAGGED))
    out = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, max(RAGGED), PAGE,
                       num_splits=num_splits, tokens_per_iter=PAGE)
    want = pool.semantic(lambda b, n: torch.ones(n, dtype=torch.bool))
    ref = batch_decode_reference(pool.q.float(), pool.k_pool.float(), pool.v_pool.float(), pool.table,
                                 pool.lengths_t, PAGE)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)  # the reference reads the pool as the rows wrote it
    _check(out, batch_decode_reference(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, PAGE), want)
    assert out[2].eq(0).all(), "a row of length 0 attends nothing"


@pytest.mark.parametrize("num_splits", [1, 2], ids=["one-split", "two-splits"])
def test_streaming_group_attends_sinks_and_window_whatever_the_ring_rotation(num_splits):
    sink, window = 4, 20  # 24 slots: two pages, the second partial
    lengths = [3, 24, 61, 0, 45]  # before the ring fills, exactly full, wrapped twice, empty, wrapped once
    pool = Pool(lengths, heads=2, group=4, dim=32, dtype=torch.float32, page_slots=sink + window, sink=sink,
                window=window, seed=1)
    out = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, max(lengths), PAGE,
                       ring=sink + window, num_splits=num_splits, tokens_per_iter=PAGE)

    def streaming_llm(b: int, n: int) -> torch.Tensor:  # the newest token (position n - 1) sees j < sink or n-1-j < window
        j = torch.arange(n)
        return (j < sink) | (n - 1 - j < window)

    want = pool.semantic(streaming_llm)
    ref = batch_decode_reference(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, PAGE, ring=sink + window)
    torch.testing.assert_close(ref.float(), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=1e-4)
    assert out[3].eq(0).all()


@pytest.mark.parametrize("num_splits", [1, 2], ids=["one-split", "two-splits"])
def test_page_topk_group_attends_only_the_selected_pages_within_each_row(num_splits):
    lengths = [50, 97, 0, 16]
    pool = Pool(lengths, heads=2, group=2, dim=64, dtype=torch.float32, page_slots=max(lengths), seed=2)
    # Per (row, head): logical pages in any order, -1 padded; row 0 head 1 names page 5, past its 4 pages (stale).
    selected = torch.tensor([[[3, 0, -1], [1, 5, 3]],
                             [[6, 2, 0], [0, -1, -1]],
                             [[0, -1, -1], [-1, -1, -1]],
                             [[0, -1, -1], [-1, 0, -1]]], dtype=torch.int32, device=DEVICE)
    out = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, max(lengths), PAGE,
                       selected=selected, num_splits=num_splits, tokens_per_iter=PAGE)
    sel = selected.cpu()

    def in_selected_pages(b: int, n: int, h: int) -> torch.Tensor:
        return torch.isin(torch.arange(n) // PAGE, sel[b, h][sel[b, h] >= 0])

    want = torch.cat([pool.semantic(lambda b, n, h=h: in_selected_pages(b, n, h)).view(4, 2, 2, 64)[:, h]
                      for h in range(2)], dim=1).view(4, 4, 64)
    torch.testing.assert_close(out.float(), want, rtol=0, atol=1e-4)
    ref = batch_decode_reference(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, PAGE, selected=selected)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-5)
    assert out[2].eq(0).all()


def test_an_empty_batch_launches_nothing_and_returns_an_empty_output():
    pool = Pool([5], heads=2, group=2, dim=32, dtype=torch.float32, page_slots=16)
    q = pool.q[:0]
    out = batch_decode(q, pool.k_pool, pool.v_pool, pool.table[:0], pool.lengths_t[:0], 0, PAGE)
    assert out.shape == (0, 4, 32)


def test_lengths_are_read_on_the_device_so_one_launch_size_serves_growing_rows():
    """A launch sized for ``max_len`` (as a CUDA graph is captured at a limit) gives each row its current length."""
    pool = Pool([40, 9], heads=1, group=2, dim=32, dtype=torch.float32, page_slots=64, seed=3)
    at_limit = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, 64, PAGE, tokens_per_iter=PAGE)
    tight = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, pool.lengths_t, 40, PAGE, tokens_per_iter=PAGE)
    torch.testing.assert_close(at_limit, tight, rtol=0, atol=1e-6)
    shorter = pool.lengths_t - torch.tensor([8, 0], dtype=torch.int32, device=DEVICE)
    fewer = batch_decode(pool.q, pool.k_pool, pool.v_pool, pool.table, shorter, 64, PAGE, tokens_per_iter=PAGE)
    assert not torch.allclose(fewer[0], at_limit[0]) and torch.equal(fewer[1], at_limit[1])


def test_the_benchmark_workloads_compute_what_the_reference_does():
    """``headwise bench --which batch_decode``'s dense, 25%-full and Quest layers at Llama-3-8B head shapes, tiny
    lengths (Quest choosing 3 of 97 tokens' 7 pages)."""
    from headwise.bench.batch_decode import check

    errors = check(2, 97, PAGE, DEVICE, torch.float32, quest_budget=3 * PAGE)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton specializes kernels only when it compiles them")
def test_a_new_length_split_or_table_width_compiles_no_new_kernel():
    """A mixed serving step runs the kernel eagerly with the rows' longest length, its split sizes and the tables'
    width as they are that step: each new value must reuse the compiled kernel (Triton makes a new specialization
    for an int equal to 1 or divisible by 16 unless told not to; run 19's slow steps each loaded one or two)."""
    from headwise.kernels.batch_decode import _batch_decode_kernel
    from headwise.kernels.paged_decode import _merge_splits_kernel

    def compiled() -> tuple[int, int]:
        return tuple(sum(len(c[0]) for c in k.device_caches.values())  # type: ignore[return-value]
                     for k in (_batch_decode_kernel, _merge_splits_kernel))

    pool = Pool([300, 97], heads=2, group=4, dim=64, dtype=torch.float32, page_slots=384, seed=5)
    before = None
    # 2 to 5 splits after rounding (the merge's block of splits is one constexpr up to 64: one kernel for every
    # count); lengths, table strides and the lse strides each both divisible by 16 and not, and one split of a
    # single iteration
    for max_len, width, splits in [(300, 20, 3), (320, 20, 4), (257, 24, 3), (161, 11, 4), (208, 13, 4),
                                   (300, 20, 2), (320, 20, 5)]:
        lengths = pool.lengths_t.clamp(max=max_len)
        table = pool.table[:, :, :width].contiguous()  # a table of another width: other strides
        out = batch_decode(pool.q, pool.k_pool, pool.v_pool, table, lengths, max_len, PAGE, num_splits=splits)
        ref = batch_decode_reference(pool.q, pool.k_pool, pool.v_pool, table, lengths, PAGE)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        before = before or compiled()
        assert compiled() == before, (max_len, width, splits)
