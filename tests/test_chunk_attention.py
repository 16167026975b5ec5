"""LongHeads' chosen-chunk attention kernel (``kernels/chunk_attention.py``) against its plain-PyTorch reference, under
Triton's interpreter on the CPU, and the policy's prefill with the kernel against without it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton.jit decorates the kernels

from headwise.kernels.chunk_attention import chosen_chunk_attention, chosen_chunk_attention_ref

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def case(B: int, Hkv: int, G: int, Lb: int, n: int, C: int, D: int, chunks: int, dtype: torch.dtype, seed: int = 0):
    """Random queries per slot; keys and values ``[B, Hkv, chunks * C, D]`` as a strided view of a larger buffer (the
    store's); each query's table: distinct chunks, its own last; ``own`` offsets including 0 and C - 1."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hkv, G, Lb, n, D, generator=g).to(DEVICE, dtype)
    buf = torch.randn(B, Hkv, (chunks + 1) * C, D + 8, generator=g).to(DEVICE, dtype) * 2
    keys, values = buf[:, :, : chunks * C, :D], buf[:, :, C:, 8:]  # overlapping, strided, D contiguous
    table = torch.stack([torch.randperm(chunks, generator=g)[:n] for _ in range(B * Hkv * Lb)]).view(B, Hkv, Lb, n)
    own = torch.randint(0, C, (Lb,), generator=g)
    own[0], own[-1] = 0, C - 1
    return q, keys, values, table.to(DEVICE), own.to(DEVICE)


@pytest.mark.parametrize(("B", "Hkv", "G", "Lb", "n", "C", "D"), [(1, 1, 4, 5, 3, 16, 32), (2, 2, 3, 3, 4, 24, 40),
                                                                    (1, 3, 1, 2, 2, 8, 64)])
def test_the_kernel_matches_its_reference(B, Hkv, G, Lb, n, C, D):
    """Ragged shapes: G not a power of two, D 40 (a padded tile), chunks of 24 (a partial key tile), 8 (below the
    tile), one query's own chunk with only its first token visible, another with all of it."""
    q, keys, values, table, own = case(B, Hkv, G, Lb, n, C, D, chunks=7, dtype=torch.float32)
    want = chosen_chunk_attention_ref(q, keys, values, table, own, D ** -0.5, C)
    got = chosen_chunk_attention(q, keys, values, table, own, D ** -0.5, C, block_c=16)
    assert got.shape == (B, Hkv * G, Lb, D)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # fp32 products in full fp32 (not TF32) on a GPU


def test_one_chooser_per_query_head_reads_its_kv_heads_chunks():
    """``choose_per="query_head"``: the choosers are the query heads (``G = 1``), three per KV head, each with its own
    table; chooser ``j`` reads KV head ``j // 3``."""
    q, keys, values, table, own = case(2, 6, 1, 4, 3, 24, 40, chunks=7, dtype=torch.float32, seed=7)
    keys, values = keys[:, ::3], values[:, ::3]  # 2 KV heads under the 6 choosers' tables
    want = chosen_chunk_attention_ref(q, keys, values, table, own, 40 ** -0.5, 24)
    got = chosen_chunk_attention(q, keys, values, table, own, 40 ** -0.5, 24, block_c=16)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for j in (0, 4):  # against one chooser run alone over its own KV head
        alone = chosen_chunk_attention_ref(q[:, j : j + 1], keys[:, j // 3 : j // 3 + 1], values[:, j // 3 : j // 3 + 1],
                                           table[:, j : j + 1], own, 40 ** -0.5, 24)
        torch.testing.assert_close(got[:, j : j + 1], alone, atol=1e-4, rtol=1e-4)


def test_bf16_stays_within_flash_attentions_tolerance():
    q, keys, values, table, own = case(1, 2, 4, 4, 3, 32, 64, chunks=5, dtype=torch.bfloat16, seed=3)
    exact = chosen_chunk_attention_ref(q.float(), keys.float(), values.float(), table, own, 0.125, 32)
    ref = chosen_chunk_attention_ref(q, keys, values, table, own, 0.125, 32)
    got = chosen_chunk_attention(q, keys, values, table, own, 0.125, 32)
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-2


def test_a_store_ending_inside_its_newest_chunk_is_read_no_further_than_its_last_token():
    """The store holds the tokens it has (no more than a dense head): its newest chunk is partial. Queries whose own
    chunk is that one see the same as over whole chunks with anything in the missing tail; the kernel reads none of
    it (the buffer past the last token is NaN here)."""
    B, Hkv, G, Lb, n, C, D, chunks = 1, 2, 3, 4, 3, 16, 32, 6
    q, keys, values, table, own = case(B, Hkv, G, Lb, n, C, D, chunks=chunks, dtype=torch.float32, seed=11)
    T = chunks * C - 5  # the last chunk holds 11 of its 16 tokens
    table[..., -1] = chunks - 1
    table[..., :-1] = torch.stack([torch.randperm(chunks - 1)[: n - 1] for _ in range(B * Hkv * Lb)]).view(
        B, Hkv, Lb, n - 1).to(table.device)
    own = torch.tensor([0, 4, 9, 10], device=own.device)  # up to the last token held
    whole = chosen_chunk_attention_ref(q, keys, values, table, own, D ** -0.5, C)
    cut_k, cut_v = keys.clone(), values.clone()
    cut_k[:, :, T:], cut_v[:, :, T:] = float("nan"), float("nan")
    want = chosen_chunk_attention_ref(q, cut_k[:, :, :T], cut_v[:, :, :T], table, own, D ** -0.5, C)
    got = chosen_chunk_attention(q, cut_k[:, :, :T], cut_v[:, :, :T], table, own, D ** -0.5, C, block_c=16)
    torch.testing.assert_close(want, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_real_shapes_on_a_gpu():
    """Gemma 3's global heads as LongHeads runs them: 4 query heads per KV head, d 256, chunks of 256, 16 slots."""
    q, keys, values, table, own = case(1, 1, 4, 64, 16, 256, 256, chunks=40, dtype=torch.bfloat16, seed=5)
    exact = chosen_chunk_attention_ref(q.float(), keys.float(), values.float(), table, own, 0.0625, 256)
    ref = chosen_chunk_attention_ref(q, keys, values, table, own, 0.0625, 256)
    got = chosen_chunk_attention(q, keys, values, table, own, 0.0625, 256)
    assert (got.float() - exact).abs().max() <= 2 * (ref.float() - exact).abs().max() + 1e-2


@pytest.mark.parametrize(("score", "choose_per"), [("paper", "kv_head"), ("max", "query_head")])
def test_longheads_prefill_with_the_kernel_equals_without(score, choose_per):
    """The policy past its window, once gathering the chunks and once through the kernel (``use_kernels``)."""
    from dataclasses import replace

    from headwise.policies.base import AttendContext
    from headwise.policies.longheads import LongHeads

    torch.manual_seed(0)
    policy = LongHeads(chunk_size=8, top_k=2, chunk_score=score, choose_per=choose_per)
    B, Hq, Hkv, D, L = 1, 4, 2, 32, 70  # window (2 + 3) * 8 = 40: queries 40..69 choose chunks
    q, k, v = torch.randn(B, Hq, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    rope = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    ctx = AttendContext(start=0, scale=D ** -0.5, layer_idx=0, native_window=None, shared={}, step=None,
                        use_kernels=False, kv_heads=(0, 1), position=None, gate=None, rope=rope)
    outs = []
    for use in (False, True):
        store = policy.make_store(B, Hkv, D, torch.device("cpu"), torch.float32)
        outs.append(policy.attend(q, k, v, store, replace(ctx, use_kernels=use)))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-4, rtol=1e-4)
