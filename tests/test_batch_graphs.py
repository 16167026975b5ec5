"""Decode steps over the page pool at padded batch sizes (``batch_graphs.py``): the padded static-buffer step gives
exactly the tokens of the eager batched step and of each sequence alone while the batch's members join, leave and
are preempted (fp32, on the CPU: the same step as a CUDA graph replays, run eagerly); padding rows write only the
pool's scratch page; on a GPU the step is captured at each padded size and replayed."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel path on CPU tensors, before triton.jit decorates

from headwise.batch_graphs import SIZES, padded_size
from headwise.engine import Engine, StepInfo
from headwise.errors import InputError
from headwise.kernels.common import INTERPRET
from headwise.plan import HeadPlan
from headwise.policies import Full, PageTopK
from headwise.pool import PagePool, SequencePages
from server_common import mixed_plan
from tiny import tiny_model


class LogitsRecorder(Engine):
    """An engine that keeps, per step, the next-token logits it samples from (by sequence id)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sampled: list[dict[str, torch.Tensor]] = []

    def _sample(self, rows):
        self.sampled.append({s.id: logits.float().clone() for s, logits in rows})
        return super()._sample(rows)


def greedy_alone(lm, prompt: list[int], n: int, plan: HeadPlan, **kw) -> list[int]:
    alone = Engine(lm, plan, chunk_size=16, **kw)
    return [e.token_id for e in alone.generate(prompt, max_new_tokens=n, stop_token_ids=[]) if e.token_id >= 0]


def run(engine: Engine, prompts, new, arrive, plans) -> tuple[list, list[StepInfo]]:
    """Add each sequence at its step and step until all are done; checks after every padded step that the batch's
    sequences sit in rows below the padded size. Returns the sequences and every step's ``StepInfo``."""
    seqs: list = [None] * len(prompts)
    infos: list[StepInfo] = []
    step = 0
    while step <= max(arrive) or engine.live:
        for i, at in enumerate(arrive):
            if at == step:
                seqs[i] = engine.add(prompts[i], max_new_tokens=new[i], stop_token_ids=[], plan=plans[i])
        info = engine.step()
        infos.append(info)
        if info.padded:  # one plan: every sequence's steps go through the same buffers
            batch = engine.batch_graphs([seqs[0]]).batch  # type: ignore[union-attr]
            assert batch is not None and len(batch.row_of) <= info.decode_rows
            assert all(r < info.padded for r in batch.row_of.values()), "rows below the padded size"
        step += 1
    return seqs, infos


def test_padded_sizes_are_the_next_power_of_two_up_to_128():
    assert [padded_size(n) for n in (1, 2, 3, 5, 8, 9, 100, 128)] == [1, 2, 4, 8, 8, 16, 128, 128]
    assert padded_size(129) is None and SIZES[-1] == 128


def quest_beside_full(spec, page_size: int = 4) -> HeadPlan:
    """Quest choosing 3 pages on every second KV head, full heads beside it."""
    quest = PageTopK(page_size=page_size, budget=3 * page_size)
    row = [Full() if h % 2 == 0 else quest for h in range(spec.num_kv_heads)]
    return HeadPlan.from_policies(spec, [row] * spec.num_layers)


