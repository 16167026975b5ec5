"""CUDA-graph decode (``engine.GraphDecoder``): the graph-ready path (device positions, ``append_at``,
``DeviceLength``) against the eager kernel path on CPU under Triton's interpreter, the host-side counters, what
blocks a graph, and (on a GPU) generation from a replayed graph against eager generation."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from headwise.engine import GRAPH_MIN_STEPS, Engine, GraphDecoder, SamplingParams
from headwise.errors import HeadwiseError, InputError
from headwise.kernels.common import INTERPRET, DeviceLength
from headwise.kernels.decode_reference import quest_page_scores_reference, sparse_decode_reference
from headwise.kernels.paged_decode import sparse_decode
from headwise.kernels.quest import quest_page_scores
from headwise.plan import HeadPlan
from headwise.policies import build_policy
from headwise.policies.stores import DenseStore, PagedStore, SinkWindowStore, quantize_bounds
from tiny import tiny_model

needs_interpreter = pytest.mark.skipif(not INTERPRET,
                                       reason="kernels were decorated for a GPU; CPU tensors need TRITON_INTERPRET=1")

FULL = {"policy": "full"}
STREAM = {"policy": "streaming", "params": {"sink": 4, "window": 24}}
ASHAPE = {"policy": "a_shape", "params": {"block_size": 16, "sink": 16, "local": 32}}
QUEST = {"policy": "page_topk", "params": {"page_size": 4, "budget": 32}}
QUEST8 = {"policy": "page_topk", "params": {"page_size": 4, "budget": 32, "bounds": "e4m3"}}
QUANT4 = {"policy": "quantized", "params": {"bits": 4, "group": 16, "residual": 4}}
QUANT8 = {"policy": "quantized", "params": {"bits": 8, "group": 16, "residual": 5}}
PLANS = {
    "full-streaming-ashape": [[FULL, STREAM], [STREAM, STREAM], [ASHAPE, STREAM], [FULL, FULL]],
    "quantized": [[QUANT4, FULL], [QUANT8, STREAM], [QUANT4, QUANT4], [FULL, QUANT8]],
    "quest": [[QUEST, STREAM], [QUEST, QUEST], [FULL, QUEST], [QUEST8, QUEST8]],
}


def _plan(spec, rows):
    return HeadPlan.from_policies(spec, [[build_policy(h) for h in row] for row in rows])


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@needs_interpreter
@pytest.mark.parametrize("length", [1, 17, 64, 97])
def test_device_length_matches_host_length(length):
    """``DeviceLength`` (the length read by the kernel from a device tensor, the launch sized for the limit)
    gives what the host length gives, for both groups of a two-group launch."""
    g = torch.Generator().manual_seed(length)
    q = torch.randn(1, 12, 64, generator=g)
    k, v = torch.randn(2, 1, 2, 97, 64, generator=g)
    k2, v2 = torch.randn(2, 1, 1, 24, 64, generator=g)
    pos = torch.tensor([length - 1])
    one = sparse_decode(q[:, :8], k, v, DeviceLength(pos, 1, 97), page_size=16, num_splits=3)
    torch.testing.assert_close(one, sparse_decode_reference(q[:, :8], k, v, length, page_size=16), atol=1e-5, rtol=1e-5)
    two = sparse_decode(q, k, v, DeviceLength(pos, 1, 97), page_size=16, second=(k2, v2, DeviceLength(pos, 1, 24)))
    host = sparse_decode(q, k, v, length, page_size=16, second=(k2, v2, min(length, 24)))
    torch.testing.assert_close(two, host, atol=1e-6, rtol=1e-6)


@needs_interpreter
@pytest.mark.parametrize("tokens", [1, 30, 33, 96])
def test_quest_scores_from_a_device_length(tokens):
    """``quest_page_scores`` with a ``DeviceLength`` of tokens: the valid pages' scores as with the host page
    count (ends +inf), one column per reserved page, -inf past the valid ones; 8-bit bounds too."""
    g = torch.Generator().manual_seed(tokens)
    q = torch.randn(1, 4, 16, generator=g)
    bounds = torch.randn(1, 2, 6, 2, 16, generator=g).sort(dim=3).values  # 6 pages of 16 reserved
    n = -(-tokens // 16)
    codes, scales = quantize_bounds(bounds)
    for b, sc in ((bounds, None), (codes, scales)):
        got = quest_page_scores(q, b, DeviceLength(torch.tensor([tokens - 1]), 1, 96), scales=sc, page_size=16)
        assert got.shape == (1, 2, 6)
        torch.testing.assert_close(got[:, :, :n], quest_page_scores_reference(q, b, n, scales=sc))
        assert (got[:, :, n:] == float("-inf")).all()


def test_append_at_writes_what_append_writes():
    """Token by token through the ring's wrap, ``append_at`` (slot computed on the device) leaves each store
    exactly as ``append`` does."""
    g = torch.Generator().manual_seed(0)
    toks = torch.randn(2, 1, 2, 40, 8, generator=g)
    cpu = torch.device("cpu")
    for make in (lambda: DenseStore(1, 2, 8, cpu, torch.float32),
                 lambda: PagedStore(1, 2, 8, cpu, torch.float32, page_size=4),
                 lambda: PagedStore(1, 2, 8, cpu, torch.bfloat16, page_size=8, bound_format="e4m3"),
                 lambda: SinkWindowStore(1, 2, 8, cpu, torch.float32, sink=3, window=7)):
        a, b = make(), make()
        a.reserve(40)
        b.reserve(40)
        for t in range(40):
            k, v = toks[0][:, :, t : t + 1].to(a.dtype), toks[1][:, :, t : t + 1].to(a.dtype)
            a.append(k, v)
            b.append_at(k, v, torch.tensor([t]))
            if isinstance(a, PagedStore):  # the page bounds after every token, partial pages included
                assert torch.equal(a.page_bounds(), b.page_bounds())
        for x, y in zip(a.tensors(), b.tensors()):
            if isinstance(a, DenseStore):
                x, y = x[:, :, :40], y[:, :, :40]
            assert torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                               y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
        if isinstance(a, SinkWindowStore):
            assert torch.equal(a.slot_pos, b.slot_pos) and a.seen == b.seen == 40
        else:
            assert a.length == b.length == 40


@pytest.mark.parametrize("make", [lambda: DenseStore(1, 1, 4, torch.device("cpu"), torch.float32),
                                  lambda: SinkWindowStore(1, 1, 4, torch.device("cpu"), torch.float32, 2, 3)],
                         ids=["dense", "ring"])
def test_append_at_needs_reserved_room(make):
    store = make()
    with pytest.raises(RuntimeError, match="reserved room"):
        store.append_at(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), torch.tensor([0]))


@needs_interpreter
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("prompt_len", [100, 12], ids=["long", "short"])
def test_graph_ready_steps_match_eager_kernel_steps(tiny, prompt_len, plan_name):
    """Each decode step on the graph-ready path (``GraphDecoder(capture=False)``) gives the eager kernel path's
    logits, and the host-side counters agree: full, streaming and A-shape (full decode) heads; Quest heads (exact
    and 8-bit bounds, pages of 4, a 32-token budget) with streaming and full ones. From a 12-token prompt the
    streaming ring fills during decode (its length grows on the device) and the Quest heads hold fewer pages than
    their budget at first (the kernel keeps -inf pages past the length, whose tokens it masks); from 100 tokens
    the ring wraps and Quest really selects. Quantized heads (4 and 8 bits, groups of 16) hold a fixed residual,
    and from 12 tokens a group leaves it during decode (settled on the host between steps)."""
    plan = _plan(tiny.spec, PLANS[plan_name])
    engine = Engine(tiny, plan, chunk_size=32, use_kernels=True)
    prompt = torch.randint(0, 128, (1, prompt_len), generator=torch.Generator().manual_seed(1))
    steps = 5 if prompt_len > 50 else 20  # the short prompt crosses sink + window = 28
    eager, ready = engine.new_cache(1, reserve=prompt_len + steps), engine.new_cache(1, reserve=prompt_len + steps)
    assert ready.graph_blockers() == []
    engine.prefill(prompt, eager)
    engine.prefill(prompt, ready)
    decoder = GraphDecoder(engine, ready, capture=False)
    tok = 7
    for _ in range(steps):
        a = engine.forward(torch.tensor([[tok]]), eager)
        b = decoder.step(tok)
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-5)
        tok = int(a[0].argmax())
    assert ready.get_seq_length() == eager.get_seq_length() == prompt_len + steps
    for la, lb in zip(eager.layers, ready.layers):
        for ga, gb in zip(la.groups, lb.groups):
            assert getattr(ga.store, "length", None) == getattr(gb.store, "length", None)
            assert getattr(ga.store, "seen", None) == getattr(gb.store, "seen", None)
            if getattr(ga.store, "bounds", None) is not None:  # the page bounds written on the device: the same
                n = ga.store.num_pages
                assert torch.equal(ga.store.page_bounds(), gb.store.page_bounds()[:, :, :n])


@needs_interpreter
def test_a_decoder_made_under_inference_mode_steps_outside_it(tiny):
    """``Engine.step`` makes a sequence's ``GraphDecoder`` under ``torch.inference_mode`` (its input tensors, like the
    stores' buffers the forward makes, are inference tensors); stepped directly, outside inference mode, it writes
    them in place all the same and gives the eager kernel path's logits (quantized heads settling groups)."""
    plan = _plan(tiny.spec, PLANS["quantized"])
    engine = Engine(tiny, plan, chunk_size=32, use_kernels=True)
    prompt = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(6))
    eager, ready = engine.new_cache(1, reserve=32), engine.new_cache(1, reserve=32)
    engine.prefill(prompt, eager)
    engine.prefill(prompt, ready)
    with torch.inference_mode():
        decoder = GraphDecoder(engine, ready, capture=False)
    assert decoder.ids.is_inference()
    tok = 7
    for _ in range(20):
        a = engine.forward(torch.tensor([[tok]]), eager)
        torch.testing.assert_close(decoder.step(tok), a, atol=2e-5, rtol=1e-5)
        tok = int(a[0].argmax())
    assert ready.get_seq_length() == eager.get_seq_length() == 32


