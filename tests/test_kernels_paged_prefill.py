"""The causal prefill kernel over a paged pool (``kernels/paged_prefill.py``) against its plain-PyTorch reference and
against attention over each sequence's contiguous history, under Triton's interpreter on CPU.

Every pool starts as random garbage and each (sequence, KV head)'s pages are scattered over it in a shuffled order,
so a kernel that reads a slot it should not (past a row's keys, or in a partial last page) or indexes the wrong page
gets a wrong answer rather than a lucky zero. The tolerance is flash-attention's: at most twice the error of plain
PyTorch in the same dtype, plus 1e-4 (fp32) or 1e-3 (16-bit), as docs/kernels.md says.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.paged_prefill import (
    default_config,
    paged_prefill,
    paged_prefill_reference,
    plan_paged_prefill,
)
from pools import noise_pool

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PAGE = 16


class Chunks:
    """Sequences of ``starts[i] + lengths[i]`` tokens in a garbage-filled pool, each KV head's pages shuffled over it
    (written through ``PagePool.write``, the chunk's own tokens included, as the engine writes them before attending),
    and one chunk per sequence: its last ``lengths[i]`` tokens' queries, packed along one token axis ``q: [T, Hq, D]``.
    Rows are (sequence, KV head) pairs, as the engine launches them."""

    def __init__(self, starts: list[int], lengths: list[int], heads: int, group: int, dim: int, dtype: torch.dtype,
                 seed: int = 0, page: int = PAGE):
        g = torch.Generator().manual_seed(seed)
        self.starts, self.lengths, self.heads, self.group, self.dim = starts, lengths, heads, group, dim
        self.page = page
        width = max(-(-(s + n) // page) for s, n in zip(starts, lengths)) + 1  # one spare column: never read
        n_pages = len(starts) * heads * width + 5
        pool = noise_pool(heads, group, dim, dtype, n_pages, page, DEVICE, g, scale=3)
        self.k_pool, self.v_pool = pool.keys, pool.values
        order = torch.randperm(n_pages, generator=g)[: len(starts) * heads * width]
        self.table = order.view(len(starts) * heads, width).int().to(DEVICE)  # row = sequence * heads + head
        self.history = []
        for i, (s, n) in enumerate(zip(starts, lengths)):
            kv = torch.randn(2, heads, s + n, dim, generator=g).to(DEVICE, dtype)
            self.history.append(kv)
            slots = torch.arange(s + n, device=DEVICE)[None]
            pool.write(self.table[i * heads : (i + 1) * heads][None], slots, kv[0][None], kv[1][None])
        self.q = torch.randn(sum(lengths), heads * group, dim, generator=g).to(DEVICE, dtype)
        offsets = [sum(lengths[:i]) for i in range(len(lengths))]
        self.token0 = [offsets[i] for i in range(len(starts)) for _ in range(heads)]
        self.row_lengths = [n for n in lengths for _ in range(heads)]
        self.row_starts = [s for s in starts for _ in range(heads)]
        self.head0 = [h * group for _ in starts for h in range(heads)]

    def plan(self, block_m: int):
        return plan_paged_prefill(self.token0, self.row_lengths, self.row_starts, self.head0, self.group, DEVICE,
                                  block_m=block_m)

    def run(self, block_m: int = 16, block_n: int = 16, **kw) -> torch.Tensor:
        return paged_prefill(self.q, self.k_pool, self.v_pool, self.table, self.plan(block_m), self.page,
                             block_m=block_m, block_n=block_n, num_warps=4, num_stages=2, **kw)

    def reference(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.q.dtype
        return paged_prefill_reference(self.q.to(dtype), self.k_pool.to(dtype), self.v_pool.to(dtype), self.table,
                                       self.token0, self.row_lengths, self.row_starts, self.head0, self.group,
                                       self.page)

    def semantic(self) -> torch.Tensor:
        """fp32 causal attention of each chunk over its sequence's history (no pages)."""
        out = torch.zeros(self.q.shape, dtype=torch.float32, device=DEVICE)
        at = 0
        for kv, s, n in zip(self.history, self.starts, self.lengths):
            k = kv[0].float().repeat_interleave(self.group, 0)  # [Hq, s + n, D]
            v = kv[1].float().repeat_interleave(self.group, 0)
            q = self.q[at : at + n].float().transpose(0, 1)  # [Hq, n, D]
            scores = torch.einsum("hnd,hmd->hnm", q, k) * self.dim**-0.5
            visible = torch.arange(s + n, device=DEVICE)[None, :] <= torch.arange(s, s + n, device=DEVICE)[:, None]
            probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
            out[at : at + n] = torch.einsum("hnm,hmd->hnd", probs, v).transpose(0, 1)
            at += n
        return out


def _check(out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor) -> None:
    err = (out.float() - out_ref).abs().max().item()
    err_pt = (out_pt.float() - out_ref).abs().max().item()
    slack = 1e-4 if out.dtype == torch.float32 else 1e-3  # as docs/kernels.md's prefill tolerance
    assert err <= 2 * err_pt + slack, f"kernel error {err:.2e} vs PyTorch-same-dtype error {err_pt:.2e}"


# Starts on, just past, just before and across page edges; chunks of lengths that are not multiples of a block (of
# 16 / group tokens), a one-token chunk, and ends inside a page (a partial last page, the spare slots garbage).
STARTS = [0, 1, 15, 16, 17, 33]
LENGTHS = [7, 20, 2, 16, 1, 30]


@pytest.mark.parametrize(("group", "dim", "dtype"), [(1, 16, torch.float32), (3, 64, torch.float32),
                                                     (4, 16, torch.bfloat16), (4, 64, torch.float16)],
                         ids=["mha-d16-fp32", "gqa3-d64-fp32", "gqa4-d16-bf16", "gqa4-d64-fp16"])
def test_chunks_of_several_sequences_in_one_launch_attend_causally_through_their_pages(group, dim, dtype):
    chunks = Chunks(STARTS, LENGTHS, heads=2, group=group, dim=dim, dtype=dtype)
    out = chunks.run()
    want = chunks.semantic()
    torch.testing.assert_close(chunks.reference(torch.float32), want, rtol=0, atol=1e-5)  # the pages hold the history
    _check(out, chunks.reference(), want)


@pytest.mark.parametrize(("block_m", "block_n"), [(32, 16), (16, 32), (64, 64)],
                         ids=["two-token-blocks-of-16-keys", "keys-two-pages-a-block", "one-block-per-chunk"])
def test_tile_sizes_change_only_the_work_split_not_the_result(block_m, block_n):
    chunks = Chunks(STARTS, LENGTHS, heads=2, group=4, dim=16, dtype=torch.float32, seed=1)
    _check(chunks.run(block_m=block_m, block_n=block_n), chunks.reference(), chunks.semantic())


def test_a_head_dim_below_its_power_of_two_tile_masks_the_spare_channels():
    """head_dim 40 in tiles of 64 channels: the pool's rows are 40 wide, the channels past them never read."""
    chunks = Chunks([0, 17], [20, 9], heads=2, group=2, dim=40, dtype=torch.float32, seed=5)
    _check(chunks.run(), chunks.reference(), chunks.semantic())


def test_pages_smaller_than_a_key_block_are_read_from_the_table_inside_the_block():
    """Pages of 4 slots (the engine tests' pool) under key blocks of 16: four table entries per block."""
    chunks = Chunks([0, 5, 14], [9, 11, 3], heads=2, group=2, dim=16, dtype=torch.float32, seed=2, page=4)
    _check(chunks.run(), chunks.reference(), chunks.semantic())


def test_the_kernel_writes_only_the_rows_tokens_and_query_heads_of_a_strided_output():
    """As the engine launches it: q and out are ``[1, Hq, T, D]`` layer tensors seen as ``[T, Hq, D]``, and the rows
    cover some of the query heads (one group's KV heads); every other element of ``out`` is left as it was."""
    chunks = Chunks([3, 16], [5, 9], heads=2, group=2, dim=16, dtype=torch.float32, seed=3)
    layer_q = chunks.q.transpose(0, 1).contiguous()[None]  # [1, Hq, T, D]
    layer_out = torch.full_like(layer_q, 7.0)
    keep = [i for i, h in enumerate(chunks.head0) if h == 2]  # KV head 1 of each sequence only
    rows = [[getattr(chunks, a)[i] for i in keep] for a in ("token0", "row_lengths", "row_starts", "head0")]
    plan = plan_paged_prefill(*rows, chunks.group, DEVICE, block_m=16)
    paged_prefill(layer_q[0].transpose(0, 1), chunks.k_pool, chunks.v_pool, chunks.table[keep], plan, PAGE,
                  out=layer_out[0].transpose(0, 1), block_m=16, block_n=16)
    want = chunks.semantic().transpose(0, 1)  # [Hq, T, D]
    torch.testing.assert_close(layer_out[0, 2:], want[2:], rtol=0, atol=1e-4)
    assert layer_out[0, :2].eq(7.0).all(), "query heads of KV head 0 are not this launch's"


def test_work_items_cover_every_query_block_of_every_row_once_heaviest_first():
    plan = plan_paged_prefill([0, 0, 10], [10, 10, 3], [100, 100, 0], [0, 4, 0], group=4, device="cpu", block_m=16)
    assert plan.block_t == 4
    items = [tuple(w) for w in plan.work.tolist()]
    assert sorted(items) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)]
    keys = [[100, 100, 0][r] + min((b + 1) * 4, [10, 10, 3][r]) for r, b in items]
    assert keys == sorted(keys, reverse=True)
    assert plan.rows.tolist() == [[0, 10, 100, 0], [0, 10, 100, 4], [10, 3, 0, 0]] and plan.max_keys == 110