@pytest.mark.parametrize("arch,plan_name", [("llama", "mixed"), ("gemma3_text", "mixed"), ("llama", "quest")])
def test_padded_steps_give_the_eager_batched_tokens_as_members_join_leave_and_are_preempted(arch, plan_name):
    """Five sequences under one plan (full + streaming heads whose ring wraps, Gemma 3's sliding layers holding their
    window as a ring; or Quest choosing 3 of up to 13 pages beside full heads) arrive at different steps into a pool
    too small for all: sequences are preempted and recomputed, finish at different steps, and the decode-only steps
    run at padded sizes (5 rows at 8, 3 at 4, ...)."""
    lm = tiny_model(arch)
    plan = mixed_plan(lm.spec, window=6) if plan_name == "mixed" else quest_beside_full(lm.spec)
    gen = torch.Generator().manual_seed(1)
    lengths, new, arrive = [5, 23, 40, 33, 9], [14, 12, 10, 9, 8], [0, 0, 2, 5, 6]
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    plans = [plan] * len(prompts)
    want = [greedy_alone(lm, p, n, plan) for p, n in zip(prompts, new)]

    probe = PagePool(lm.spec, 1 << 30, dtype_bytes=4, page_size=4)
    most = [SequencePages(probe, plan).pages_at(n + k - 1) for n, k in zip(lengths, new)]
    budget = (sum(most) * 3 // 5) * probe.page_bytes

    def batch(padded: bool) -> tuple[list, list[StepInfo], LogitsRecorder]:
        pool = PagePool(lm.spec, budget, dtype_bytes=4, page_size=4)
        engine = LogitsRecorder(lm, chunk_size=16, pool=pool, padded_decode=padded)
        seqs, infos = run(engine, prompts, new, arrive, plans)
        assert pool.free_pages == pool.num_pages, "every page back at the end"
        return seqs, infos, engine

    padded, infos, a = batch(True)
    eager, eager_infos, b = batch(False)
    assert [s.generated for s in padded] == [s.generated for s in eager] == want
    assert len(a.sampled) == len(b.sampled)
    for x, y in zip(a.sampled, b.sampled, strict=True):  # step by step, the same logits (fp32 rounding apart)
        assert x.keys() == y.keys()
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=1e-5)
    assert sum(i.preempted for i in infos) >= 1, "the pool was meant to run dry"
    sizes = {(i.decode_rows, i.padded) for i in infos if i.padded}
    assert any(rows < size for rows, size in sizes), f"no step was padded: {sizes}"
    assert len({size for _, size in sizes}) >= 3, "the batch changed size"
    assert all(size == padded_size(rows) for rows, size in sizes)
    assert not any(i.graph for i in infos), "no CUDA graph on the CPU"
    assert not any(i.padded for i in eager_infos)


def test_padding_rows_write_only_the_scratch_page():
    """Every padded step writes each sequence's token in its own pages at its position's slot, and the padding rows
    (one of 3 sequences at size 4, then the row a finished sequence left) write into the scratch page only."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6)
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool, padded_decode=True)
    assert pool.kv is not None
    pool.kv.zero_()
    seqs = [engine.add(list(range(1, n + 1)), max_new_tokens=k, stop_token_ids=[])
            for n, k in ((9, 8), (3, 3), (14, 8), (6, 8))]
    P = pool.page_size
    checked = []
    while engine.live:
        live = [s for s in seqs if not s.finished]
        before = pool.kv.clone()
        positions = [s.cached for s in live]
        info = engine.step()
        if not info.padded or info.finished:  # (a finished sequence's pages are back in the pool)
            continue
        expected = set()
        for s, pos in zip(live, positions):
            for layer in s.pages.groups:
                for g in layer:
                    slot = int(g.policy.paged_layout().slots(torch.tensor(pos)))
                    expected |= {(head[slot // P], slot % P) for head in g.pages}
        changed = (pool.kv != before).any(dim=-1).any(dim=1).nonzero().tolist()  # (page, slot) pairs
        assert {(p, t) for p, t in changed if p != pool.scratch} == expected
        checked.append((info.decode_rows, info.padded))
    assert checked.count((3, 4)) >= 3, checked  # the row of the sequence that finished first pads them
    assert pool.kv[pool.scratch].abs().sum() > 0, "the padding rows wrote their token into the scratch page"


def test_aborting_a_sequence_of_the_padded_batch_outside_inference_mode_gives_its_row_back():
    """``Engine.abort`` (the server's scheduler cancelling a request, outside ``torch.inference_mode``, in which
    ``Engine.step`` made the padded buffers) gives the aborted sequence's row back, its tables back to the scratch page,
    and the other sequence goes on with the tokens it gives alone."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6)
    pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool, padded_decode=True)
    prompts = [[5, 9, 2, 7, 1], [3, 8, 6]]
    keep, drop = (engine.add(p, max_new_tokens=10, stop_token_ids=[]) for p in prompts)
    while not engine.step().padded:
        pass
    graphs = engine.batch_graphs([keep])
    assert graphs is not None and graphs.batch is not None and graphs.batch.tables.is_inference()
    row = graphs.batch.row_of[id(drop)]
    engine.abort(drop)
    assert drop.finish_reason == "abort" and id(drop) not in graphs.batch.row_of
    assert (graphs.batch.tables[row] == pool.scratch).all()
    while engine.live:
        engine.step()
    assert keep.generated == greedy_alone(lm, prompts[0], 10, plan)
    assert pool.free_pages == pool.num_pages


