"""KV in the engine's page pool (``paged_cache.py``): ``full`` and ``streaming`` groups keep their keys and values in
the sequence's pool pages, every decode token of a step is attended in one batched call per layer and ring size,
and a batch of sequences with different lengths, plans and arrival times, squeezed by preemption and recompute,
gives exactly the greedy tokens each gives alone without a pool (fp32)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel path on CPU tensors, before triton.jit decorates

from headwise import paged_cache
from headwise.engine import Engine
from headwise.errors import InputError
from headwise.kernels.common import INTERPRET
from headwise.paged_cache import PagedDenseStore, PagedRingStore
from headwise.plan import HeadPlan
from headwise.policies import AShape, Full, PageTopK, Streaming
from headwise.pool import PagePool, SequencePages
from headwise.spec import ModelSpec
from host_ops import HostOps
from server_common import mixed_plan
from tiny import ARCHS, tiny_model


def greedy_alone(lm, prompt: list[int], n: int, plan: HeadPlan, use_kernels: bool = False) -> list[int]:
    alone = Engine(lm, plan, chunk_size=16, use_kernels=use_kernels)
    return [e.token_id for e in alone.generate(prompt, max_new_tokens=n, stop_token_ids=[]) if e.token_id >= 0]


def run_batch(engine: Engine, prompts, new, arrive, seq_plans) -> tuple[list, int]:
    """Add each sequence at its step, step until all are done; returns the sequences and the preemptions."""
    seqs: list = [None] * len(prompts)
    preempted = step = 0
    while step <= max(arrive) or engine.live:
        for i, at in enumerate(arrive):
            if at == step:
                seqs[i] = engine.add(prompts[i], max_new_tokens=new[i], stop_token_ids=[], plan=seq_plans[i])
        preempted += engine.step().preempted
        step += 1
    return seqs, preempted


def test_full_and_streaming_groups_keep_their_kv_in_the_pool_pages():
    """The pages hold what a sequence's own stores would: the dense keys in position order, the ring's slots with
    the positions the ring holds."""
    lm = tiny_model("llama")
    plan = mixed_plan(lm.spec, window=6)  # sink 2 + window 6: a ring of 8 slots, 2 pages of 4
    prompt = torch.randint(0, 128, (21,), generator=torch.Generator().manual_seed(3)).tolist()
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool)
    assert pool.kv is not None and pool.kv.shape == (pool.num_pages + 1, 2, 4, lm.spec.head_dim), "allocated once"
    seq = engine.add(prompt, max_new_tokens=8, stop_token_ids=[])
    for _ in range(5):  # two prompt chunks, then three decode steps
        engine.step()
    plain = Engine(lm, plan, chunk_size=16).new_cache(1, reserve=40)
    Engine(lm, plan, chunk_size=16).prefill(torch.tensor([prompt + seq.generated[:3]]), plain)
    assert seq.cache is not None and seq.cache.get_seq_length() == 24 == plain.get_seq_length()
    for layer, ref in zip(seq.cache.layers, plain.layers):
        for g, r in zip(layer.groups, ref.groups):
            if isinstance(g.policy, Full):
                assert isinstance(g.store, PagedDenseStore) and g.store.tensors() == []
                torch.testing.assert_close(g.store.view(), r.store.view(), rtol=0, atol=1e-5)
            else:
                assert isinstance(g.store, PagedRingStore) and g.store.capacity == 8
                keys, values, pos = g.store.view()
                rk, rv, rpos = r.store.view()
                order, rorder = pos.argsort(), rpos.argsort()
                assert pos[order].tolist() == rpos[rorder].tolist() == [0, 1, *range(18, 24)]
                torch.testing.assert_close(keys[:, :, order], rk[:, :, rorder], rtol=0, atol=1e-5)
                torch.testing.assert_close(values[:, :, order], rv[:, :, rorder], rtol=0, atol=1e-5)
    assert seq.kv_bytes == seq.pages.held * pool.page_bytes and seq.cache.kv_bytes() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_a_squeezed_batch_under_different_plans_gives_each_sequence_its_tokens_alone(arch):
    """Dense, full + streaming, Quest (its own store beside the pool), an A-shape prefill decoding over the pool and a
    streaming head with compensation (its own store): arrivals at different steps, a pool too small for all, so
    sequences are preempted and recomputed. Gemma 3's sliding layers hold their window as a ring in the pool."""
    lm = tiny_model(arch)
    spec = lm.spec
    a_shape = [[AShape(sink=16, local=16, block_size=16) if spec.layer_windows[i] is None else Full()]
               * spec.num_kv_heads for i in range(spec.num_layers)]
    compensated = [[Full(), Streaming(sink=2, window=6, compensation=True)][: spec.num_kv_heads]] * spec.num_layers
    seq_plans = [HeadPlan.dense(spec), mixed_plan(spec, window=6),
                 HeadPlan.from_policies(spec, [[PageTopK(page_size=4, budget=8)] * spec.num_kv_heads] * spec.num_layers),
                 HeadPlan.from_policies(spec, a_shape), HeadPlan.from_policies(spec, compensated)]
    squeezed_batch_gives_each_its_tokens_alone(lm, seq_plans, [5, 23, 40, 33, 1], [14, 12, 10, 9, 8],
                                               [0, 0, 2, 5, 6], seed=1)


