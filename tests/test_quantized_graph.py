"""CUDA-graph decode of ``quantized`` heads (``QuantizedStore.append_at``, ``quant_decode`` with device lengths):
the fixed residual run eagerly against the exact-size eager store across flush boundaries, prefill chunk sizes
and sliding windows; the replay path (``advance``) settling groups between steps; when a reservation allows the
fixed residual (never more bytes than dense); and, on a GPU, a captured and replayed step against eager."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headwise.cache import HeadwiseCache
from headwise.kernels.common import INTERPRET
from headwise.kernels.quant_decode import quant_decode
from headwise.plan import HeadPlan
from headwise.policies import Quantized
from headwise.policies.quantized import QuantizedStore
from headwise.spec import ModelSpec

needs_interpreter = pytest.mark.skipif(not INTERPRET,
                                       reason="kernels were decorated for a GPU; CPU tensors need TRITON_INTERPRET=1")

D = 64
POLICIES = {
    "int4-g32-r16": Quantized(bits=4, group=32, residual=16),
    "int8-g8-r3": Quantized(bits=8, group=8, residual=3),
    "int4-g32-r16-w160": Quantized(bits=4, group=32, residual=16, window=160),
    "k8v4-g32-r16": Quantized(bits=4, key_bits=8, group=32, residual=16),
    "int2-g32-r16": Quantized(bits=2, group=32, residual=16),
    "k4v2-g32-r16-w160": Quantized(bits=2, key_bits=4, group=32, residual=16, window=160),
}


def _tokens(n: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 2, n, D, generator=g) + 3 * torch.randn(D, generator=g)  # key channel outliers
    return k.to(device, dtype), torch.randn(1, 2, n, D, generator=g).to(device, dtype)


def _write(store: QuantizedStore, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
    """What a replayed graph does to the store: ``append_at``'s write, none of its host code."""
    assert store.bounds is not None
    row = position - store.bounds[1:]
    store.res_k.index_copy_(2, row, k)
    store.res_v.index_copy_(2, row, v)