def test_steps_the_padded_path_cannot_take_run_the_eager_batched_step():
    """Sequences under two plans in one step, or a plan with a group keeping its own store (Quest in pages other
    than the pool's), decode on the eager batched step, with the tokens each gives alone."""
    lm = tiny_model("llama")
    quest = HeadPlan.from_policies(lm.spec, [[PageTopK(page_size=8, budget=16)] * lm.spec.num_kv_heads]
                                   * lm.spec.num_layers)
    plans = [HeadPlan.dense(lm.spec), mixed_plan(lm.spec, window=6), quest]
    gen = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (6, 11, 17)]
    want = [greedy_alone(lm, p, 5, plan) for p, plan in zip(prompts, plans)]
    for together in ([0, 1], [2]):
        pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
        engine = Engine(lm, chunk_size=16, pool=pool, padded_decode=True)
        seqs, infos = run(engine, [prompts[i] for i in together], [5] * len(together), [0] * len(together),
                          [plans[i] for i in together])
        assert [s.generated for s in seqs] == [want[i] for i in together]
        assert not any(i.padded for i in infos if i.decode_rows == len(together))


def test_cuda_graphs_asked_for_on_a_cpu_pool_fail_the_sequences_with_the_reason():
    lm = tiny_model("llama")
    engine = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4), cuda_graphs=True)
    with pytest.raises(InputError, match="CUDA-graph decode was asked for, but the model is on cpu, not CUDA"):
        list(engine.generate([1, 2, 3], max_new_tokens=3, stop_token_ids=[]))
    assert engine.live == []


@pytest.mark.skipif(not INTERPRET, reason="the tiny model's CPU tensors on the kernel path need TRITON_INTERPRET=1")
@pytest.mark.parametrize("plan_name", ["mixed", "quest"])
def test_padded_steps_on_the_triton_kernel_give_each_sequence_its_tokens_alone(plan_name):
    """``use_kernels=True`` on CPU tensors: ``batch_decode`` sized for the buffers' length limit (Quest: in
    ``selected`` mode), under Triton's interpreter, with a padding row (3 sequences at size 4)."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6) if plan_name == "mixed" else quest_beside_full(lm.spec)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 19, 12)]
    want = [greedy_alone(lm, p, 4, plan, use_kernels=True) for p in prompts]
    pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool, use_kernels=True, padded_decode=True)
    seqs, infos = run(engine, prompts, [4, 4, 4], [0, 0, 1], [plan] * 3)
    assert [s.generated for s in seqs] == want
    assert any(i.padded == 4 and i.decode_rows == 3 for i in infos)


@pytest.mark.gpu
@pytest.mark.parametrize("plan_name", ["mixed", "quest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batched_decode_replays_cuda_graphs_at_padded_sizes_on_gpu(dtype, plan_name):
    """On CUDA: decode-only steps over the pool are captured once per padded size and replayed as the batch's members
    change; the tokens equal the same padded steps run eagerly and, in fp32, the eager batched step's (Quest: its page
    choice captured too, 3 pages of 16 of up to 5)."""
    lm = tiny_model("llama")
    lm.model.to("cuda", dtype)
    plan = mixed_plan(lm.spec, window=6) if plan_name == "mixed" else quest_beside_full(lm.spec, page_size=16)
    gen = torch.Generator().manual_seed(1)
    lengths, new, arrive = [5, 23, 40, 33, 9, 50], [30, 24, 20, 18, 16, 12], [0, 0, 2, 5, 6, 9]
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    itemsize = torch.empty((), dtype=dtype).element_size()

    def batch(**kw) -> tuple[list[list[int]], list[StepInfo]]:
        pool = PagePool(lm.spec, 1 << 24, dtype_bytes=itemsize, page_size=16)
        engine = Engine(lm, chunk_size=16, pool=pool, use_kernels=True, **kw)
        seqs, infos = run(engine, prompts, new, arrive, [plan] * len(prompts))
        return [s.generated for s in seqs], infos

    graphs, infos = batch()
    replayed = [i for i in infos if i.graph]
    assert len(replayed) >= 10 and all(i.padded for i in replayed)
    assert len({i.padded for i in replayed}) >= 2, "graphs at several padded sizes"
    padded_eager, eager_infos = batch(cuda_graphs=False, padded_decode=True)
    assert not any(i.graph for i in eager_infos) and any(i.padded for i in eager_infos)
    assert graphs == padded_eager
    if dtype == torch.float32:
        assert graphs == batch(padded_decode=False)[0]


class LogitsKeeper(Engine):
    """An engine that keeps every step's sampled logits as they are: views of the graphs' output buffers."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.kept: list[torch.Tensor] = []

    def _sample(self, rows):
        self.kept.extend(logits for _, logits in rows)
        return super()._sample(rows)