def squeezed_batch_gives_each_its_tokens_alone(lm, seq_plans, lengths, new, arrive, seed):
    """Random prompts of ``lengths`` under ``seq_plans`` arriving at steps ``arrive``, in a pool holding 3/5 of
    the pages they need at most (so it runs dry: preemption and recompute): each gets the greedy tokens it gets
    alone without a pool, and every page is back at the end."""
    spec = lm.spec
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    want = [greedy_alone(lm, p, n, plan) for p, n, plan in zip(prompts, new, seq_plans)]
    probe = PagePool(spec, 1 << 30, dtype_bytes=4, page_size=4)
    most = [SequencePages(probe, plan).pages_at(n + k - 1) for n, k, plan in zip(lengths, new, seq_plans)]
    pool = PagePool(spec, (sum(most) * 3 // 5) * probe.page_bytes, dtype_bytes=4, page_size=4)
    seqs, preempted = run_batch(Engine(lm, chunk_size=16, pool=pool), prompts, new, arrive, seq_plans)
    assert [s.generated for s in seqs] == want
    assert preempted >= 1, "the pool was meant to run dry"
    assert pool.free_pages == pool.num_pages, "every page back at the end"


def test_every_decode_token_of_a_step_is_one_batched_call_per_layer_and_ring_size(monkeypatch):
    lm = tiny_model("llama")
    calls: list[tuple[int, int]] = []
    real = paged_cache.batch_decode_reference

    def counting(q, *args, ring=0, **kw):
        calls.append((q.shape[0], ring))
        return real(q, *args, ring=ring, **kw)

    monkeypatch.setattr(paged_cache, "batch_decode_reference", counting)
    engine = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4))
    plans = [HeadPlan.dense(lm.spec), mixed_plan(lm.spec, window=6), mixed_plan(lm.spec, window=10)]
    for n, plan in zip((3, 9, 12), plans):
        engine.add(list(range(1, n + 1)), max_new_tokens=4, stop_token_ids=[], plan=plan)
    engine.step()  # the three prompts
    calls.clear()
    assert engine.step().decode_rows == 3
    # Per layer: the full heads of all three sequences (2 + 1 + 1 (sequence, KV head) pairs) in one call, the
    # streaming heads of the second and the third (rings of 8 and 12 slots) in one call each.
    assert sorted(calls) == sorted([(4, 0), (1, 8), (1, 12)] * lm.spec.num_layers)