def test_a_launch_with_no_rows_returns_its_output_untouched():
    chunks = Chunks([0], [4], heads=1, group=2, dim=16, dtype=torch.float32)
    plan = plan_paged_prefill([], [], [], [], 2, DEVICE, block_m=16)
    out = torch.zeros_like(chunks.q)
    assert paged_prefill(chunks.q, chunks.k_pool, chunks.v_pool, chunks.table[:0], plan, PAGE, out=out,
                         block_m=16, block_n=16) is out


def test_the_benchmark_workload_computes_what_the_reference_does():
    """``bench/dense_chunk_attention.py --paged``'s paged chunk at Llama-3-8B head shapes, tiny lengths: the kernel
    and the gather path against the fp32 reference."""
    from headwise.bench.paged_prefill import check

    errors = check(chunk=9, keys=41, device=DEVICE, dtype=torch.float32, block_m=32, block_n=16)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
def test_long_prefixes_on_gpu_at_llama_head_shapes(dtype):
    """Compiled kernel (default tiles) at head_dim 128, GQA 4:1: chunks after 4000 and 1100 keys and a first chunk."""
    chunks = Chunks([4000, 1100, 0], [300, 77, 129], heads=2, group=4, dim=128, dtype=dtype, seed=4)
    plan = chunks.plan(default_config(128, dtype)["block_m"])
    out = paged_prefill(chunks.q, chunks.k_pool, chunks.v_pool, chunks.table, plan, PAGE)
    _check(out, chunks.reference(), chunks.semantic())