def grow_while_decoding(device: str, **kw) -> tuple[list[list[int]], list[tuple[bool, int]]]:
    """Four sequences whose longer members join later, so the padded buffers are reallocated after their first
    graphs; returns the tokens and, for each padded step, (replayed, the buffers' length limit)."""
    lm = tiny_model("llama")
    lm.model.to(device)
    plan = mixed_plan(lm.spec, window=6)
    gen = torch.Generator().manual_seed(3)
    lengths, new, arrive = [5, 23, 40, 70], [16, 16, 16, 12], [0, 0, 4, 9]
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=16)
    engine = LogitsKeeper(lm, chunk_size=16, pool=pool, **kw)
    seqs: list = []
    steps: list[tuple[bool, int]] = []
    step = 0
    while step <= max(arrive) or engine.live:
        seqs += [engine.add(prompts[i], max_new_tokens=new[i], stop_token_ids=[], plan=plan)
                 for i, at in enumerate(arrive) if at == step]
        info = engine.step()
        if info.padded:
            graphs = engine.batch_graphs([seqs[0]])
            assert graphs is not None and graphs.batch is not None
            steps.append((info.graph, graphs.batch.limit))
        step += 1
    assert all(s.error is None for s in seqs), [s.error for s in seqs]
    return [s.generated for s in seqs], steps


def test_the_padded_buffers_grow_after_their_first_steps():
    """The schedule the GPU test below relies on: two padded steps on the first buffers (a capture, then a replay on a
    GPU), then the limit grows twice, and more than three steps run on the last buffers."""
    _, steps = grow_while_decoding("cpu", padded_decode=True)
    limits = [limit for _, limit in steps]
    assert limits == sorted(limits) and limits.count(limits[0]) == 2 and len(set(limits)) == 3, limits
    assert limits.count(limits[-1]) > 3 and not any(replayed for replayed, _ in steps)


@pytest.mark.gpu
def test_graphs_are_captured_again_after_the_buffers_grow():
    """Reallocated buffers drop the graphs that read the old ones; later steps are captured again, into a fresh
    memory pool, and replayed, while the caller still holds logits of the dropped graphs (blocks of their pool: the
    caching allocator refuses a capture into a pool whose graphs are all gone while a block of it lives).
    ``cuda_graphs=True``: a failed capture would fail the sequences. Tokens as the same padded steps run eagerly."""
    tokens, steps = grow_while_decoding("cuda", use_kernels=True, cuda_graphs=True)
    first = steps[0][1]
    assert any(replayed for replayed, limit in steps if limit == first), "replayed on the first buffers"
    assert sum(replayed for replayed, limit in steps if limit > first) >= 3, f"not replayed after growing: {steps}"
    assert tokens == grow_while_decoding("cuda", use_kernels=True, cuda_graphs=False, padded_decode=True)[0]