def test_a_decode_step_copies_its_slots_and_positions_to_the_device_once_per_layout(monkeypatch):
    """The decode tokens' slots, positions, places on the forward's token axis and table widths cross from the host in
    one copy per layout and step, shared by every layer (on CUDA an asynchronous one from pinned memory,
    ``host_to_device``), and the rows' heads once per batch of sequences, not one copy per row or per layer; the tokens
    stay each sequence's own."""
    lm = tiny_model("llama")
    assert lm.spec.num_layers >= 2 and lm.spec.group_size == 2
    copies: list[tuple[int, ...]] = []
    real = paged_cache.host_to_device

    def counting(host, device):
        if host.dtype == torch.int64:  # the page tables (int32) cross when they grow, in the pool
            copies.append(tuple(host.shape))
        return real(host, device)

    monkeypatch.setattr(paged_cache, "host_to_device", counting)
    paged_cache._step_rows.cache_clear()
    paged_cache._pair_heads.cache_clear()
    plans = [HeadPlan.dense(lm.spec), mixed_plan(lm.spec, window=6), mixed_plan(lm.spec, window=10)]
    engine = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4))
    seqs = [engine.add(list(range(1, n + 1)), max_new_tokens=4, stop_token_ids=[], plan=plan)
            for n, plan in zip((3, 9, 12), plans)]
    engine.step()  # the three prompts
    rows = [(5, 3), (5, 1), (5, 1)]  # per layout (full heads; rings of 8 and 12): [slots; positions; tokens; widths]
    for step in range(2):
        copies.clear()
        assert engine.step().decode_rows == 3
        # The first step also copies each layout's (row, KV head) pairs: the full heads' 4 pairs (8 query heads, 3
        # rows), a ring's 1 (the two rings' the same), for the layers whose full heads are KV head 0 and the others.
        heads = [(4 * 3 + 8 * 2 + 3,)] * 2 + [(1 * 3 + 2 * 2 + 1,)] * 2 if step == 0 else []
        assert sorted(copies) == sorted(rows + heads)
    for n, plan, seq in zip((3, 9, 12), plans, seqs):
        assert seq.generated[:3] == greedy_alone(lm, list(range(1, n + 1)), 3, plan)


def test_a_pool_of_pages_in_another_dtype_is_refused_in_one_line():
    from headwise.errors import BudgetError

    lm = tiny_model("llama")  # fp32
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=2, page_size=4)
    with pytest.raises(BudgetError, match="sized for pages of"):
        Engine(lm, pool=pool)
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=4, page_size=4)
    Engine(lm, pool=pool)
    assert pool.kv is not None
    with pytest.raises(BudgetError, match="allocated already"):
        pool.allocate("cpu", torch.float32)
    Engine(lm, pool=pool)  # a second engine over the same pages: no second allocation


def _mixed_step_host_work(monkeypatch, rows: int, layers: int) -> tuple[list[tuple[int, ...]], list[str]]:
    """The host-to-device copies (shapes) and the clones and pads of one step that carries a prompt chunk beside
    ``rows`` decoding sequences (full, streaming and Quest heads: three pool layouts, bound tables included) of a
    ``layers``-layer model, every sequence growing a page in the step."""
    from headwise import pool as pool_module

    lm = tiny_model("llama", num_hidden_layers=layers)
    engine = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 23, dtype_bytes=4, page_size=4))
    plans = [mixed_plan(lm.spec, window=6), quest_plan(lm.spec, budget=8, with_full=True)]
    for i in range(rows):
        engine.add(list(range(1, 8)), max_new_tokens=8, stop_token_ids=[], plan=plans[i % 2])
    engine.step(prefill_tokens=1 << 20)  # every prompt (7 tokens: 2 pages of 4 each)
    engine.add(list(range(1, 41)), max_new_tokens=1, stop_token_ids=[])
    engine.step()  # its first chunk beside the first decode tokens (the 8th token of each: a page to fill)
    copies: list[tuple[int, ...]] = []
    real = paged_cache.host_to_device

    def counting(host, device):
        copies.append(tuple(host.shape))
        return real(host, device)

    with monkeypatch.context() as m, HostOps() as ops:
        m.setattr(paged_cache, "host_to_device", counting)
        m.setattr(pool_module, "host_to_device", counting)
        info = engine.step()  # its second chunk; the 9th token of each sequence takes a page in every layer
    assert info.decode_rows == rows and info.prefill_tokens == 16
    return copies, [n for n, _ in ops.ops if n in ("aten.clone.default", "aten.pad.default",
                                                   "aten.constant_pad_nd.default")]