def _held(store: QuantizedStore, uncounted: int = 0) -> list[torch.Tensor]:
    """The valid codes, params and residual rows (``uncounted``: rows written but not yet counted)."""
    n, m = store.n_quant - store.first, store.n_res + uncounted
    G = store.group
    return [store.k_codes[:, :, :n], store.k_scale[:, :, : n // G], store.k_zero[:, :, : n // G],
            store.v_codes[:, :, :n], store.v_scale[:, :, :n], store.v_zero[:, :, :n],
            store.res_k[:, :, :m], store.res_v[:, :, :m]]


@needs_interpreter
@pytest.mark.parametrize(("name", "prefill"), [("int4-g32-r16", 1), ("int4-g32-r16", 64), ("int8-g8-r3", 37),
                                               ("int4-g32-r16-w160", 1), ("int4-g32-r16-w160", 37),
                                               ("k8v4-g32-r16", 37), ("int2-g32-r16", 37),
                                               ("k4v2-g32-r16-w160", 37)])
def test_graph_steps_match_eager_steps(name, prefill):
    """Prefill in chunks of 19, then decode to 420 tokens (several groups leave the residual; with the window,
    groups are dropped) three ways: eager ``append`` + the host-length kernel; ``append_at`` run eagerly + the
    device-length kernel; ``append_at`` once, then graph-replay writes + ``advance``. Same positions, same codes
    and residual bit for bit after every step, the same attention within the kernel's tolerance."""
    policy, total = POLICIES[name], 260
    k_all, v_all = _tokens(total, seed=prefill)
    q_all = torch.randn(total, 1, 4, D, generator=torch.Generator().manual_seed(7))
    stores = [QuantizedStore(1, 2, D, torch.device("cpu"), torch.float32, policy) for _ in range(3)]
    for s in stores:
        s.reserve(total)
        for a in range(0, prefill, 19):
            b = min(prefill, a + 19)
            s.append(k_all[:, :, a:b], v_all[:, :, a:b])
    eager, ready, replay = stores
    for t in range(prefill, total):
        k, v, q, pos = k_all[:, :, t : t + 1], v_all[:, :, t : t + 1], q_all[t], torch.tensor([t])
        before = (eager.n_quant, eager.first)
        eager.append(k, v)
        ready.append_at(k, v, pos)
        if t == prefill:
            replay.append_at(k, v, pos)  # the graph decoder's first step runs eagerly
        else:
            _write(replay, k, v, pos)  # a replay: the store was readied by the last ``advance``
        # The kernel (slow under the interpreter) where a group just left the residual or the window, and at the
        # ends; the stores' contents at every step.
        if (eager.n_quant, eager.first) != before or t in (prefill, total - 1):
            first = max(0, eager.length - policy.window - eager.first) if policy.window else 0
            want = quant_decode(q, eager.quantized(), eager.res_k, eager.res_v, eager.n_res, first=first,
                                num_splits=2)
            for s in (ready, replay):
                got = quant_decode(q, s.quantized(room=True), s.res_k, s.res_v, s.res_k.shape[2], position=pos,
                                   bounds=s.bounds, window=policy.window, num_splits=2)
                torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        for s, lag in ((ready, 0), (replay, int(t > prefill))):  # the same codes and residual, bit for bit
            assert s.fixed and s.res_k.shape[2] == policy.graph_residual()
            assert (s.length + lag, s.n_quant, s.first) == (eager.length, eager.n_quant, eager.first)
            assert s.bounds is not None and s.bounds.tolist() == [s.first, s.n_quant]
            for x, y in zip(_held(s, lag), _held(eager)):
                assert torch.equal(x, y)
        if t > prefill:
            replay.advance(1)  # counted after the replay, then readied for the next position
        else:
            replay._captured = True  # as a capture of the next step leaves it: the counter one ahead
            replay.length += 1
            replay.rewind(t + 1)
    assert eager.n_quant >= 3 * policy.group and (not policy.window or eager.first > 0)
    # An eager append (a prefill chunk after graph steps) goes back to the exact residual: the same store.
    for s in (ready, replay):
        s.append(k_all[:, :, :5], v_all[:, :, :5])
        assert not s.fixed and s.res_k.shape[2] == s.n_res
    eager.append(k_all[:, :, :5], v_all[:, :, :5])
    for s in (ready, replay):
        assert (s.length, s.n_quant, s.first) == (eager.length, eager.n_quant, eager.first)
        for x, y in zip(s.view(), eager.view()):
            assert torch.equal(x, y)


def test_replay_host_code_settles_a_residual_made_under_inference_mode():
    """The engine prefills and runs the graph decoder's first step under ``torch.inference_mode`` (``Engine.forward``),
    so the fixed residual is an inference tensor; the host code after the capture (``rewind``) and after each replay
    (``advance``) may run outside it (``GraphDecoder.step`` called directly, another thread) and still quantizes the
    groups leaving the residual and shifts the rest in place: the store an eager one is, token for token."""
    policy, prefill, total = POLICIES["int8-g8-r3"], 9, 60
    k_all, v_all = _tokens(total, seed=5)
    eager, replay = (QuantizedStore(1, 2, D, torch.device("cpu"), torch.float32, policy) for _ in range(2))
    for s in (eager, replay):
        s.reserve(total)  # as ``Engine.new_cache(reserve=...)``: the codes are normal tensors
    with torch.inference_mode():
        for s in (eager, replay):
            s.append(k_all[:, :, :prefill], v_all[:, :, :prefill])
        eager.append(k_all[:, :, prefill : prefill + 1], v_all[:, :, prefill : prefill + 1])
        replay.append_at(k_all[:, :, prefill : prefill + 1], v_all[:, :, prefill : prefill + 1],
                         torch.tensor([prefill]))  # the first step, eager
    assert replay.res_k.is_inference()
    replay._captured, replay.length = True, replay.length + 1  # what the capture's host code leaves
    replay.rewind(prefill + 1)
    for t in range(prefill + 1, total):
        k, v = k_all[:, :, t : t + 1], v_all[:, :, t : t + 1]
        with torch.inference_mode():  # the replayed forward's write, then the eager store's step
            _write(replay, k, v, torch.tensor([t]))
            eager.append(k, v)
        assert (replay.length + 1, replay.n_quant) == (eager.length, eager.n_quant)  # the token not yet counted
        for x, y in zip(_held(replay, 1), _held(eager)):
            assert torch.equal(x, y)
        replay.advance(1)
    assert eager.n_quant >= 5 * policy.group


@pytest.mark.parametrize("name", list(POLICIES))
def test_replays_fill_the_whole_reservation_where_the_last_token_would_start_a_group(name):
    """A generation that runs to its length limit replays a step at every position up to the reservation's last;
    after the last replay the store is full, and readying it for a token past the reservation quantized a group
    the codes had no room for: a RuntimeError on 1 of every ``group`` reserved lengths (run 19's multi-value
    needles on the H200). Reserved for such a length, the replays reach its end and hold what eager steps hold."""
    policy = POLICIES[name]
    total = policy.residual + 7 * policy.group - 1  # the token after the last would start a quantized group
    if policy.window:
        total += policy.window  # past the window: groups dropped as well
    assert policy.quantized_length(total + 1) > policy.codes_room(total)
    k_all, v_all = _tokens(total, seed=11)
    eager, replay = (QuantizedStore(1, 2, D, torch.device("cpu"), torch.float32, policy) for _ in range(2))
    prefill = 40
    for s in (eager, replay):
        s.reserve(total)
        s.append(k_all[:, :, :prefill], v_all[:, :, :prefill])
    eager.append(k_all[:, :, prefill : prefill + 1], v_all[:, :, prefill : prefill + 1])
    replay.append_at(k_all[:, :, prefill : prefill + 1], v_all[:, :, prefill : prefill + 1], torch.tensor([prefill]))
    for t in range(prefill + 1, total):
        k, v = k_all[:, :, t : t + 1], v_all[:, :, t : t + 1]
        _write(replay, k, v, torch.tensor([t]))
        eager.append(k, v)
        replay.advance(1)
    assert replay.length == eager.length == total and replay.n_quant == eager.n_quant
    for x, y in zip(_held(replay), _held(eager)):
        assert torch.equal(x, y)


def test_append_at_refuses_a_reservation_too_short_for_the_fixed_residual():
    """Reserved for 40 tokens, a fixed residual of 47 rows would hold more than dense: the store says why (and
    ``graph_blocker_at`` says it for the cache), and stays usable eagerly."""
    policy = Quantized(bits=4, group=32, residual=16)
    store = QuantizedStore(1, 2, D, torch.device("cpu"), torch.float32, policy)
    store.reserve(40)
    k, v = _tokens(1, seed=0)
    why = policy.graph_blocker_at(40, D, 4)
    assert why is not None and "more bytes than dense" in why and "reserved for 40 tokens" in why
    with pytest.raises(RuntimeError, match="more bytes than dense"):
        store.append_at(k, v, torch.tensor([0]))
    store.append(k, v)
    assert store.length == 1 and not store.fixed
    assert policy.graph_blocker_at(400, D, 4) is None and policy.graph_blocker() is not None  # pool graphs: no


SMOLLM2 = ModelSpec("llama", 30, 9, 3, 64, 8192, (None,) * 30)
GEMMA3 = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))
LENGTHS = (1, 64, 159, 160, 200, 300, 511, 512, 513, 543, 544, 1000, 1055, 2048, 8192)