@pytest.mark.parametrize("plan_name", ["mixed", "quest"])
def test_multi_step_runs_give_the_single_steps_tokens_through_joins_finishes_and_preemption(plan_name):
    """``multi_step=4``: decode-only steps of greedy sequences run up to 4 forwards in a row, the next token chosen on
    the device; five sequences arriving at different steps into a pool too small for all (preemption, replays) give
    the tokens each gives alone, runs never pass a sequence's length limit, and every page goes back."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6) if plan_name == "mixed" else quest_beside_full(lm.spec)
    gen = torch.Generator().manual_seed(1)
    lengths, new, arrive = [5, 23, 40, 33, 9], [14, 12, 10, 9, 8], [0, 0, 2, 5, 6]
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    want = [greedy_alone(lm, p, n, plan) for p, n in zip(prompts, new)]
    probe = PagePool(lm.spec, 1 << 30, dtype_bytes=4, page_size=4)
    most = [SequencePages(probe, plan).pages_at(n + k - 1) for n, k in zip(lengths, new)]
    pool = PagePool(lm.spec, (sum(most) * 3 // 5) * probe.page_bytes, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool, padded_decode=True, multi_step=4)
    seqs, infos = run(engine, prompts, new, arrive, [plan] * len(prompts))
    assert [s.generated for s in seqs] == want
    assert pool.free_pages == pool.num_pages, "every page back at the end"
    runs = [i.decode_steps for i in infos if i.decode_rows and not i.prefill_tokens]
    assert max(runs) == 4 and 1 in runs and sum(r > 1 for r in runs) >= 2, runs
    assert sum(i.preempted for i in infos) >= 1, "the pool was meant to run dry"
    assert all(len(s.generated) == n for s, n in zip(seqs, new))


def test_a_stop_token_inside_a_multi_step_run_ends_the_sequence_where_a_single_step_does():
    """The tokens a run computes after a sequence's stop token are dropped: the sequence ends with the same tokens,
    events and finish reason as under single steps, and the other one goes on unchanged."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6)
    prompts = [[5, 9, 2, 7, 1, 4, 4], [3, 8, 6, 11, 2]]
    free = greedy_alone(lm, prompts[0], 12, plan)
    stop = free[5]  # a token the first sequence samples in the middle of a run
    first_seen = free.index(stop)

    def go(multi: int) -> tuple[list, list[StepInfo]]:
        pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
        engine = Engine(lm, plan, chunk_size=16, pool=pool, padded_decode=True, multi_step=multi)
        seqs = [engine.add(prompts[0], max_new_tokens=12, stop_token_ids=[stop]),
                engine.add(prompts[1], max_new_tokens=12, stop_token_ids=[])]
        infos = []
        while engine.live:
            infos.append(engine.step())
        assert pool.free_pages == pool.num_pages
        return seqs, infos

    (a, b), infos = go(8)
    (a1, b1), _ = go(1)
    assert a.generated == a1.generated == free[:first_seen] and a.finish_reason == a1.finish_reason == "stop"
    assert b.generated == b1.generated == greedy_alone(lm, prompts[1], 12, plan)
    assert [e.text for e in a.take_events()] == [e.text for e in a1.take_events()]
    assert max(i.decode_steps for i in infos) > 1


