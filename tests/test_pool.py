"""The KV page pool (``headwise/pool.py``) and the engine under it: pages follow each policy, come back at the
end, a dry pool preempts the newest sequence and its recompute gives the same tokens, and a 25%-KV plan runs
several times as many 32K-token sequences as the dense plan in the same pool."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import BudgetError, InputError
from headwise.plan import HeadPlan
from headwise.policies import Full, PageTopK, Streaming, build_policy, policy_names
from headwise.pool import KVMemory, PagePool, SequencePages
from headwise.spec import ModelSpec
from host_ops import HostOps
from server_common import mixed_plan
from tiny import tiny_model

LLAMA3_8B = ModelSpec(architecture="llama", num_layers=32, num_q_heads=32, num_kv_heads=8, head_dim=128,
                      max_context=131072)


def one_head_plan(policy) -> tuple[ModelSpec, HeadPlan]:
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=2, num_kv_heads=1, head_dim=8, max_context=4096)
    return spec, HeadPlan.from_policies(spec, [[policy]])


def test_pool_hands_out_pages_all_or_nothing():
    spec, _ = one_head_plan(Full())
    pool = PagePool(spec, budget_bytes=10 * 4 * 2 * 8 * 2, dtype_bytes=2, page_size=4)
    assert pool.num_pages == 10 and pool.page_bytes == 4 * 2 * 8 * 2
    a = pool.take(7)
    assert a is not None and len(set(a)) == 7 and pool.free_pages == 3
    assert pool.take(4) is None and pool.free_pages == 3, "a refused request takes nothing"
    pool.give_back(a)
    assert pool.free_pages == 10


def test_full_heads_grow_by_pages_and_streaming_rings_stop_at_sink_plus_window():
    spec, full = one_head_plan(Full())
    pool = PagePool(spec, 1 << 20, dtype_bytes=2, page_size=4)
    pages = SequencePages(pool, full)
    assert pages.grow(1) and pages.held == 1
    assert pages.grow(9) and pages.held == 3  # ceil(9 / 4)
    assert pages.nbytes == 3 * pool.page_bytes
    spec, ring = one_head_plan(Streaming(sink=2, window=6))  # 8 slots: two pages, taken once
    stream = SequencePages(pool, ring)
    held = []
    for n in (1, 5, 8, 9, 100, 1000):
        assert stream.grow(n)
        held.append(stream.held)
    assert held == [1, 2, 2, 2, 2, 2], "never more than the tokens seen, never more than the ring"
    spec, quest = one_head_plan(PageTopK(page_size=4, budget=8))
    paged = SequencePages(pool, quest)
    assert paged.grow(16) and paged.held == 5, "4 pages of 4 tokens + one bound page for them"
    before = pool.free_pages
    for p in (pages, stream, paged):
        p.release()
    assert pool.free_pages == before + 3 + 2 + 5 == pool.num_pages


def test_pages_held_are_exactly_what_every_group_needs_whatever_the_steps():
    """``grow`` skips its arithmetic below the next length where a group runs short (``_first_short``): after every
    call each group holds exactly ``head_pages`` at the new length, for every policy with a pool layout or without,
    over steps of one token (decode), of a chunk, and crossing ring, bound-page and chunk boundaries."""
    from headwise.policies import LongHeads, Quantized
    from headwise.policies.knorm import KNorm
    from headwise.pool import head_pages

    spec = ModelSpec(architecture="llama", num_layers=2, num_q_heads=6, num_kv_heads=3, head_dim=8, max_context=1 << 20)
    rows = [[Full(), Streaming(sink=2, window=9), PageTopK(page_size=4, budget=8)],
            [KNorm(tokens=5, window=3), LongHeads(chunk_size=8, top_k=2), Quantized(bits=4, group=8)]]
    plan = HeadPlan.from_policies(spec, rows)
    pool = PagePool(spec, 1 << 24, dtype_bytes=2, page_size=4)
    pages = SequencePages(pool, plan)
    gen = torch.Generator().manual_seed(0)
    n = 0
    for _ in range(300):
        n += 1 if torch.rand((), generator=gen) < 0.8 else int(torch.randint(2, 40, (), generator=gen))
        assert pages.grow(n)
        for layer in pages.groups:
            for g in layer:
                assert (len(g.pages[0]), len(g.bound_pages[0])) == head_pages(g.policy, n, 4), (g.policy, n)
    assert pool.num_pages - pool.free_pages == pages.held
    pages.release()
    assert pool.free_pages == pool.num_pages and pages.grow(3) and pages.held == SequencePages(pool, plan).pages_at(3)


@pytest.mark.parametrize("policy", policy_names())
def test_kv_tokens_never_decrease_as_the_length_grows(policy):
    """``grow``'s shortcut and the pool's admission rest on it: a head never needs fewer slots for more tokens."""
    p = build_policy({"policy": policy})
    seen = [p.kv_tokens(n) for n in range(0, 3000, 7)]
    assert seen == sorted(seen)


def test_a_sequence_larger_than_the_pool_is_refused():
    lm = tiny_model("llama")
    pool = PagePool(lm.spec, budget_bytes=20 * 4 * 2 * 16 * 4, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool)
    with pytest.raises(BudgetError, match="more than the pool"):
        engine.add(list(range(1, 40)), max_new_tokens=4)


def test_preempted_sequences_recompute_the_same_greedy_tokens():
    lm = tiny_model("llama")
    plans = [mixed_plan(lm.spec, window=6), HeadPlan.dense(lm.spec),
             HeadPlan.from_policies(lm.spec, [[PageTopK(page_size=4, budget=8)] * 2] * 4), mixed_plan(lm.spec, 6)]
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (5, 23, 40, 30)]
    want = []
    for p, plan in zip(prompts, plans):
        alone = Engine(lm, plan, chunk_size=16)
        want.append([e.token_id for e in alone.generate(p, max_new_tokens=20, stop_token_ids=[]) if e.token_id >= 0])
    probe = PagePool(lm.spec, 1 << 30, dtype_bytes=4, page_size=4)
    most = max(SequencePages(probe, plan).pages_at(len(p) + 19) for p, plan in zip(prompts, plans))
    pool = PagePool(lm.spec, (most + 40) * probe.page_bytes, dtype_bytes=4, page_size=4)  # too small for all
    engine = Engine(lm, chunk_size=16, pool=pool)
    seqs = [engine.add(p, max_new_tokens=20, stop_token_ids=[], plan=plan) for p, plan in zip(prompts, plans)]
    preempted, peak = 0, 0
    while engine.live:
        info = engine.step()
        preempted += info.preempted
        peak = max(peak, pool.used_pages)
        assert all(s.kv_bytes == s.pages.held * pool.page_bytes for s in engine.live if s.pages is not None)
    assert preempted >= 2 and seqs[0].preemptions == 0, "the oldest sequence is never the one preempted"
    assert [s.generated for s in seqs] == want
    assert peak <= pool.num_pages and pool.free_pages == pool.num_pages, "every page back at the end"


def concurrent_32k(plan: HeadPlan, pool: PagePool) -> int:
    """Sequences of 32K tokens admitted into ``pool`` until its allocator refuses one."""
    held = []
    while True:
        pages = SequencePages(pool, plan)
        if not pages.grow(32768):
            break
        held.append(pages)
    for p in held:
        p.release()
    return len(held)


def test_a_25_percent_kv_plan_admits_3_5x_the_dense_sequences_at_32k():
    dense = HeadPlan.dense(LLAMA3_8B)
    row = [Full()] * 2 + [Streaming(sink=64, window=256)] * 6  # 25% full heads, DuoAttention's streaming heads
    duo = HeadPlan.from_policies(LLAMA3_8B, [row] * LLAMA3_8B.num_layers)
    pool = PagePool(LLAMA3_8B, budget_bytes=60 * 2**30, dtype_bytes=2)  # bf16, pages of 16 tokens
    n_dense, n_duo = concurrent_32k(dense, pool), concurrent_32k(duo, pool)
    assert pool.free_pages == pool.num_pages
    assert n_dense == 15  # 60 GiB / 4 GiB of bf16 KV per 32K-token sequence
    assert n_duo >= 3.5 * n_dense, (n_duo, n_dense)


def test_the_scheduler_admits_by_free_pages_and_refuses_what_the_pool_cannot_hold():
    from headwise.engine import SamplingParams
    from headwise.server.scheduler import GenRequest, Scheduler, TooLargeError

    lm = tiny_model("llama")
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (30, 26, 34)]
    want = [[e.token_id for e in Engine(lm, chunk_size=16).generate(p, max_new_tokens=12, stop_token_ids=[])
             if e.token_id >= 0] for p in prompts]
    # Dense tiny llama: 8 KV heads in all, pages of 4 tokens: the prompts take 64 + 56 + 72 = 192 pages, and
    # 41-45 tokens at the end 88-96 pages each: 200 pages admit all three and run dry while they decode.
    pool = PagePool(lm.spec, 200 * 4 * 2 * 16 * 4, dtype_bytes=4, page_size=4)
    scheduler = Scheduler(Engine(lm, chunk_size=16, pool=pool), max_batch=8, kv_budget_bytes=1, max_queue=8)
    with pytest.raises(TooLargeError, match="more than the pool"):
        scheduler.submit(GenRequest("big", list(range(1, 110)), SamplingParams(max_new_tokens=4), set(),
                                    lambda ev: None))
    done: dict[str, int] = {}
    reqs = [GenRequest(str(i), p, SamplingParams(max_new_tokens=12), set(),
                       lambda ev, i=i: done.update({str(i): ev.completion_tokens}) if ev.kind == "done" else None)
            for i, p in enumerate(prompts)]
    for r in reqs:
        scheduler.submit(r)
    with scheduler._cond:
        scheduler._admit()
    assert len(scheduler._running) == 3, "the three prompts fit the free pages"
    while not all(r.finished for r in reqs):
        scheduler.step()
    assert [r.generated for r in reqs] == want and done == {"0": 12, "1": 12, "2": 12}
    assert sum(r.seq.preemptions for r in reqs) >= 1
    assert pool.free_pages == pool.num_pages


def test_kv_memory_is_gigabytes_or_a_share_of_free_device_memory():
    assert KVMemory.parse("40") == KVMemory(gb=40.0) and KVMemory.parse(" 2.5 ") == KVMemory(gb=2.5)
    assert KVMemory.parse("90%") == KVMemory(fraction=0.9)
    for bad in ("", "0", "-3", "nan", "inf", "120%", "%", "lots", "4GB"):
        with pytest.raises(InputError, match="--kv-memory takes gigabytes"):
            KVMemory.parse(bad)
    pool = KVMemory(gb=0.001).pool(LLAMA3_8B, torch.device("cpu"), dtype_bytes=2)
    assert pool.num_pages == 10**6 // (16 * 2 * 128 * 2)
    if not torch.cuda.is_available():
        with pytest.raises(BudgetError, match="needs a CUDA device"):
            KVMemory(fraction=0.5).pool(LLAMA3_8B, torch.device("cpu"), dtype_bytes=2)


def test_a_page_table_takes_only_the_new_pages_from_the_host_as_it_grows():
    """A 2048-token chunk adds 128 pages per head to a table of up to 8192: the table is extended by them, not
    rebuilt from every page id in every layer of every step; released and grown again, it starts over."""
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8, max_context=4096)
    pool = PagePool(spec, 1 << 20, dtype_bytes=2, page_size=4)
    pages = SequencePages(pool, HeadPlan.from_policies(spec, [[Full(), Full()]]))
    group = pages.groups[0][0]
    assert pages.grow(8)
    first = group.table()
    assert first.tolist() == group.pages and first.shape == (2, 2) and first.dtype == torch.int32
    assert group.table() is first, "unchanged pages: the same tensor"
    assert pages.grow(20)
    with HostOps() as ops:
        grown = group.table()
    assert grown.tolist() == group.pages and grown.shape == (2, 5)
    assert ops.from_host() == [(2, 3)], "only the 3 new pages of each head cross from the host"
    assert first.tolist() == [head[:2] for head in group.pages], "a table handed out is never written"
    pages.release()
    assert pages.grow(4) and group.table().tolist() == group.pages and group.table().shape == (2, 1)


def test_the_tables_of_every_group_that_grew_cross_from_the_host_in_one_copy():
    """A step's growth takes pages in every layer of each growing sequence: the first table asked for brings those of
    every group that grew, page and bound-page tables, in one host copy (``PagePool.sync_tables``), and every other
    table is then handed out without one (a copy per (sequence, layer, group) before); a released sequence's groups
    and a group whose policy keeps its own store beside the pool (no table used) are left out. Tables handed out are
    never written."""
    spec = ModelSpec(architecture="llama", num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8, max_context=4096)
    pool = PagePool(spec, 1 << 20, dtype_bytes=2, page_size=4)
    beside = PageTopK(page_size=8, budget=16)  # pages of 8: its own store, its pages counted
    plan = HeadPlan.from_policies(spec, [[Full(), PageTopK(page_size=4, budget=8)], [Streaming(sink=2, window=6), Full()],
                                         [beside, Full()]])
    seqs = [SequencePages(pool, plan) for _ in range(3)]
    groups = [g for s in seqs[:2] for layer in s.groups for g in layer if g.policy != beside]

    def new_ids(grow: list[int]) -> int:
        before = sum(len(h) for g in groups for h in (*g.pages, *g.bound_pages))
        assert all(s.grow(n) for s, n in zip(seqs, grow))
        return sum(len(h) for g in groups for h in (*g.pages, *g.bound_pages)) - before

    n = new_ids([9, 20, 5])
    seqs[2].release()
    with HostOps() as ops:
        tables = [(g.table(), g.bound_table() if g.bound_pages[0] else torch.zeros(g.heads, 0)) for g in groups]
    assert ops.from_host() == [(n,)], "one copy, of every page id taken"
    assert all(t.tolist() == g.pages and b.tolist() == g.bound_pages for g, (t, b) in zip(groups, tables))
    assert all(g._table is None for s in seqs for layer in s.groups for g in layer if g.policy == beside)
    assert all(g._table is None for layer in seqs[2].groups for g in layer)
    n = new_ids([30, 21, 0])  # 5 pages more per full or Quest head and a bound page; 1 page per head for the second
    with HostOps() as ops:
        grown = [(g.table(), g.bound_table() if g.bound_pages[0] else torch.zeros(g.heads, 0)) for g in groups]
    assert ops.from_host() == [(n,)], "one copy, of the new page ids alone"
    assert all(t.tolist() == g.pages and b.tolist() == g.bound_pages for g, (t, b) in zip(groups, grown))
    assert all(t.tolist() == [h[: t.shape[1]] for h in g.pages] for g, (t, _) in zip(groups, tables))


def test_host_to_device_gives_the_same_values_on_the_cpu_and_on_cuda():
    """``host_to_device`` copies host-made index tensors (values and dtype kept), asynchronously from pinned memory
    on CUDA, and reading the result afterwards sees the copy done (stream order)."""
    from headwise.kernels.common import host_to_device

    host = torch.tensor([[3, 1, 4], [1, 5, 9]], dtype=torch.int32)
    out = host_to_device(host, "cpu")
    assert out.dtype == torch.int32 and torch.equal(out, host)
    if torch.cuda.is_available():
        big = torch.arange(1 << 20, dtype=torch.int64)
        on_gpu = host_to_device(big, "cuda")
        assert on_gpu.is_cuda and torch.equal(on_gpu.cpu(), big)
