"""The Triton estimate of ``vertical_slash`` (``kernels/vs_estimate.py``) against its plain-PyTorch reference
(``last_query_attention`` + ``vertical_slash_scores``), under Triton's interpreter on awkward shapes, and on the GPU
at a real one."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from headwise.kernels.prefill_index import columns_to_mask, indices_to_mask
from headwise.kernels.vs_estimate import vertical_slash_index, vertical_slash_sums, vertical_slash_top
from headwise.policies.vertical_slash import (
    VerticalSlash,
    last_query_attention,
    last_query_scores,
    vertical_slash_blocks,
    vertical_slash_scores,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INDEX_CASES = [
    (1, 1, 1, 1, 0, 5, 16, 5),  # one row, fewer keys than a block
    (2, 3, 5, 3, 100, 70, 16, 170),  # rows from block 6 to 10; no power of two anywhere
    (1, 2, 64, 64, 65536 - 512, 512, 64, 65536),  # real sizes: rows past the first tiles of 128 blocks
    (1, 1, 7, 9, 37, 1, 8, 38),  # one query, q_offset inside a block
]
"""(B, H, columns, offsets, q_offset, q_len, block size, keys) of the index tests."""


def reference(q, keys, q_offset, scale, last_q):
    L = q.shape[2]
    R = min(last_q, L)
    return vertical_slash_scores(last_query_attention(q, keys, q_offset, scale, last_q), q_offset + L - R)


@pytest.mark.parametrize(
    "B,Hq,Hkv,L,offset,last_q,D",
    [
        (1, 1, 1, 1, 0, 64, 16),  # one row, one key
        (2, 4, 2, 7, 30, 64, 16),  # rows fewer than last_q, no power of two; keys fewer than a block
        (1, 3, 1, 40, 100, 17, 32),  # 17 rows of 40; 140 keys: a partial last block, splits of one block
        (1, 2, 2, 5, 0, 8, 8),  # rows at the very start: the first row sees one key
        (2, 2, 1, 130, 0, 128, 16),  # the most rows the kernel takes
    ],
)
def test_the_triton_estimate_equals_the_reference(B, Hq, Hkv, L, offset, last_q, D):
    g = torch.Generator().manual_seed(L + offset)
    q = torch.randn(B, Hq, L, D, generator=g)
    keys = torch.randn(B, Hkv, offset + L, D, generator=g)
    keys[:, :, 3 % (offset + L)] += 2 * q[:, :: Hq // Hkv, -1]  # a strong column
    want_v, want_s = reference(q, keys, offset, D**-0.5, last_q)
    R = min(last_q, L)
    scores = last_query_scores(q.to(DEVICE), keys.to(DEVICE), D**-0.5, last_q)
    for splits, sums_n in ((None, None), (3, 16)):
        vertical, slash = vertical_slash_sums(scores, offset + L - R, splits=splits, block_n=16, sums_block_n=sums_n)
        assert torch.allclose(vertical.cpu(), want_v, atol=1e-5, rtol=1e-4)
        assert torch.allclose(slash.cpu(), want_s, atol=1e-5, rtol=1e-4)
        # Each row's probabilities sum to one: the masses sum to the rows.
        assert torch.allclose(vertical.sum(-1).cpu(), torch.full((B, Hq), float(R)), atol=1e-4)


def test_the_policy_knows_how_many_rows_the_kernel_takes():
    """``VS_MAX_ROWS`` repeats ``MAX_ROWS`` so that the policy need not import Triton to decide: they must agree."""
    from headwise.kernels.vs_estimate import MAX_ROWS
    from headwise.policies.vertical_slash import VS_MAX_ROWS

    assert VS_MAX_ROWS == MAX_ROWS


def test_scores_after_a_rows_position_are_ignored_whatever_they_hold():
    """The kernel masks by position: garbage (even inf) after the causal limit changes nothing."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(1, 2, 6, 20, generator=g)
    clean_v, clean_s = vertical_slash_sums(scores.to(DEVICE), 14, block_n=16)
    dirty = scores.clone()
    for r in range(6):
        dirty[:, :, r, 14 + r + 1 :] = float("inf")
    v, s = vertical_slash_sums(dirty.to(DEVICE), 14, block_n=16)
    assert torch.equal(v.cpu(), clean_v.cpu()) and torch.equal(s.cpu(), clean_s.cpu())


