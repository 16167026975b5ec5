"""``quantized`` on a native sliding-window layer: plan resolution gives the head the layer's window; the store drops
groups that left it and never holds more than the window's dense bytes; attention (reference and Triton decode) sees
exactly the window, as the model's sliding attention does."""

from __future__ import annotations

import itertools

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.plan import HeadPlan, resolve
from headwise.policies import AttendContext, Full, Quantized, Streaming, build_policy
from headwise.policies.base import masked_attention
from headwise.pool import PagePool
from headwise.spec import ModelSpec
from tiny import tiny_model

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the kernels: compiled on a GPU, else Triton's interpreter
GEMMA3 = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))

WINDOWED = {
    # name: (policy as written in a plan, native window, head_dim)
    "gemma3-int4": (Quantized(bits=4), 512, 256),
    "gemma3-int8": (Quantized(bits=8), 512, 256),
    "window-not-a-multiple-of-group": (Quantized(bits=4, group=8, residual=8), 45, 16),
    "window-below-residual-plus-group": (Quantized(bits=4, group=8, residual=32), 30, 64),  # residual shortened
    "int8-window-below-residual-plus-group": (Quantized(bits=8, group=8, residual=32), 36, 64),
    "odd-head-dim": (Quantized(bits=4, group=16, residual=16), 70, 40),
}


