"""The block-sparse prefill kernel equals its fp32 reference (Triton interpreter on CPU, real kernel on CUDA).

Tolerance as in flash-attention's tests: the kernel's max error against the fp32 reference may be at most
twice that of plain PyTorch computing the same masked attention in the same dtype, plus 1e-3 (bf16) / 1e-5
(fp32) for cases where PyTorch happens to be exact. The interpreter is slow: shapes are small and few.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined, so before (re)importing it

import headwise.kernels.block_sparse as bsmod  # noqa: E402
from headwise.kernels.prefill_index import (  # noqa: E402
    columns_to_mask,
    compact_rows,
    flex_block_mask,
    indices_to_mask,
    n_query_blocks,
    query_block_ids,
)

if not ON_GPU:
    bsmod = importlib.reload(bsmod)  # another test module may have imported it without the interpreter
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _interpreter_numpy2_compat(monkeypatch):
    """Triton 3.6's interpreter turns loop bounds loaded from memory into Python ints with ``int(array)``,
    which numpy >= 2.4 refuses for 1-element arrays; give it ``.item()`` semantics for these tests only."""
    if ON_GPU:
        yield
        return
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patched)
    yield


def random_index(B, H, q_len, k_len, q_offset, bs, seed, diag_only_rows=()):
    """A random valid index: every row keeps its own block, plus a per-head random number of earlier
    blocks (head h draws up to 2h); rows listed in ``diag_only_rows`` keep only the diagonal block."""
    g = torch.Generator().manual_seed(seed)
    rows = query_block_ids(q_len, q_offset, bs)
    n = rows.shape[0]
    extra = 2 * H
    cand = torch.randint(0, 1 << 30, (B, H, n, extra), generator=g) % (rows[:, None] + 1)
    keep = torch.rand(B, H, n, extra, generator=g) < (torch.arange(H)[None, :, None, None] / max(1, H - 1))
    for r in diag_only_rows:
        keep[:, :, r] = False
    cand = torch.cat([cand, rows[None, None, :, None].expand(B, H, n, 1)], dim=-1)
    keep = torch.cat([keep, torch.ones(B, H, n, 1, dtype=torch.bool)], dim=-1)
    return compact_rows(cand, keep)


def torch_same_dtype(q, k, v, idx, count, bs, q_offset, scale):
    """Plain PyTorch in q's dtype (SDPA with the dense mask): the error yardstick."""
    mask = indices_to_mask(idx, count, bs, q.shape[2], k.shape[2], q_offset)
    mask = bsmod.expand_index_heads(mask, q.shape[1], k.shape[1])
    g = q.shape[1] // k.shape[1]
    return torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), attn_mask=mask, scale=scale
    )


CASES = {
    # name: (B, Hq, Hkv, Lq, q_offset, D, block_size, config)
    "gqa_lq97_d64_tiles16": (1, 4, 2, 97, 0, 64, 32, {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}),
    "offset_lq130_d128": (2, 2, 1, 130, 45, 128, 32, {"block_m": 32, "block_n": 16, "num_warps": 4, "num_stages": 1}),
    "h100_tiles_128x64": (1, 2, 2, 130, 128, 64, 128, {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}),
}