def test_a_mixed_step_makes_no_host_copy_or_clone_per_decode_row_or_layer(monkeypatch):
    """A step of a prompt chunk and decode rows under three pool layouts: the page ids every sequence took in every
    layer cross from the host in one copy (``PagePool.sync_tables``), the rows' slots, positions, tokens and widths in
    one per layout (``_step_rows``), and the rows' page and bound-page tables are joined on the device without a pad
    or clone per row (``_pair_tables``): the same four copies and no clone at 3 rows x 2 layers as at 16 x 4 (a pad per
    row per layer, and a copy per layer and layout, before)."""
    paged_cache._step_rows.cache_clear()
    small, small_clones = _mixed_step_host_work(monkeypatch, 3, 2)
    paged_cache._step_rows.cache_clear()
    big, big_clones = _mixed_step_host_work(monkeypatch, 16, 4)
    assert small_clones == big_clones == []
    # Per layout [slots; positions; tokens; widths; bound widths] of its rows (Quest, streaming, full), and the pages
    # taken: one in each full and Quest group of every decode row (16 rows: 8 of one, 8 of two; the rings hold their 8
    # slots already) and 4 in each of the chunk's 2 KV heads (16 tokens), in each of the 4 layers.
    assert sorted(small) == [(5, 1), (5, 2), (5, 3), (2 * (2 * 1 + 1 * 2 + 2 * 4),)]
    assert sorted(big) == [(5, 8), (5, 8), (5, 16), (4 * (8 * 1 + 8 * 2 + 2 * 4),)]


def quest_plan(spec, budget: int, with_full: bool = False) -> HeadPlan:
    """Quest (pages of 4) on every KV head, or on every second one beside ``full`` heads (two groups per layer)."""
    quest = PageTopK(page_size=4, budget=budget)
    row = [Full() if with_full and h % 2 == 0 else quest for h in range(spec.num_kv_heads)]
    return HeadPlan.from_policies(spec, [row] * spec.num_layers)


def test_page_topk_groups_keep_their_kv_and_page_bounds_in_the_pool_pages():
    """Quest's keys and values sit in the sequence's pages, its page bounds in bound pages beside them: the bounds are
    the channel-wise min and max a non-pool ``PagedStore`` computes from the same keys, and the KV bytes reported are
    the pages held (bound pages included) x page bytes."""
    from headwise.policies.stores import PagedStore

    lm = tiny_model("llama")
    plan = quest_plan(lm.spec, budget=12, with_full=True)
    prompt = torch.randint(0, 128, (21,), generator=torch.Generator().manual_seed(5)).tolist()
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=4, page_size=4)
    engine = Engine(lm, plan, chunk_size=16, pool=pool)
    seq = engine.add(prompt, max_new_tokens=8, stop_token_ids=[])
    alone = Engine(lm, plan, chunk_size=16)  # no pool: Quest's own ``PagedStore``, the same steps
    ref_seq = alone.add(prompt, max_new_tokens=8, stop_token_ids=[])
    for _ in range(5):  # two prompt chunks (16 + 5 tokens), then three decode steps: 24 tokens, the last page full
        engine.step()
        alone.step()
    assert seq.cache is not None and ref_seq.cache is not None and seq.cache.get_seq_length() == 24
    assert seq.generated == ref_seq.generated
    quest_groups = 0
    for layer, ref in zip(seq.cache.layers, ref_seq.cache.layers):
        for g, r in zip(layer.groups, ref.groups):
            torch.testing.assert_close(g.store.view(), r.store.view(), rtol=0, atol=1e-5)
            assert g.store.tensors() == []
            if not isinstance(g.policy, PageTopK):
                continue
            quest_groups += 1
            assert isinstance(g.store, paged_cache.PagedQuestStore) and g.store.num_pages == 6
            keys, values = g.store.view()
            own = PagedStore(1, g.store.pages.heads, lm.spec.head_dim, keys.device, keys.dtype, page_size=4)
            own.reserve(24)
            for a, b in ((0, 16), (16, 21), (21, 22), (22, 23), (23, 24)):  # as the engine wrote them
                own.append(keys[:, :, a:b], values[:, :, a:b])
            assert torch.equal(g.store.page_bounds(), own.page_bounds())
            torch.testing.assert_close(g.store.page_bounds(), r.store.page_bounds(), rtol=0, atol=1e-5)
            assert [len(b) for b in g.pages.bound_pages] == [2] * g.pages.heads, "6 pages of bounds: 2 bound pages"
    assert quest_groups == lm.spec.num_layers
    # Per layer: one full head of 6 pages, one Quest head of 6 pages + 2 bound pages.
    assert seq.pages.held == lm.spec.num_layers * (6 + 6 + 2)
    assert seq.kv_bytes == seq.pages.held * pool.page_bytes and seq.cache.kv_bytes() == 0