def test_a_sampled_sequence_in_the_batch_keeps_the_steps_single():
    """Multi-step chooses tokens by argmax: a batch with a sequence that samples (temperature > 0) runs single steps,
    and its seeded tokens are those of an engine without multi-step."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6)

    def go(multi: int) -> tuple[list[list[int]], list[StepInfo]]:
        pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
        engine = Engine(lm, plan, chunk_size=16, pool=pool, padded_decode=True, multi_step=multi)
        seqs = [engine.add([5, 9, 2, 7], max_new_tokens=8, stop_token_ids=[]),
                engine.add([3, 8, 6], max_new_tokens=8, stop_token_ids=[], temperature=0.9, seed=7)]
        infos = []
        while engine.live:
            infos.append(engine.step())
        return [s.generated for s in seqs], infos

    tokens, infos = go(4)
    assert tokens == go(1)[0]
    assert all(i.decode_steps <= 1 for i in infos)


def test_multi_step_must_be_positive():
    lm = tiny_model("llama")
    with pytest.raises(InputError, match="multi_step must be at least 1"):
        Engine(lm, multi_step=0)


@pytest.mark.gpu
@pytest.mark.parametrize("plan_name", ["mixed", "quest"])
def test_multi_step_runs_replay_the_graphs_with_the_single_steps_tokens_on_gpu(plan_name):
    """On CUDA, bf16: multi-step runs replay the padded graphs back to back, the tokens fed on the device, and give
    the tokens of single graph-replayed steps."""
    lm = tiny_model("llama")
    lm.model.to("cuda", torch.bfloat16)
    plan = mixed_plan(lm.spec, window=6) if plan_name == "mixed" else quest_beside_full(lm.spec, page_size=16)
    gen = torch.Generator().manual_seed(1)
    lengths, new, arrive = [5, 23, 40, 33, 9, 50], [60, 56, 52, 50, 48, 44], [0, 0, 2, 5, 6, 9]
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]

    def batch(multi: int) -> tuple[list[list[int]], list[StepInfo]]:
        pool = PagePool(lm.spec, 1 << 24, dtype_bytes=2, page_size=16)
        engine = Engine(lm, chunk_size=16, pool=pool, use_kernels=True, multi_step=multi)
        seqs, infos = run(engine, prompts, new, arrive, [plan] * len(prompts))
        return [s.generated for s in seqs], infos

    tokens, infos = batch(8)
    assert any(i.graph and i.decode_steps == 8 for i in infos), [(i.graph, i.decode_steps, i.padded) for i in infos]
    assert tokens == batch(1)[0]


@pytest.mark.parametrize("layout", ["blocks", "interleaved"])
def test_padded_steps_over_consecutive_and_interleaved_head_groups_give_each_sequence_its_tokens(layout):
    """Four KV heads per layer: full and streaming heads in blocks (each launch a range of consecutive heads: it reads
    and writes views) or interleaved (gathered and scattered by index); both give each sequence its tokens alone."""
    from headwise.policies import Streaming

    lm = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4)
    stream = Streaming(sink=2, window=6)
    row = [Full(), Full(), stream, stream] if layout == "blocks" else [Full(), stream, Full(), stream]
    plan = HeadPlan.from_policies(lm.spec, [row] * lm.spec.num_layers)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (7, 19, 12)]
    want = [greedy_alone(lm, p, 6, plan) for p in prompts]
    pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool, padded_decode=True)
    seqs, infos = run(engine, prompts, [6, 6, 6], [0, 0, 1], [plan] * 3)
    assert [s.generated for s in seqs] == want and any(i.padded for i in infos)
    batch = engine.batch_graphs([seqs[0]])
    ranged = [la.q_range is not None for layer in batch.batch.launches for la in layer]  # type: ignore[union-attr]
    assert all(ranged) if layout == "blocks" else not any(ranged)


@pytest.mark.gpu
def test_a_capture_keeps_the_allocators_cache_and_its_graph_replays():
    """``capture_graph`` does not empty the allocator's cache before capturing (``torch.cuda.graph`` does, and
    after a long run of prompt chunks that cost run 20 a 1.19 s step): what was cached stays reserved, and the
    captured graph replays its work on new inputs."""
    from headwise.batch_graphs import capture_graph

    device = torch.device("cuda")
    x = torch.randn(64, device=device)
    y = (x * 2).sum()  # the stream's first kernels, outside the graph (torch's warm-up)
    cached = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    del cached  # 256 MiB back in the allocator's cache, not the driver's
    reserved = torch.cuda.memory_reserved(device)
    graph, y = capture_graph(lambda: (x * 2).sum(), device)
    assert torch.cuda.memory_reserved(device) >= reserved
    x.copy_(torch.arange(64.0, device=device))
    graph.replay()
    torch.cuda.synchronize(device)
    assert y.item() == 2 * sum(range(64))