@pytest.mark.parametrize("which", ["smollm2-shipped", "gemma3-int4", "gemma3-int8-window160"])
def test_a_graph_ready_cache_never_holds_more_than_dense(which):
    """Reserved for each length, where every quantized head allows graph decode its stores switch to the fixed
    residual, holding the plan's peak at every step, and the cache still holds no more than dense (not just past ``residual + group``, where the first
    codes sit beside a full residual); the shipped SmolLM2 plan allows it at every length from 544 on, Gemma 3's
    windowed heads too."""
    if which == "smollm2-shipped":
        spec, plan = SMOLLM2, HeadPlan.load(Path(__file__).resolve().parents[1] / "plans/smollm2-135m.json")
    else:
        spec = GEMMA3
        params = {"bits": 4} if which == "gemma3-int4" else {"bits": 8, "window": 160}
        plan = HeadPlan(dict(GEMMA3.fingerprint()), [[{"policy": "quantized", "params": params}]] * 18)
    allowed = []
    for n in LENGTHS:
        cache = HeadwiseCache(spec, plan, "cpu", torch.bfloat16)
        cache.reserve(n)
        groups = [g for layer in cache.layers for g in layer.groups]
        if any(g.policy.graph_blocker_at(n, spec.head_dim, 2) for g in groups):
            continue
        allowed.append(n)
        for g in groups:
            if isinstance(g.store, QuantizedStore):
                g.store._fix()
        assert cache.kv_bytes() <= spec.dense_kv_bytes(n, 2), f"{n} tokens"
        assert cache.kv_bytes() == plan.kv_bytes(spec, n, peak=True), f"{n} tokens: graph decode holds the peak"
    assert {n for n in LENGTHS if n >= 544} <= set(allowed)