def case_qkv(case, seed):
    """Random q, k, v of a ``CASES`` shape, in bf16 on a GPU (fp32 under the interpreter), and that dtype."""
    B, Hq, Hkv, Lq, off, D, _, _ = CASES[case]
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(B, Hkv, off + Lq, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v, dtype


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case):
    B, Hq, _, Lq, off, D, bs, cfg = CASES[case]
    q, k, v, dtype = case_qkv(case, seed=1)
    idx, count = random_index(B, Hq, Lq, off + Lq, off, bs, seed=2, diag_only_rows=(0,))
    idx, count = idx.to(DEVICE), count.to(DEVICE)
    assert len(set(count[0, :, -1].tolist())) > 1, "heads should differ in block counts"
    scale = D**-0.5
    out = bsmod.block_sparse_attention(q, k, v, idx, count, bs, off, scale, config=cfg)
    ref = bsmod.block_sparse_attention_ref(q.float(), k.float(), v.float(), idx, count, bs, off, scale)
    pt = torch_same_dtype(q, k, v, idx, count, bs, off, scale)
    err = (out.float() - ref).abs().max().item()
    err_pt = (pt.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + (1e-3 if dtype == torch.bfloat16 else 1e-5), (err, err_pt)


def random_columns(index, q_len, k_len, q_offset, bs, n, seed):
    """Token columns for ``index``'s rows: up to ``n`` random earlier keys per row, none in a block the row lists (a
    key would count twice); head h keeps about h / (H - 1) of them, so counts differ (head 0 has none)."""
    idx, _ = index
    B, H, nq, _ = idx.shape
    g = torch.Generator().manual_seed(seed)
    rows = query_block_ids(q_len, q_offset, bs)
    cand = torch.randint(0, k_len, (B, H, nq, n), generator=g)
    listed = (idx[..., None, :].long() == (cand // bs)[..., :, None]).any(-1)
    keep = ((cand // bs) < rows[None, None, :, None]) & ~listed
    keep &= torch.rand(B, H, nq, n, generator=g) <= (torch.arange(H)[None, :, None, None] / max(1, H - 1))
    return compact_rows(cand, keep)


@pytest.mark.parametrize("case", ["gqa_lq97_d64_tiles16", "offset_lq130_d128"])
def test_token_columns_match_the_reference(case):
    """Token columns beside the blocks (``col_idx`` / ``col_count``): the kernel gathers them and equals the fp32
    reference, within the yardstick of PyTorch on the same mask; heads with no column, and rows with only one."""
    B, Hq, Hkv, Lq, off, D, bs, cfg = CASES[case]
    q, k, v, dtype = case_qkv(case, seed=5)
    index = random_index(B, Hq, Lq, off + Lq, off, bs, seed=6)
    cidx, ccount = random_columns(index, Lq, off + Lq, off, bs, n=120, seed=7)
    assert int(ccount[:, 0].sum()) == 0 and int(ccount.max()) > cfg["block_n"], "no columns, and more than a tile"
    idx, count = (t.to(DEVICE) for t in index)
    cidx, ccount = cidx.to(DEVICE), ccount.to(DEVICE)
    scale = D**-0.5
    out = bsmod.block_sparse_attention(q, k, v, idx, count, bs, off, scale, config=cfg, col_idx=cidx, col_count=ccount)
    ref = bsmod.block_sparse_attention_ref(q.float(), k.float(), v.float(), idx, count, bs, off, scale, cidx, ccount)
    without = bsmod.block_sparse_attention_ref(q.float(), k.float(), v.float(), idx, count, bs, off, scale)
    mask = indices_to_mask(idx, count, bs, Lq, off + Lq, off) | columns_to_mask(cidx, ccount, bs, Lq, off + Lq, off)
    mask = bsmod.expand_index_heads(mask, Hq, Hkv)
    grp = Hq // Hkv
    pt = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(grp, 1), v.repeat_interleave(grp, 1),
                                                          attn_mask=mask, scale=scale)
    err = (out.float() - ref).abs().max().item()
    err_pt = (pt.float() - ref).abs().max().item()
    assert err <= 2 * err_pt + (1e-3 if dtype == torch.bfloat16 else 1e-5), (err, err_pt)
    assert (ref - without).abs().max().item() > 1e-2, "the columns change the output"


def test_columns_to_mask_marks_listed_earlier_keys_only():
    """A row's columns are keys of its query block's list, causal per query; -1 padding and counts respected."""
    bs, q_len, k_len, off = 4, 6, 14, 8  # queries 8..13: blocks 2 and 3
    cidx = torch.tensor([[[[1, 6, -1], [5, 12, 13]]]], dtype=torch.int32)
    ccount = torch.tensor([[[2, 2]]], dtype=torch.int32)  # row 1 lists 5 and 12 (13 is past its count)
    mask = columns_to_mask(cidx, ccount, bs, q_len, k_len, off)[0, 0]
    assert mask.shape == (q_len, k_len)
    assert mask[:4].nonzero()[:, 1].unique().tolist() == [1, 6]  # block 2's queries
    assert mask[4].nonzero().flatten().tolist() == [5, 12] and mask[5].nonzero().flatten().tolist() == [5, 12]
    assert not mask[:, 13].any()


def test_shared_index_broadcasts_over_batch_and_heads():
    """An index of shape [1, 1, ...] (A-shape) means the same as that index repeated for every head."""
    B, Hq, Hkv, Lq, D, bs = 2, 4, 2, 64, 32, 16
    cfg = {"block_m": 16, "block_n": 16, "num_warps": 4, "num_stages": 1}
    q, k, v = (torch.randn(B, h, Lq, D, device=DEVICE) for h in (Hq, Hkv, Hkv))
    idx, count = random_index(1, 1, Lq, Lq, 0, bs, seed=3)
    idx, count = idx.to(DEVICE), count.to(DEVICE)
    shared = bsmod.block_sparse_attention(q, k, v, idx, count, bs, config=cfg)
    full = bsmod.block_sparse_attention(
        q, k, v, idx.expand(B, Hq, -1, -1).contiguous(), count.expand(B, Hq, -1).contiguous(), bs, config=cfg
    )
    assert torch.equal(shared, full)


def test_reference_with_every_block_is_causal_attention():
    B, H, L, D, bs = 1, 2, 70, 16, 16
    q, k, v = (torch.randn(B, H, L, D) for _ in range(3))
    rows = query_block_ids(L, 0, bs)
    idx = torch.arange(rows.shape[0], dtype=torch.int32).expand(rows.shape[0], -1)
    idx = torch.where(idx <= rows[:, None], idx, -1)[None, None].to(torch.int32)
    count = (rows + 1).to(torch.int32)[None, None]
    out = bsmod.block_sparse_attention_ref(q, k, v, idx, count, bs)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert (out - ref).abs().max().item() < 1e-5


def test_index_rows_follow_absolute_blocks():
    # 40 queries from position 50 (50..89) with blocks of 16 touch blocks 3, 4 and 5.
    assert n_query_blocks(40, 50, 16) == 3
    assert query_block_ids(40, 50, 16).tolist() == [3, 4, 5]


def test_compact_rows_sorts_dedups_and_pads():
    cand = torch.tensor([[5, 1, 5, 3], [2, 2, 9, 0]])
    valid = torch.tensor([[True, True, True, True], [True, True, False, False]])
    idx, count = compact_rows(cand, valid)
    assert idx.tolist() == [[1, 3, 5, -1], [2, -1, -1, -1]]  # as wide as the candidates: no host sync
    assert count.tolist() == [3, 1]
    assert idx.dtype == torch.int32


def test_flex_block_mask_marks_only_diagonal_blocks_partial():
    idx, count = random_index(1, 2, 64, 64, 0, 16, seed=4)
    bm = flex_block_mask(idx, count, 16, 64, 64, q_heads=2, kv_heads=1, batch=1)
    # Partial (masked) blocks are exactly the diagonal ones; the rest of each row is full.
    assert bm.kv_num_blocks.tolist() == [[[1, 1, 1, 1]] * 2]
    assert torch.equal(bm.full_kv_num_blocks, count - 1)
    assert bm.kv_indices[0, 0, :, 0].tolist() == [0, 1, 2, 3]


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_block_mask_means_the_same_as_the_reference():
    """FlexAttention (eager, CPU) on the BlockMask built from an index computes the reference's attention
    (eager Flex applies only mask_mod, hence the exact one)."""
    from torch.nn.attention.flex_attention import flex_attention

    B, Hq, Hkv, L, D, bs = 1, 4, 2, 64, 16, 16
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(B, h, L, D, generator=g) for h in (Hq, Hkv, Hkv))
    idx, count = random_index(B, Hq, L, L, 0, bs, seed=6)
    bm = flex_block_mask(idx, count, bs, L, L, q_heads=Hq, kv_heads=Hkv, batch=B, exact_mask_mod=True)
    out = flex_attention(q, k, v, block_mask=bm, enable_gqa=True)
    ref = bsmod.block_sparse_attention_ref(q, k, v, idx, count, bs)
    assert (out - ref).abs().max().item() < 1e-5