def test_batched_page_choice_over_the_pool_is_quests_choice_from_the_store():
    """``select_pool_pages`` over rows of different lengths picks, per row, the pages ``PageTopK.select`` picks from a
    non-pool store holding the same keys (first and newest page always; a row with fewer pages than the budget gets
    all of them, the rest of its picks -1)."""
    from headwise.policies.stores import PagedStore
    from headwise.pool import GroupPages

    gen = torch.Generator().manual_seed(6)
    lm = tiny_model("llama")
    D, P, group, select = lm.spec.head_dim, 4, 3, 4
    policy = PageTopK(page_size=P, budget=select * P)
    pool = PagePool(lm.spec, 1 << 20, dtype_bytes=4, page_size=P)
    pool.allocate("cpu", torch.float32)
    perm = torch.randperm(pool.num_pages, generator=gen).tolist()  # pages handed out in a shuffled order
    lengths = [37, 5, 16, 61]
    rows, want = [], []
    for n in lengths:
        pages = -(-n // P)
        gp = GroupPages(policy, 1, [[perm.pop() for _ in range(pages)]], [[perm.pop() for _ in range(-(-pages // P))]])
        store = paged_cache.PagedQuestStore(pool, gp, policy.paged_layout(), torch.device("cpu"), torch.float32)
        own = PagedStore(1, 1, D, torch.device("cpu"), torch.float32, page_size=P)
        own.reserve(n)
        k, v = torch.randn(2, 1, 1, n, D, generator=gen)
        for a in range(0, n, 16):  # chunks of 16, as a prefill
            store.append(k[:, :, a : a + 16], v[:, :, a : a + 16])
            own.append(k[:, :, a : a + 16], v[:, :, a : a + 16])
        q = torch.randn(1, group, D, generator=gen)
        rows.append((q, gp))
        want.append(sorted(policy.select(q, own, use_kernels=False)[0, 0].tolist()))
    q = torch.cat([q for q, _ in rows])  # [rows, group, D]
    bound_table = paged_cache._padded_tables([gp.bound_table() for _, gp in rows])
    chosen = paged_cache.select_pool_pages(q, pool.keys, pool.values, P, bound_table, torch.tensor(lengths),
                                           max(lengths), select)
    assert chosen.shape == (4, 1, select) and chosen.dtype == torch.int32
    got = [sorted(c for c in row[0].tolist() if c >= 0) for row in chosen]
    assert got == want
    assert got[1] == [0, 1] and 0 in got[0] and 9 in got[0] and 15 in got[3], "first and newest page kept"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_a_squeezed_batch_of_quest_sequences_gives_each_its_tokens_alone(arch):
    """Quest in the pool choosing fewer pages than it holds (budgets of 3 and 4 pages of 4 over prompts of up to 45
    tokens), alone and beside full heads, with dense and streaming sequences: different lengths and arrivals, a pool
    too small for all (preemption and recompute), exactly the greedy tokens of each alone without a pool."""
    lm = tiny_model(arch)
    spec = lm.spec
    seq_plans = [quest_plan(spec, budget=12), quest_plan(spec, budget=16, with_full=True), HeadPlan.dense(spec),
                 quest_plan(spec, budget=12, with_full=True), mixed_plan(spec, window=6)]
    squeezed_batch_gives_each_its_tokens_alone(lm, seq_plans, [45, 30, 9, 38, 20], [12, 10, 9, 11, 8],
                                               [0, 0, 1, 3, 4], seed=7)


def test_quest_decode_tokens_of_a_step_are_one_selected_call_per_layer(monkeypatch):
    lm = tiny_model("llama")
    calls: list[tuple[int, bool]] = []
    real = paged_cache.batch_decode_reference

    def counting(q, *args, selected=None, **kw):
        calls.append((q.shape[0], selected is not None))
        return real(q, *args, selected=selected, **kw)

    monkeypatch.setattr(paged_cache, "batch_decode_reference", counting)
    engine = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4))
    for n in (3, 30, 14):
        engine.add(list(range(1, n + 1)), max_new_tokens=4, stop_token_ids=[], plan=quest_plan(lm.spec, 12, True))
    engine.step()
    engine.step()  # the prompts (30 tokens: two chunks)
    calls.clear()
    assert engine.step().decode_rows == 3
    # Per layer: the full heads of the three sequences in one call, their Quest heads in one selected call.
    assert sorted(calls) == sorted([(3, False), (3, True)] * lm.spec.num_layers)


def test_quest_in_pages_of_another_size_or_with_8bit_bounds_keeps_its_own_store():
    from headwise.policies.stores import PagedStore

    lm = tiny_model("llama")
    pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool)
    for policy in (PageTopK(page_size=8, budget=16), PageTopK(page_size=4, budget=8, bounds="e4m3")):
        plan = HeadPlan.from_policies(lm.spec, [[policy] * lm.spec.num_kv_heads] * lm.spec.num_layers)
        seq = engine.add([1, 2, 3, 4, 5], max_new_tokens=3, stop_token_ids=[], plan=plan)
        engine.step()  # the prompt
        assert seq.cache is not None
        assert all(type(g.store) is PagedStore for g in seq.cache.layers[0].groups)
        while engine.live:
            engine.step()


KERNEL_CASES = {
    # full pages and streaming rings (``full`` / ``ring`` modes)
    "full-and-rings": (lambda spec: [HeadPlan.dense(spec), mixed_plan(spec, window=6)], (7, 19), 5, 2),
    # Quest over the pool (``selected`` mode)
    "quest": (lambda spec: [quest_plan(spec, budget=12), quest_plan(spec, budget=12, with_full=True)], (27, 18), 4, 8),
}


@pytest.mark.skipif(not INTERPRET, reason="the tiny model's CPU tensors on the kernel path need TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_the_triton_kernel_path_gives_the_same_tokens_as_each_sequence_alone(case):
    """``use_kernels=True`` on CPU tensors: ``batch_decode`` under Triton's interpreter."""
    make_plans, lengths, new, seed = KERNEL_CASES[case]
    lm = tiny_model("llama")
    seq_plans = make_plans(lm.spec)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    want = [greedy_alone(lm, p, new, plan) for p, plan in zip(prompts, seq_plans)]
    pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
    seqs, _ = run_batch(Engine(lm, chunk_size=16, pool=pool, use_kernels=True), prompts, [new, new], [0, 1],
                        seq_plans)
    assert [s.generated for s in seqs] == want


@pytest.mark.skipif(not INTERPRET, reason="the tiny model's CPU tensors on the kernel path need TRITON_INTERPRET=1")
def test_prompt_chunks_on_the_paged_prefill_kernel_give_the_same_tokens_as_each_sequence_alone(monkeypatch):
    """``use_kernels=True`` on CPU tensors: the prompt chunks of ``full`` and ``page_topk`` groups run on
    ``paged_prefill`` (Triton's interpreter), several sequences' chunks per launch (a step's prompt budget of 40
    tokens), beside streaming groups that still attend through their own ``attend`` in the same layers; the
    decode steps on ``batch_decode``. Prompts of 37, 21 and 50 tokens: chunks at starts 0, 16, 32, 48, last chunks
    of 5, 5 and 2 tokens (page 4: partial pages)."""
    dense_chunks_on_the_paged_prefill_kernel(tiny_model("llama"), monkeypatch)


@pytest.mark.gpu
def test_prompt_chunks_on_the_compiled_paged_prefill_kernel_give_the_same_tokens_as_each_sequence_alone(monkeypatch):
    """The same on CUDA (fp32, pages of 4 under key blocks of 32): the compiled kernel in the engine."""
    lm = tiny_model("llama")
    lm.model.to("cuda")
    dense_chunks_on_the_paged_prefill_kernel(lm, monkeypatch)


def dense_chunks_on_the_paged_prefill_kernel(lm, monkeypatch) -> None:
    from headwise.kernels import paged_prefill as kernel

    spec = lm.spec
    seq_plans = [HeadPlan.dense(spec), mixed_plan(spec, window=6), quest_plan(spec, budget=12, with_full=True)]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (37, 21, 50)]
    want = [greedy_alone(lm, p, 2, plan) for p, plan in zip(prompts, seq_plans)]
    launches: list[list[tuple[int, int, int]]] = []  # per launch: (token, start, length) of each row
    real = kernel.paged_prefill

    def counting(q, k_pool, v_pool, table, plan, *args, **kw):
        launches.append([(t, s, n) for t, n, s, _ in plan.rows.tolist()])
        return real(q, k_pool, v_pool, table, plan, *args, **kw)

    monkeypatch.setattr(kernel, "paged_prefill", counting)
    pool = PagePool(spec, 1 << 22, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool, use_kernels=True)
    seqs = [engine.add(p, max_new_tokens=2, stop_token_ids=[], plan=plan) for p, plan in zip(prompts, seq_plans)]
    while engine.live:
        engine.step(prefill_tokens=40)
    assert [s.generated for s in seqs] == want
    assert pool.free_pages == pool.num_pages, "every page back at the end"
    assert launches and max(len({t for t, _, _ in rows}) for rows in launches) > 1, "chunks of several sequences"
    # Every chunk of several tokens, in every layer, went through the kernel: one row per dense KV head.
    chunks = [[(s, min(16, len(p) - s)) for s in range(0, len(p), 16) if len(p) - s > 1] for p in prompts]
    dense_heads = [sum(isinstance(pol, Full | PageTopK) for row in plan.policies() for pol in row) for plan in seq_plans]
    assert sum(len(rows) for rows in launches) == sum(h * len(c) for h, c in zip(dense_heads, chunks))
    assert {(s, n) for rows in launches for _, s, n in rows} == {c for cs in chunks for c in cs}


@pytest.mark.skipif(not INTERPRET, reason="the tiny model's CPU tensors on the kernel path need TRITON_INTERPRET=1")
def test_dense_prefill_gather_attends_prompt_chunks_over_a_gathered_copy_with_the_same_tokens(monkeypatch):
    """``Engine(dense_prefill="gather")`` with the kernels on: the dense prompt chunks of pool groups attend a
    gathered copy (SDPA), the paged prefill kernel is never launched, the decode steps still run on the kernels, and
    every sequence gets the tokens it gets alone and under ``"paged"``."""
    from headwise.kernels import paged_prefill as kernel

    lm = tiny_model("llama")
    seq_plans = [HeadPlan.dense(lm.spec), mixed_plan(lm.spec, window=6)]
    gen = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (37, 21)]
    want = [greedy_alone(lm, p, 3, plan) for p, plan in zip(prompts, seq_plans)]
    launches = []
    real = kernel.paged_prefill
    monkeypatch.setattr(kernel, "paged_prefill", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    got = {}
    for how in ("gather", "paged"):
        pool = PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4)
        engine = Engine(lm, chunk_size=16, pool=pool, use_kernels=True, dense_prefill=how)
        seqs = [engine.add(p, max_new_tokens=3, stop_token_ids=[], plan=plan) for p, plan in zip(prompts, seq_plans)]
        while engine.live:
            engine.step(prefill_tokens=40)
        got[how] = ([s.generated for s in seqs], len(launches))
        assert pool.free_pages == pool.num_pages
    assert got["gather"] == (want, 0), "no paged prefill launch under gather"
    assert got["paged"][0] == want and got["paged"][1] > 0


def test_an_unknown_dense_prefill_is_a_clear_error():
    with pytest.raises(InputError, match="dense_prefill must be one of paged, gather, got 'flash'"):
        Engine(tiny_model("llama"), dense_prefill="flash")


def test_quest_in_the_pool_can_take_the_padded_step_and_quest_beside_it_cannot():
    from headwise.batch_graphs import padded_blockers

    lm = tiny_model("llama")
    assert padded_blockers(quest_plan(lm.spec, budget=12, with_full=True), lm.spec, 4) == []
    e4m3 = HeadPlan.from_policies(lm.spec, [[PageTopK(page_size=4, budget=8, bounds="e4m3")] * lm.spec.num_kv_heads]
                                  * lm.spec.num_layers)
    assert padded_blockers(e4m3, lm.spec, 4) == ["policies keeping their own store beside the pool: quest8/4e4m3"]
    assert padded_blockers(quest_plan(lm.spec, budget=12), lm.spec, 8) == [
        "policies keeping their own store beside the pool: quest12/4"], "Quest in pages of 4, a pool of pages of 8"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_pool_page_scores_equal_the_reference(dtype):
    """``kernels.pool_quest.pool_page_scores`` (TRITON_INTERPRET=1 on the CPU) against the plain-PyTorch scores:
    ragged rows, a zero-length row (a padding row: every column -inf), GQA 3:1, head_dim 40, columns for a longer
    limit than any row, bound pages shuffled over the pool; then the same pages chosen."""
    from headwise.kernels.pool_quest import pool_page_scores

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(9)
    P, D, group = 4, 40, 3
    lengths = torch.tensor([37, 5, 0, 61, 4])
    pages = [-(-n // P) for n in lengths.tolist()]
    bound_pages = [-(-n // P) for n in pages]
    n_pool = 64
    kv = torch.randn(n_pool, 2, P, D, generator=gen).to(device, dtype)
    perm = torch.randperm(n_pool, generator=gen)
    width = max(bound_pages)
    table = torch.zeros(len(lengths), 1, width, dtype=torch.int32)
    at = 0
    for r, m in enumerate(bound_pages):
        table[r, 0, :m] = perm[at : at + m]
        at += m
    q = torch.randn(len(lengths), group, D, generator=gen).to(device, dtype)
    table, lengths = table.to(device), lengths.to(device)
    n_cols = 20  # a limit of 80 tokens
    want = paged_cache.pool_page_scores_reference(q, kv[:, 0], kv[:, 1], P, table, lengths, n_cols)
    got = pool_page_scores(q, kv[:, 0], kv[:, 1], P, table, lengths, n_cols)
    assert torch.equal(got.isinf(), want.isinf()) and torch.equal(got.isposinf(), want.isposinf())
    assert got[2].isneginf().all() and got[3, :16].isfinite().sum() == 14, "a padding row; 16 pages, both ends +inf"
    finite = want.isfinite()
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-4)
    chosen = [paged_cache.select_pool_pages(q, kv[:, 0], kv[:, 1], P, table, lengths, 4 * n_cols, 3, use_kernels=k)
              for k in (False, True)]
    assert [sorted(r[0].tolist()) for r in chosen[0]] == [sorted(r[0].tolist()) for r in chosen[1]]


@pytest.mark.parametrize("chunks", [(1, 1, 3, 2, 9), (2, 5, 12), (4, 4, 4), (17,)])
def test_a_ring_writes_a_prompt_chunk_into_its_pages_without_host_syncs(chunks):
    """Chunks shorter than the sinks, across their end, shorter and longer than the window: the ring's pages hold
    what ``SinkWindowStore`` holds, and writing a chunk runs no op sized by tensor values (on a GPU, a boolean
    mask compacted or a nonzero stops the host until the device drains, in every layer of every prompt chunk)."""
    policy = Streaming(sink=3, window=5)
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=4, num_kv_heads=2, head_dim=8,
                     max_context=4096)
    pool = PagePool(spec, 1 << 20, dtype_bytes=4, page_size=4)
    pool.allocate("cpu", torch.float32)
    assert pool.kv is not None
    pool.kv.fill_(float("nan"))  # a slot the ring did not write reads as NaN
    pages = SequencePages(pool, HeadPlan.from_policies(spec, [[policy, policy]]))
    store = paged_cache.paged_store(pool, pages.groups[0][0], torch.device("cpu"), torch.float32)
    assert isinstance(store, PagedRingStore)
    ref = policy.make_store(1, 2, 8, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    for n in chunks:
        k, v = torch.randn(1, 2, n, 8, generator=gen), torch.randn(1, 2, n, 8, generator=gen)
        assert pages.grow(store.seen + n)
        pages.groups[0][0].table()  # a grown table is made outside the recorded write, as once per step
        with HostOps() as ops:
            store.append(k, v)
        assert ops.value_sized() == []
        ref.append(k, v)
        keys, values, pos = store.view()
        rk, rv, rpos = ref.view()
        held = rpos >= 0
        order, rorder = pos.argsort(), rpos[held].argsort()
        assert pos[order].tolist() == rpos[held][rorder].tolist()
        torch.testing.assert_close(keys[:, :, order], rk[:, :, held][:, :, rorder], rtol=0, atol=0)
        torch.testing.assert_close(values[:, :, order], rv[:, :, held][:, :, rorder], rtol=0, atol=0)
