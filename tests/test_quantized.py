"""The ``quantized`` policy (KIVI): error bounds of its codes, the bytes its store really holds, attention over what
it holds, generation through the engine, and the solver keeping top-ranked heads whole with it."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.kernels.kv_quant import dequantize_keys, dequantize_values, quantize_keys, quantize_values
from headwise.plan import HeadPlan, resolve
from headwise.policies import AttendContext, Full, Quantized, Streaming, build_policy
from headwise.policies.base import causal_attention
from headwise.profile.solver import solve
from headwise.spec import ModelSpec
from tiny import tiny_model

GEMMA3 = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))


def _kv(n: int, dim: int, seed: int = 0, heads: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    outliers = 5 * torch.randn(dim, generator=g)  # fixed-channel key outliers, as KIVI observes
    return torch.randn(1, heads, n, dim, generator=g) + outliers, torch.randn(1, heads, n, dim, generator=g)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_dequantized_keys_and_values_err_by_at_most_half_a_scale(bits):
    k, v = _kv(96, 40)  # 40 channels: value groups of 16, 16 and a partial 8
    kc, ks, kz = quantize_keys(k, bits, 16)
    vc, vs, vz = quantize_values(v, bits, 16)
    assert kc.dtype == torch.uint8 and kc.shape[-1] == 40 * bits // 8 and ks.dtype == torch.float16
    k_err = (dequantize_keys(kc, ks, kz, bits, 16, 40) - k).abs()
    v_err = (dequantize_values(vc, vs, vz, bits, 16, 40) - v).abs()
    k_half = ks.float().repeat_interleave(16, dim=2) / 2
    v_half = vs.float().repeat_interleave(16, dim=3)[..., :40] / 2
    assert bool((k_err <= k_half * (1 + 1e-4) + 1e-6).all()) and bool((v_err <= v_half * (1 + 1e-4) + 1e-6).all())
    # Half a scale is (range / (2^bits - 1)) / 2: relative to each group's range, 0.2% at 8 bits, 3.4% at 4.
    rng = k.reshape(1, 2, 6, 16, 40).amax(3) - k.reshape(1, 2, 6, 16, 40).amin(3)
    assert float((k_err.reshape(1, 2, 6, 16, 40).amax(3) / rng).max()) <= 0.5 / (2**bits - 1) * 1.01


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dim", [5, 8, 37, 64])
def test_packing_keeps_every_code_and_is_the_documented_layout(bits, dim):
    """``8 / bits`` codes per byte, channel ``m * j + i`` in bits ``i * bits ..`` of byte ``j``; any head dimension."""
    from headwise.kernels.kv_quant import pack, packed_dim, unpack

    codes = torch.randint(0, 2**bits, (2, 3, dim), dtype=torch.uint8, generator=torch.Generator().manual_seed(dim))
    packed = pack(codes, bits)
    assert packed.shape[-1] == packed_dim(dim, bits) and torch.equal(unpack(packed, bits, dim), codes)
    if bits == 2 and dim >= 8:
        c = codes[0, 0, 4:8].int()
        assert int(packed[0, 0, 1]) == int(c[0] | c[1] << 2 | c[2] << 4 | c[3] << 6)


def test_a_constant_group_is_exact():
    k = torch.full((1, 1, 32, 8), 3.25)
    codes, scale, zero = quantize_keys(k, 4, 32)
    assert torch.equal(dequantize_keys(codes, scale, zero, 4, 32, 8), k)


def _two_pass_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The parameters as the module's docstring defines them, written out: zero = lo rounded down to fp16, scale =
    (hi - zero) / (2^bits - 1) rounded up (times 1 + 2^-10), 1 for a constant group."""
    zero = lo.half()
    down = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    scale = ((hi - down.float()) / (2**bits - 1) * (1 + 2**-10)).half()
    return torch.where(scale > 0, scale, torch.ones_like(scale)), down


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [32, 40, 64])
def test_one_pass_min_max_gives_the_two_pass_codes_bit_for_bit(bits, dim):
    """``quantize_keys`` / ``quantize_values`` take each group's min and max in one pass (``aminmax``) and, for
    values, pad a partial channel group only when there is one: the same codes, scales and zero points as separate
    padded ``amin`` / ``amax`` passes, on outlier channels, a constant group and values at fp16's edges."""
    k, v = _kv(64, dim, seed=dim + bits)
    k[:, :, :16] = 2.5  # a constant key group (group 16)
    v[:, 0, 3] = torch.tensor([65504.0, -65504.0] * (dim // 2))  # fp16's largest magnitudes
    B, H, n, D = k.shape
    x = k.float().reshape(B, H, n // 16, 16, D)
    ks, kz = _two_pass_params(x.amin(dim=3), x.amax(dim=3), bits)
    ng = -(-D // 16)

    def padded(fill: float) -> torch.Tensor:
        return torch.nn.functional.pad(v.float(), (0, ng * 16 - D), value=fill).reshape(B, H, n, ng, 16)

    vs, vz = _two_pass_params(padded(float("inf")).amin(4), padded(-float("inf")).amax(4), bits)
    kc, ks1, kz1 = quantize_keys(k, bits, 16)
    vc, vs1, vz1 = quantize_values(v, bits, 16)
    assert torch.equal(ks1, ks) and torch.equal(kz1, kz) and torch.equal(vs1, vs) and torch.equal(vz1, vz)
    want_k = torch.round((x - kz.float()[:, :, :, None]) / ks.float()[:, :, :, None]).clamp(0, 2**bits - 1)
    assert torch.equal(dequantize_keys(kc, ks1, kz1, bits, 16, D),
                       (want_k * ks.float()[:, :, :, None] + kz.float()[:, :, :, None]).reshape(B, H, n, D))
    assert dequantize_values(vc, vs1, vz1, bits, 16, D).isfinite().all()


def test_quantizing_makes_no_tensor_from_host_values(monkeypatch):
    """``torch.tensor`` on a GPU copies from pageable host memory, which waits for the stream: the quantization run
    whenever a group leaves a head's residual (every prompt chunk, every ``group`` decode steps) must not call it."""
    calls = []
    real = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    k, v = _kv(64, 40)
    quantize_keys(k, 4, 16)
    quantize_values(v, 4, 16)
    assert calls == []


@pytest.mark.parametrize("params", [{"bits": 3}, {"group": 4}, {"residual": 0}, {"bits": 8.0}])
def test_bad_parameters_are_refused(params):
    with pytest.raises(PlanError, match="quantized"):
        build_policy({"policy": "quantized", "params": params})


def _fill(policy: Quantized, n: int, dim: int, dtype: torch.dtype, chunks: tuple[int, ...] = (100, 1, 37)):
    """A store reserved for ``n`` tokens, filled in chunks of the given sizes (then one token at a time)."""
    store = policy.make_store(1, 2, dim, torch.device("cpu"), dtype)
    store.reserve(n)
    k, v = _kv(n, dim)
    pos = 0
    for size in (*chunks, *([1] * n)):
        size = min(size, n - pos)
        if size <= 0:
            break
        store.append(k[:, :, pos : pos + size].to(dtype), v[:, :, pos : pos + size].to(dtype))
        pos += size
    return store, k, v


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_store_holds_what_kv_bytes_says_about_a_half_or_a_quarter_of_dense(bits):
    policy = Quantized(bits=bits)
    for n in (1, 127, 128, 159, 160, 161, 300, 1000, 4096):
        store, _, _ = _fill(policy, n, 64, torch.bfloat16)
        held = sum(t.numel() * t.element_size() for t in store.tensors())
        assert held == policy.kv_bytes(n, 64, 2) * 2, f"{n} tokens"  # two heads
        assert held <= 2 * 2 * n * 64 * 2, f"more than dense at {n} tokens"
    # At long lengths: codes (1, 1/2 or 1/4 byte) + fp16 scales and zeros (4 bytes per 32 tokens of a key channel and per
    # 32 channels of a value token) per element, over 2 bytes of bf16.
    expect = {8: (1 + 4 / 32) / 2, 4: (0.5 + 4 / 32) / 2, 2: (0.25 + 4 / 32) / 2}[bits]  # 0.5625, 0.3125, 0.1875
    assert policy.kv_bytes(65536, 64, 2) / (2 * 65536 * 64 * 2) == pytest.approx(expect, abs=0.002)


def test_8bit_keys_over_4bit_values_hold_between_4_and_8_bits_and_keep_keys_closer():
    """``key_bits=8``: keys as 8-bit codes, values as 4-bit ones; the store holds what ``kv_bytes`` says (0.44 of
    dense at long lengths), the keys it gives back err as 8-bit keys do and the values as 4-bit values."""
    mixed, four, eight = Quantized(bits=4, key_bits=8), Quantized(bits=4), Quantized(bits=8)
    for n in (1, 159, 160, 300, 1000):
        store, _, _ = _fill(mixed, n, 64, torch.bfloat16)
        assert sum(t.numel() * t.element_size() for t in store.tensors()) == mixed.kv_bytes(n, 64, 2) * 2, n
    assert mixed.kv_bytes(65536, 64, 2) / (2 * 65536 * 64 * 2) == pytest.approx((0.75 + 4 / 32) / 2, abs=0.002)
    assert four.kv_bytes(4096, 64) < mixed.kv_bytes(4096, 64) < eight.kv_bytes(4096, 64)
    views = {}
    for name, policy in (("mixed", mixed), ("four", four), ("eight", eight)):
        store, k, v = _fill(policy, 300, 64, torch.float32)
        keys, values = store.view()
        views[name] = ((keys - k)[:, :, :160].abs().max().item(), (values - v)[:, :, :160].abs().max().item())
    assert views["mixed"][0] == views["eight"][0] and views["mixed"][1] == views["four"][1]
    assert views["mixed"][0] < views["four"][0] / 8
    assert mixed.short() == "k8v4g32r128" and Quantized(bits=8, key_bits=8).short() == "int8g32r128"


def test_key_bits_stay_out_of_plans_that_do_not_set_them():
    """A plan written before ``key_bits`` existed keeps its parameters and digest; a bad value is refused."""
    assert "key_bits" not in Quantized(bits=4).params()
    assert Quantized(bits=4, key_bits=8).params()["key_bits"] == 8
    assert build_policy({"policy": "quantized", "params": {"bits": 4, "key_bits": 8}}) == Quantized(bits=4, key_bits=8)
    assert build_policy({"policy": "quantized", "params": {"bits": 2, "key_bits": 4}}) == Quantized(bits=2, key_bits=4)
    for bad in (3, 16, True, "8"):
        with pytest.raises(PlanError, match="key_bits"):
            build_policy({"policy": "quantized", "params": {"bits": 4, "key_bits": bad}})


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim", [16, 64, 256])
def test_quantized_head_never_holds_more_than_dense_at_any_length(bits, dim):
    for group in (8, 32, 128):
        policy = Quantized(bits=bits, group=group, residual=group)
        for n in range(1, 1200):
            assert policy.kv_bytes(n, dim, 2) <= Full().kv_bytes(n, dim, 2), f"group {group} at {n} tokens"


def test_store_keeps_every_token_the_recent_ones_exactly():
    policy = Quantized(bits=4, group=32, residual=64)
    store, k, v = _fill(policy, 301, 64, torch.float32)
    keys, values = store.view()
    assert keys.shape[2] == 301 and store.n_quant == 224 and store.res_k.shape[2] == 77
    torch.testing.assert_close(keys[:, :, 224:], k[:, :, 224:], rtol=0, atol=0)
    torch.testing.assert_close(values[:, :, 224:], v[:, :, 224:], rtol=0, atol=0)
    assert (keys - k).abs().max() < 0.35 * (k.amax() - k.amin()) / 15  # older tokens: within their 4-bit steps


def test_attend_is_exact_attention_over_the_dequantized_past_and_the_chunk():
    policy = Quantized(bits=4, group=16, residual=16)
    store = policy.make_store(1, 2, 32, torch.device("cpu"), torch.float32)
    k, v = _kv(90, 32)
    q = torch.randn(1, 4, 90, 32, generator=torch.Generator().manual_seed(5))
    for a, b in ((0, 50), (50, 89), (89, 90)):
        past_k, past_v = store.view()
        out = policy.attend(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], store, AttendContext(start=a, scale=32**-0.5))
        expect = causal_attention(q[:, :, a:b], torch.cat([past_k, k[:, :, a:b]], 2), torch.cat([past_v, v[:, :, a:b]], 2),
                                  a, 32**-0.5)
        torch.testing.assert_close(out, expect)
    assert store.n_quant == 64 and store.length == 90


@pytest.mark.parametrize("low", [4, 2])
def test_mixed_plan_generates_and_the_kernel_decode_gives_the_reference_tokens(low):
    """On the GPU when there is one (the kernels compiled), else on the CPU under Triton's interpreter; with 4-bit
    codes and 8-bit keys over them, or 2-bit codes and 4-bit keys over 2-bit values."""
    lm = tiny_model("llama", num_hidden_layers=2)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lm.model.to(device)
    plan = HeadPlan.from_policies(lm.spec, [[Full(), Quantized(bits=low, group=8, residual=8)],
                                            [Quantized(bits=low, key_bits=2 * low, group=8, residual=4),
                                             Streaming(sink=4, window=16)]])
    prompt = torch.randint(0, 128, (1, 45), generator=torch.Generator().manual_seed(0)).to(device)
    runs = {}
    for kernels in (False, True):
        events = list(Engine(lm, plan, chunk_size=16, use_kernels=kernels).generate(prompt[0], max_new_tokens=12,
                                                                                     stop_token_ids=[]))
        runs[kernels] = [e.token_id for e in events if e.stats is None]
        stats = events[-1].stats
        assert stats.new_tokens == 12 and stats.kv_bytes < stats.dense_kv_bytes
    assert runs[True] == runs[False]


def test_8bit_greedy_tokens_equal_dense_on_smollm2(smollm2):
    """bench/quantized_fidelity.py measures more: 32 tokens equal, top-1 agreement 1.0, max logit error 0.11."""
    ids = smollm2.tokenizer("The quick brown fox jumps over the lazy dog. " * 20, return_tensors="pt").input_ids[0, :160]
    plan = HeadPlan.uniform(smollm2.spec, {"policy": "quantized", "params": {"bits": 8, "residual": 32}})  # 128 as codes
    dense = [e.token_id for e in Engine(smollm2).generate(ids, max_new_tokens=8, stop_token_ids=[]) if e.stats is None]
    events = list(Engine(smollm2, plan, chunk_size=64).generate(ids, max_new_tokens=8, stop_token_ids=[]))
    assert [e.token_id for e in events if e.stats is None] == dense
    stats = events[-1].stats
    assert stats.kv_bytes == plan.kv_bytes(smollm2.spec, 167, 4)  # the fp32 model: codes against 4-byte dense


def test_solver_keeps_every_top_ranked_global_head_reachable_when_full_does_not_fit():
    scores = torch.zeros(18, 1)
    scores[5, 0], scores[11, 0], scores[17, 0] = 1.0, 0.9, 0.8  # Gemma 3's three global KV heads
    plain = solve(GEMMA3, scores, 0.35, 4096)
    assert plain.full_heads == [(5, 0)] and plain.skipped == [(11, 0), (17, 0)]  # full fits for one head only
    sol = solve(GEMMA3, scores, 0.35, 4096, quantize=True)
    assert sol.quantized_heads == [(5, 0), (11, 0), (17, 0)] and not sol.skipped
    assert all(isinstance(sol.policies[i][0], Quantized) for i in (5, 11, 17))
    plan = HeadPlan.from_policies(GEMMA3, sol.policies)
    # The solver counts the peak (the largest residual): what the plan holds at any moment of a 4K request.
    assert plan.kv_bytes(GEMMA3, 4096, peak=True) <= 0.35 * GEMMA3.dense_kv_bytes(4096)
    assert plan.kv_tokens(GEMMA3, 4096, peak=True) == sol.kv_tokens
    # More room: precision goes to the highest-ranked first.
    roomy = solve(GEMMA3, scores, 0.5, 4096, quantize=True)
    assert roomy.full_heads == [(5, 0)] and [roomy.policies[i][0].bits for i in (11, 17)] == [8, 4]


def test_solver_offers_quantized_options_only_when_asked():
    scores = torch.rand(18, 1, generator=torch.Generator().manual_seed(2))
    for budget in (0.5, 0.8):
        off = solve(GEMMA3, scores, budget, 4096)
        assert not any(isinstance(p, Quantized) for row in off.policies for p in row)


@pytest.mark.parametrize("target", [2048, 4096, 8192])
def test_solver_keeps_every_token_gemma3_sees_at_half_of_dense_with_windowed_quantized_heads(target):
    """Issue 19: Gemma 3's sliding layers alone hold 56% of its dense KV at 2K, so without quantization a half-size
    plan must hide tokens inside the native windows; with it, every head keeps every token the model sees (global
    heads whole, sliding heads their full native window, in codes or full precision)."""
    scores = torch.rand(18, 1, generator=torch.Generator().manual_seed(3)) + 0.01  # every head worth keeping
    plain = HeadPlan.from_policies(GEMMA3, solve(GEMMA3, scores, 0.5, target).policies)
    assert any(isinstance(p, Streaming) and p.window < (GEMMA3.native_window(i) or target)
               for i, row in enumerate(resolve(plain.policies(), GEMMA3)) for p in row)
    sol = solve(GEMMA3, scores, 0.5, target, quantize=True)
    plan = HeadPlan.from_policies(GEMMA3, sol.policies)
    assert plan.kv_bytes(GEMMA3, target, peak=True) <= 0.5 * GEMMA3.dense_kv_bytes(target)
    peak = plan.kv_tokens(GEMMA3, target, peak=True)
    assert peak <= sol.kv_tokens <= peak + 18  # per-head rounding
    for i, row in enumerate(resolve(plan.policies(), GEMMA3)):
        native, p = GEMMA3.native_window(i), row[0]
        if native is None:
            assert isinstance(p, Full | Quantized) and not (isinstance(p, Quantized) and p.window), f"layer {i}: {p}"
        else:
            assert p == Streaming(sink=0, window=native) or (isinstance(p, Quantized) and p.window == native), p
    assert any(isinstance(row[0], Quantized) for i, row in enumerate(sol.policies) if GEMMA3.native_window(i))


def test_a_plan_with_quantized_heads_decodes_eagerly_and_says_why():
    lm = tiny_model("llama", num_hidden_layers=1)
    plan = HeadPlan.from_policies(lm.spec, [[Full(), Quantized()]])
    cache = Engine(lm, plan, use_kernels=True).new_cache(reserve=8)
    assert any("quantized" in why and "more bytes than dense" in why for why in cache.graph_blockers())
    # Reserved long enough, the fixed residual of graph decode fits within dense (tests/test_quantized_graph.py).
    assert Engine(lm, plan, use_kernels=True).new_cache(reserve=4096).graph_blockers() == []