@pytest.mark.parametrize("bad", [dict(first=-1), dict(first=15)])
def test_rows_past_the_keys_are_refused(bad):
    with pytest.raises(ValueError, match="keys"):
        vertical_slash_sums(torch.zeros(1, 1, 6, 20, device=DEVICE), bad["first"])


def test_the_policy_builds_the_same_index_with_the_kernel():
    """A planted column and diagonal (as tests/test_policies_prefill.py): the index from the Triton estimate equals
    the reference's."""
    S, bs, o, col = 96, 16, 37, 5
    shared = S + o
    eye = torch.eye(S + o + 1)
    q = 8.0 * eye[torch.arange(S)] + eye[shared]
    keys = eye[torch.arange(S) + o].clone()
    keys[col] += 9.0 * eye[shared]
    p = VerticalSlash(vertical_size=1, slash_size=1, last_q=16, block_size=bs)
    want = p.build_index(q[None, None], keys[None, None], q_offset=0, scale=1.0)
    got = p.build_index(q[None, None].to(DEVICE), keys[None, None].to(DEVICE), q_offset=0, scale=1.0, kernel=True)
    want_mask = indices_to_mask(*want, bs, S, S, 0)
    assert torch.equal(indices_to_mask(got[0].cpu(), got[1].cpu(), bs, S, S, 0), want_mask)


def test_the_kernel_path_takes_unsorted_top_columns_and_builds_the_same_index():
    """With the kernel the policy asks ``topk`` for its columns and offsets unsorted (the index is order-agnostic):
    on random scores with many columns and offsets the index equals the reference's, which sorts."""
    g = torch.Generator().manual_seed(11)
    q, keys = torch.randn(1, 4, 80, 16, generator=g), torch.randn(1, 2, 200, 16, generator=g)
    p = VerticalSlash(vertical_size=23, slash_size=17, last_q=16, block_size=16)
    want = p.build_index(q, keys, q_offset=120, scale=0.25)
    got = p.build_index(q.to(DEVICE), keys.to(DEVICE), q_offset=120, scale=0.25, kernel=True)
    assert torch.equal(indices_to_mask(got[0].cpu(), got[1].cpu(), 16, 80, 200, 120),
                       indices_to_mask(*want, 16, 80, 200, 120))


@pytest.mark.parametrize("B,H,nv,ns,q_offset,q_len,bs,S", INDEX_CASES)
def test_the_triton_index_equals_candidates_and_compact_rows(B, H, nv, ns, q_offset, q_len, bs, S):
    """Duplicates (a column in the first block, offsets in one block, columns of one block), offsets past the
    rows (blocks before 0) and columns past a row (blocks after it): the same rows, in order, -1 padded."""
    g = torch.Generator().manual_seed(S + nv)
    cols = torch.randint(0, S, (B, H, nv), generator=g)
    offs = torch.randint(0, S, (B, H, ns), generator=g)
    cols[..., 0] = 0
    if nv > 2:
        cols[..., 1] = cols[..., 2]
    if ns > 1:
        offs[..., 1] = offs[..., 0] + 1
    want_idx, want_count = vertical_slash_blocks(cols, offs, q_offset, q_len, bs)
    got_idx, got_count = vertical_slash_index(cols.to(DEVICE), offs.to(DEVICE), q_offset // bs,
                                              want_idx.shape[2], bs)
    assert torch.equal(got_count.cpu(), want_count)
    assert torch.equal(got_idx.cpu(), want_idx)