@needs_interpreter
def test_failed_capture_falls_back_to_eager(tiny, caplog):
    """A capture that fails (here: no CUDA at all) leaves the host-side counters as they were and the steps go on
    eagerly with a warning, giving the eager path's logits; under ``cuda_graphs=True`` it is a HeadwiseError."""
    plan = _plan(tiny.spec, PLANS["quest"])
    prompt = torch.randint(0, 128, (1, 40), generator=torch.Generator().manual_seed(4))
    engine = Engine(tiny, plan, chunk_size=32, use_kernels=True)
    eager, ready = engine.new_cache(1, reserve=48), engine.new_cache(1, reserve=48)
    engine.prefill(prompt, eager)
    engine.prefill(prompt, ready)
    decoder = GraphDecoder(engine, ready)  # capture=True: the first step's capture fails without CUDA
    with caplog.at_level("WARNING", logger="headwise.engine"):
        for tok in (3, 8, 1):
            torch.testing.assert_close(decoder.step(tok), engine.forward(torch.tensor([[tok]]), eager),
                                       atol=2e-5, rtol=1e-5)
    assert decoder.graph is None and "capturing one in a CUDA graph failed" in caplog.text
    assert ready.get_seq_length() == eager.get_seq_length() == 43
    strict = Engine(tiny, plan, chunk_size=32, use_kernels=True, cuda_graphs=True)
    cache = strict.new_cache(1, reserve=48)
    strict.prefill(prompt, cache)
    with pytest.raises(HeadwiseError, match="capturing a decode step in a CUDA graph failed"):
        GraphDecoder(strict, cache).step(3)
    assert cache.get_seq_length() == 41  # the eager step counted, the failed capture did not