def _kv(n: int, dim: int, seed: int = 0, heads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outliers = 5 * torch.randn(dim, generator=g)  # fixed-channel key outliers, as KIVI observes
    return torch.randn(1, heads, n, dim, generator=g) + outliers, torch.randn(1, heads, n, dim, generator=g)


def _windowed(name: str) -> tuple[Quantized, int, int]:
    policy, window, dim = WINDOWED[name]
    held = policy.for_native_window(window, dim)
    assert isinstance(held, Quantized) and held.window == window
    return held, window, dim


def test_resolution_gives_quantized_heads_the_native_window_and_leaves_global_layers_alone():
    plan = HeadPlan.uniform(GEMMA3, {"policy": "quantized", "params": {"bits": 4}})
    for i, row in enumerate(resolve(plan.policies(), GEMMA3)):
        expect = 0 if GEMMA3.native_window(i) is None else 512
        assert isinstance(row[0], Quantized) and row[0].window == expect and row[0].residual == 128
    # A head whose plan asks for a shorter window keeps it; a longer one is cut to the model's.
    assert Quantized(bits=4, window=300).for_native_window(512, 256).window == 300
    assert Quantized(bits=4, window=900).for_native_window(512, 256).window == 512
    # A window the plan sets on a global layer is kept, with the same byte check (here: a shorter residual).
    tight = HeadPlan.uniform(GEMMA3, {"policy": "quantized", "params": {"bits": 8, "window": 160}})
    assert resolve(tight.policies(), GEMMA3)[5][0] == Quantized(bits=8, residual=75, window=160)


def test_a_window_too_short_for_codes_keeps_it_in_full_precision_and_a_tight_one_shortens_the_residual():
    assert Quantized().for_native_window(16, 16) == Streaming(sink=0, window=16)  # 16 < residual 128 + group 32
    tight = Quantized(bits=4, group=8, residual=8).for_native_window(16, 16)
    assert isinstance(tight, Quantized) and tight.window == 16 and tight.residual < 8


@pytest.mark.parametrize("params", [{"window": -1}, {"window": 100}, {"window": 1.5}])
def test_bad_windows_are_refused(params):
    with pytest.raises(PlanError, match="window"):
        build_policy({"policy": "quantized", "params": params})  # 100 < residual 128 + group 32


@pytest.mark.parametrize("name", list(WINDOWED))
def test_windowed_head_never_holds_more_than_the_window_dense_at_any_length(name):
    policy, window, dim = _windowed(name)
    slot = 2 * dim * 2
    for n in range(1, 4 * window + 3 * policy.group):
        assert policy.kv_tokens(n) == min(n, window)
        assert policy.kv_bytes(n, dim, 2) <= min(n, window) * slot, f"{n} tokens"
    # A store reserved for a long run holds its codes room all along: with the largest residual, still no more.
    store = policy.make_store(1, 2, dim, torch.device("cpu"), torch.bfloat16)
    total = 3 * window + 2 * policy.group
    store.reserve(total)
    k, v = _kv(total, dim)
    store.append(k[:, :, :7].bfloat16(), v[:, :, :7].bfloat16())
    for pos in range(7, total):
        store.append(k[:, :, pos : pos + 1].bfloat16(), v[:, :, pos : pos + 1].bfloat16())
        held = sum(t.numel() * t.element_size() for t in store.tensors())
        assert held <= 2 * window * slot, f"{pos + 1} tokens: more than the window's dense bytes"
    assert held == 2 * policy.kv_bytes(total, dim, 2)


def test_a_4bit_head_on_gemma3s_window_holds_about_half_of_it():
    policy = Quantized(bits=4).for_native_window(512, 256)
    # 384 tokens of codes (0.3125 of a bf16 slot each) + a residual of 128 to 159 tokens, over 512 slots.
    assert policy.kv_bytes(2048, 256) / (512 * 1024) == pytest.approx((384 * 0.3125 + 128) / 512)
    assert max(policy.kv_bytes(n, 256) for n in range(2048, 2080)) / (512 * 1024) == pytest.approx(
        (384 * 0.3125 + 159) / 512)


def _sliding_reference(q, keys, values, q_start, window, scale):
    """Exact sliding-window attention (``p - j < window``, ``j <= p``) of a chunk over keys at positions 0 ..."""
    q_pos = torch.arange(q_start, q_start + q.shape[2])[:, None]
    diff = q_pos - torch.arange(keys.shape[2])[None, :]
    return masked_attention(q, keys, values, (diff >= 0) & (diff < window), scale)


@pytest.mark.parametrize("name", [n for n in WINDOWED if not n.startswith("gemma3")])
def test_attend_is_the_sliding_window_over_the_same_codes_a_global_head_holds(name):
    """The windowed store quantizes the same groups as an unwindowed one (codes depend only on their group), so
    its attention must equal exact sliding-window attention over the unwindowed store's dequantized tokens; chunks
    straddle the window, lengths run below, at and above it."""
    policy, window, dim = _windowed(name)
    everything = Quantized(bits=policy.bits, group=policy.group, residual=policy.residual)
    n = 3 * window + 5
    k, v = _kv(n, dim, seed=1)
    q = torch.randn(1, 4, n, dim, generator=torch.Generator().manual_seed(2))
    cuts = sorted({0, window - 1, window, window + 1, 2 * window + 3, n - 4, n - 3, n - 2, n - 1, n, 17})
    ours = policy.make_store(1, 2, dim, torch.device("cpu"), torch.float32)
    ref = everything.make_store(1, 2, dim, torch.device("cpu"), torch.float32)
    scale = dim**-0.5
    for a, b in itertools.pairwise(cuts):
        past_k, past_v = ref.view()
        expect = _sliding_reference(q[:, :, a:b], torch.cat([past_k, k[:, :, a:b]], 2),
                                    torch.cat([past_v, v[:, :, a:b]], 2), a, window, scale)
        everything.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ref, AttendContext(start=a, scale=scale))
        out = policy.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], ours, AttendContext(start=a, scale=scale))
        torch.testing.assert_close(out, expect, msg=f"chunk {a}..{b}")
        assert ours.first == policy.dropped_length(b) and ours.length == b
        assert ours.length - ours.first < window + policy.group  # whole groups outside the window are gone