@pytest.mark.gpu
def test_the_estimate_at_a_real_shape_on_the_gpu():
    """Llama-3-8B's two full KV heads after a 64K prefix, bf16: the kernel's masses match the reference's, eight
    planted columns are among the 64 chosen for every head, and every other column or diagonal chosen is a near-tie
    of the reference's choice."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    g = torch.Generator(device="cuda").manual_seed(0)
    S, L = 65536 + 2048, 2048
    q = torch.randn(1, 8, L, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    keys = torch.randn(1, 2, S, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    # Columns every one of the last 64 queries attends to: a shared direction u in those queries and in these keys
    # adds |u|^2 * scale = 5.7 to their logits (x300 in mass), far above what random keys reach.
    u = torch.randn(128, device="cuda", generator=g)
    u = (8 * u / u.norm()).to(torch.bfloat16)
    planted = torch.randperm(S - L, device="cuda", generator=g)[:8]
    q[:, :, -64:] += u
    keys[:, :, planted] = u
    want_v, want_s = reference(q, keys, S - L, 128**-0.5, 64)
    v, s = vertical_slash_sums(last_query_scores(q, keys, 128**-0.5, 64), S - 64)
    assert torch.allclose(v, want_v, atol=1e-6, rtol=5e-2) and torch.allclose(s, want_s, atol=1e-6, rtol=5e-2)
    assert (v.topk(64, dim=-1).indices[..., None] == planted).any(-2).all()  # in every head's 64
    # Elsewhere random keys make masses nearly equal, so bf16 rounding may swap near-ties at the cut: what the
    # kernel's masses choose must hold, by the reference's, at least 0.95 of the reference's 64th largest.
    # (Comparing sorted index lists position by position fails on a single swap.)
    for got, want in ((v, want_v), (s, want_s)):
        kth = want.topk(64, dim=-1).values[..., -1:]
        assert (want.gather(-1, got.topk(64, dim=-1).indices) >= 0.95 * kth).all()
    # The compiled index kernel at this shape: exactly the reference's rows.
    cols, offs = v.topk(64, dim=-1).indices, s.topk(64, dim=-1).indices
    want = vertical_slash_blocks(cols, offs, S - L, L, 64)
    got = vertical_slash_index(cols, offs, (S - L) // 64, want[0].shape[2], 64)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@pytest.mark.gpu
def test_a_new_prefix_length_compiles_no_new_estimate_kernel():
    """Each prompt chunk of a serving step estimates over its own prefix: the key count, the split count and size and
    the statistics' strides change with it, and each new value (divisible by 16 or not, equal to 1 or not) must reuse
    the compiled kernels (run 20's slow prompt steps each loaded one). Results still match the reference."""
    if not torch.cuda.is_available():
        pytest.skip("Triton specializes kernels only when it compiles them")
    from headwise.kernels.vs_estimate import _lse_kernel, _row_stats_kernel, _sums_kernel

    def compiled() -> tuple[int, ...]:
        return tuple(sum(len(c[0]) for c in k.device_caches.values()) for k in (_row_stats_kernel, _lse_kernel,
                                                                                  _sums_kernel))

    g = torch.Generator(device="cuda").manual_seed(3)
    before = None
    # prefixes of whole 64-key blocks (the row stride divisible by 16, as whole chunks keep it): 2 to 64 splits (the
    # log-sum-exp kernel's block of splits is one constexpr for every count up to 64: serving run 21 loaded one per
    # power of two mid-run), each of 1 to 32 iterations
    for keys, splits in [(17408, 17), (2048, 32), (32768, 32), (6400, 20), (26112, 24), (4096, 2), (8192, 5),
                         (32768, 64), (16384, 9)]:
        q = torch.randn(1, 4, 64, 64, device="cuda", generator=g)
        k = torch.randn(1, 4, keys, 64, device="cuda", generator=g)
        first = keys - 8
        v, s = vertical_slash_sums(last_query_scores(q, k, 64**-0.5, 8), first, splits=splits)
        want_v, want_s = reference(q, k, keys - 64, 64**-0.5, 8)
        assert torch.allclose(v, want_v, atol=1e-6, rtol=1e-3) and torch.allclose(s, want_s, atol=1e-6, rtol=1e-3)
        before = before or compiled()
        assert compiled() == before, (keys, splits)


@pytest.mark.parametrize("nv,ns", [(6, 6), (5, 9)])
def test_one_topk_over_both_sums_chooses_what_two_choose(nv, ns):
    """``vertical_slash_top`` (one ``topk`` over both sums when the sizes match, two otherwise) chooses the same
    columns and offsets as ``topk`` of each of ``vertical_slash_sums``' outputs, as sets."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(2, 3, 16, 150, generator=g).to(DEVICE)
    vertical, slash = vertical_slash_sums(scores, 134)
    cols, offs = vertical_slash_top(scores, 134, nv, ns)
    assert cols.shape == (2, 3, nv) and offs.shape == (2, 3, ns)
    assert torch.equal(cols.sort(-1).values, vertical.topk(nv, -1).indices.sort(-1).values)
    assert torch.equal(offs.sort(-1).values, slash.topk(ns, -1).indices.sort(-1).values)


@pytest.mark.parametrize("B,H,nv,ns,q_offset,q_len,bs,S", INDEX_CASES)
def test_the_triton_index_with_token_columns_equals_the_reference(B, H, nv, ns, q_offset, q_len, bs, S):
    """Token columns (``columns="tokens"``): the blocks leave the columns out, and each row lists the columns before
    its block that no listed block holds, sorted, once each (duplicates, a column in block 0, columns inside a
    diagonal's block and after the row among them), as ``vertical_slash_blocks`` does."""
    g = torch.Generator().manual_seed(S + nv + 1)
    cols = torch.randint(0, S, (B, H, nv), generator=g)
    offs = torch.randint(0, S, (B, H, ns), generator=g)
    cols[..., 0] = 0
    if nv > 2:
        cols[..., 1] = cols[..., 2]
    if nv > 4:  # a column in the block a diagonal lists for the last row
        last = (q_offset + q_len - 1) // bs
        cols[..., 3] = (last - offs[..., 0] // bs).clamp(min=0) * bs
    want = vertical_slash_blocks(cols, offs, q_offset, q_len, bs, token_columns=True)
    got = vertical_slash_index(cols.to(DEVICE), offs.to(DEVICE), q_offset // bs, want[0].shape[2], bs,
                               token_columns=True)
    assert len(got) == len(want) == 4
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.cpu(), b)
    # the blocks and the columns together cover what the block columns do, and the columns are their own keys
    blocks = vertical_slash_blocks(cols, offs, q_offset, q_len, bs)
    whole = indices_to_mask(*blocks, bs, q_len, S, q_offset)
    toks = indices_to_mask(*want[:2], bs, q_len, S, q_offset) | columns_to_mask(*want[2:], bs, q_len, S, q_offset)
    assert bool((whole | ~toks).all()), "token columns attend a subset of the block columns' keys"
    pos = torch.arange(q_offset, q_offset + q_len)
    for b in range(B):
        for h in range(H):
            for c in cols[b, h].tolist():
                assert bool(toks[b, h, pos >= c, c].all()), f"column {c} is attended by every query at or after it"


def test_token_columns_attend_fewer_keys_and_keep_the_digest_of_block_plans():
    """The policy with ``columns="tokens"``: its mask is inside the block columns' one, attends fewer keys when
    columns are scattered, and a plan without token columns writes the parameters it wrote before (its digest)."""
    g = torch.Generator().manual_seed(3)
    q, keys = torch.randn(1, 2, 96, 16, generator=g), torch.randn(1, 2, 400, 16, generator=g)
    blocks = VerticalSlash(vertical_size=12, slash_size=4, last_q=16, block_size=16)
    tokens = VerticalSlash(vertical_size=12, slash_size=4, last_q=16, block_size=16, columns="tokens")
    a, b = blocks.mask(q, keys, 304, 0.25), tokens.mask(q, keys, 304, 0.25)
    assert bool((a | ~b).all()) and int(b.sum()) < int(a.sum())
    assert "columns" not in blocks.to_spec().get("params", {}) and tokens.to_spec()["params"]["columns"] == "tokens"
    assert tokens.short() == "VS12/4t"
    with pytest.raises(Exception, match="columns"):
        VerticalSlash(columns="rows").validate()
    got = tokens.build_index(q.to(DEVICE), keys.to(DEVICE), q_offset=304, scale=0.25, kernel=True)
    want = tokens.build_index(q, keys, q_offset=304, scale=0.25)
    assert len(got) == 4
    assert torch.equal(indices_to_mask(*got[:2], 16, 96, 400, 304).cpu() | columns_to_mask(
        *got[2:], 16, 96, 400, 304).cpu(), b) and len(want) == 4