@needs_interpreter
def test_a_sequence_whose_capture_failed_does_not_count_as_graph_decoded(tiny):
    """A lone sequence's steps through its ``GraphDecoder`` after a failed capture (here: no CUDA) run eagerly:
    its tokens are the eager engine's and its stats do not claim a CUDA graph (the memory row's ``cuda_graph``
    reads them)."""
    plan = _plan(tiny.spec, PLANS["full-streaming-ashape"])
    prompt = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    want = [e.token_id for e in Engine(tiny, plan, chunk_size=32, use_kernels=True).generate(
        prompt, max_new_tokens=4, stop_token_ids=[]) if e.token_id >= 0]
    engine = Engine(tiny, plan, chunk_size=32, use_kernels=True)
    seq = engine.add(prompt, max_new_tokens=4, stop_token_ids=[])
    while not seq.generated:
        engine.step()
    seq.graphs = GraphDecoder(engine, seq.cache)  # as Engine.step makes it on CUDA; on the CPU its capture fails
    graph_steps = 0
    while engine.live:
        graph_steps += engine.step().graph
    assert graph_steps == 3 and seq.generated == want and not seq.stats.cuda_graph


def test_what_blocks_a_graph(tiny):
    """Policies that read host-side state at decode, no kernels, or a CPU model: a clear reason each, an
    InputError where a graph is required, eager steps where it is only allowed."""
    plan = _plan(tiny.spec, [[FULL, {"policy": "recycled", "params": {"budget": 16, "stride": 3}}],
                             [STREAM, {"policy": "streaming", "params": {"sink": 4, "window": 24,
                                                                         "compensation": True}}],
                             [FULL, FULL], [FULL, FULL]])
    cache = Engine(tiny, plan, use_kernels=True).new_cache(1, reserve=64)
    (why,) = cache.graph_blockers()
    assert why.startswith("policies without graph decode: recycled (") and "has no CUDA-graph decode" in why
    assert "streaming (stream4+24+c) with compensation" in why
    with pytest.raises(InputError, match="without graph decode"):
        GraphDecoder(Engine(tiny, plan, use_kernels=True), cache)
    dense = HeadPlan.dense(tiny.spec)
    assert "kernels are off" in Engine(tiny, dense, use_kernels=False).new_cache(1, reserve=8).graph_blockers()[0]
    with pytest.raises(InputError, match="room reserved"):
        GraphDecoder(Engine(tiny, dense, use_kernels=True), Engine(tiny, dense, use_kernels=True).new_cache(1))
    if not torch.cuda.is_available():  # the tiny model is on the CPU
        with pytest.raises(InputError, match="not CUDA"):
            list(Engine(tiny, dense, use_kernels=True, cuda_graphs=True).generate([1, 2, 3], max_new_tokens=2))
        allowed = Engine(tiny, dense, use_kernels=True)  # cuda_graphs=None: eager steps, no error
        assert allowed.graph_decoder(allowed.new_cache(1, reserve=8)) is None
    # no decode step to replay (one new token): no graph, no error, even when asked for
    strict = Engine(tiny, dense, use_kernels=True, cuda_graphs=True)
    assert strict.graph_decoder(strict.new_cache(1, reserve=8), decode_steps=0) is None
    assert len([e for e in strict.generate([1, 2, 3], max_new_tokens=1) if e.token_id >= 0]) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("plan_name", list(PLANS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_generation_matches_eager_on_gpu(dtype, plan_name):
    """On CUDA: ``generate`` with decode steps replayed from one captured graph gives the tokens of eager
    kernel steps, with a streaming ring that wraps and Quest pages that fill during generation; the logits of a
    replayed step match the eager step's."""
    lm = tiny_model("llama")
    lm.model.to("cuda", dtype)
    plan = _plan(lm.spec, PLANS[plan_name])
    prompt = torch.randint(0, 128, (1, 50), generator=torch.Generator().manual_seed(2)).cuda()

    def gen(graphs: bool) -> list[int]:
        engine = Engine(lm, plan, chunk_size=32, use_kernels=True, cuda_graphs=graphs)
        return [e.token_id for e in engine.generate(prompt, max_new_tokens=40) if e.token_id >= 0]

    assert gen(True) == gen(False)
    for n in (1, 2, 5, 12):  # below GRAPH_MIN_STEPS decode steps auto mode stays eager
        auto = Engine(lm, plan, chunk_size=32, use_kernels=True)
        events = list(auto.generate(prompt, max_new_tokens=n))
        assert events[-1].stats.cuda_graph == (n - 1 >= GRAPH_MIN_STEPS)
        assert [e.token_id for e in events if e.token_id >= 0] == gen(False)[:n]
    engine = Engine(lm, plan, chunk_size=32, use_kernels=True)
    eager, replay = engine.new_cache(1, reserve=60), engine.new_cache(1, reserve=60)
    engine.prefill(prompt, eager)
    engine.prefill(prompt, replay)
    decoder = GraphDecoder(engine, replay)
    for tok in (5, 9, 11, 3):
        a = engine.forward(torch.tensor([[tok]], device="cuda"), eager).float()
        b = decoder.step(tok).float()
        torch.testing.assert_close(b, a, atol=1e-4 if dtype == torch.float32 else 3e-2, rtol=0)
    assert decoder.graph is not None and replay.get_seq_length() == eager.get_seq_length()


class _DigitTokenizer:
    """Just enough tokenizer for the scheduler: token ids as space-separated text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)


def _scheduler_check(device: str) -> None:
    """The server's scheduler (no HTTP): a request decoding alone runs through its own CUDA-graph decoder, two
    requests decode together eagerly, and when the shorter one ends the longer one goes on alone through its
    decoder; every request's tokens equal offline eager ``Engine.generate``'s."""
    from headwise.models import LoadedModel
    from headwise.server.scheduler import GenRequest, Scheduler

    base = tiny_model("llama")
    base.model.to(device)
    lm = LoadedModel(base.name, base.model, _DigitTokenizer(), base.spec, base.source)
    plan = _plan(lm.spec, PLANS["quest"])
    engine = Engine(lm, plan, chunk_size=32, use_kernels=True)
    prompts = [torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (40, 70)]
    want = [[e.token_id for e in Engine(lm, plan, chunk_size=32, use_kernels=True, cuda_graphs=False).generate(
        p, max_new_tokens=m) if e.token_id >= 0] for p, m in zip(prompts, (16, 4))]

    def run(pairs):
        sched = Scheduler(engine, max_batch=4, kv_budget_bytes=1 << 30, max_queue=4)
        reqs = [GenRequest(str(i), p, SamplingParams(max_new_tokens=m), set(), lambda ev: None)
                for i, (p, m) in enumerate(pairs)]
        for r in reqs:
            sched.submit(r)
        with sched._cond:
            sched._admit()
        while any(not r.finished for r in reqs):
            sched.step()
        return [r.generated for r in reqs], sched.metrics

    alone, m1 = run([(prompts[0], 16)])
    assert alone == [want[0]] and m1.decode_graph_steps == m1.decode_steps == 15
    # The second prompt's chunks run beside the first one's decode steps; once it ends, the first has more
    # than GRAPH_MIN_STEPS steps left and goes on alone through its decoder.
    both, m2 = run([(prompts[0], 16), (prompts[1], 4)])
    assert both == want
    assert 0 < m2.decode_graph_steps < m2.decode_steps and m2.peak_running == 2


@needs_interpreter
def test_scheduler_runs_a_lone_request_through_its_graph_decoder(monkeypatch):
    """On CPU, with the graph decoder's capture off (everything but the capture itself)."""
    monkeypatch.setattr(Engine, "graph_decoder", lambda self, cache, steps=GRAPH_MIN_STEPS:
                        GraphDecoder(self, cache, capture=False) if steps >= GRAPH_MIN_STEPS else None)
    _scheduler_check("cpu")


@pytest.mark.gpu
def test_scheduler_replays_a_lone_request_from_its_graph():
    _scheduler_check("cuda")