@pytest.mark.parametrize("name", [n for n in WINDOWED if not n.startswith("gemma3")])
def test_kernel_decode_is_the_window_over_what_the_store_holds_below_at_and_above_the_window(name):
    """Decode steps on the Triton kernel (on a GPU, else the interpreter): each equals exact attention over the
    store's dequantized tokens (after the step's token is written, as the kernel path writes first) masked to the
    window, in fp32 (the kernel's products then run in full fp32)."""
    policy, window, dim = _windowed(name)
    n = window + policy.group + 3  # the first group leaves the window at window + group tokens
    k, v = (t.to(DEVICE) for t in _kv(n, dim, seed=3))
    q = torch.randn(1, 4, n, dim, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    store = policy.make_store(1, 2, dim, torch.device(DEVICE), torch.float32)
    start = window - 4
    policy.attend(q[:, :, :start], k[:, :, :start], v[:, :, :start], store, AttendContext(start=0, scale=0.1))
    for pos in range(start, n):
        out = policy.attend(q[:, :, pos : pos + 1], k[:, :, pos : pos + 1], v[:, :, pos : pos + 1], store,
                            AttendContext(start=pos, scale=0.1, use_kernels=True))
        keys, values = store.view()
        visible = torch.arange(store.first, pos + 1, device=DEVICE) > pos - window
        expect = masked_attention(q[:, :, pos : pos + 1], keys, values, visible[None, :], 0.1)
        torch.testing.assert_close(out, expect, atol=1e-4, rtol=1e-4, msg=f"position {pos}")
    assert store.first > 0 and store.first % policy.group == 0  # groups were dropped on the way


def _tiny_gemma(window: int):
    return tiny_model("gemma3_text", sliding_window=window)


def test_engine_with_windowed_quantized_heads_matches_its_reference_and_the_full_plan():
    """A tiny Gemma 3 (layers: sliding, sliding, global, sliding; window 40; on the GPU when there is one, else the
    CPU with Triton's interpreter): quantized heads on the sliding layers,
    full on the global one. Kernel decode, and an engine over a page pool (the quantized stores beside it), give the
    reference path's tokens; 8-bit codes give the tokens of the plan with ``full`` there (the native window in full
    precision); the cache holds what the plan counts."""
    lm = _tiny_gemma(40)
    lm.model.to(DEVICE)
    assert [lm.spec.native_window(i) for i in range(4)] == [40, 40, None, 40]
    q8 = Quantized(bits=8, group=8, residual=8)
    mixed = HeadPlan.from_policies(lm.spec, [[q8, Quantized(bits=4, group=8, residual=8)], [q8, q8], [Full(), Full()],
                                             [q8, q8]])
    eight = HeadPlan.from_policies(lm.spec, [[q8, q8], [q8, q8], [Full(), Full()], [q8, q8]])
    dense = HeadPlan.dense(lm.spec)
    prompt = torch.randint(0, 128, (1, 100), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def tokens(plan: HeadPlan, kernels: bool) -> tuple[list[int], int, int]:
        events = list(Engine(lm, plan, chunk_size=16, use_kernels=kernels).generate(prompt[0], max_new_tokens=12,
                                                                                     stop_token_ids=[]))
        stats = events[-1].stats
        return [e.token_id for e in events if e.stats is None], stats.kv_bytes, stats.dense_kv_bytes

    ref, kv, dense_kv = tokens(mixed, False)
    assert tokens(mixed, True)[0] == ref
    pooled = Engine(lm, mixed, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4))
    assert [e.token_id for e in pooled.generate(prompt[0], max_new_tokens=12, stop_token_ids=[]) if e.stats is None] == ref
    # 111 tokens held (the last new token is not fed back); the fp32 model: codes against 4-byte dense slots.
    assert kv == mixed.kv_bytes(lm.spec, 111, 4) < dense_kv
    assert tokens(eight, False)[0] == tokens(dense, False)[0]
    # Next-token logits over the prompt (100 tokens, past the window): 8-bit codes stay close to the full-precision
    # window.
    base = Engine(lm, dense, chunk_size=16).logits(prompt)
    err = (Engine(lm, eight, chunk_size=16).logits(prompt) - base).abs().max().item()
    assert err < 0.02 * base.abs().max().item()
