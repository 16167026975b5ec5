"""``Engine.add`` / ``Engine.step``: sequences of different lengths, plans and arrival times advance together
(prompt chunks packed beside decode tokens in one forward) and each produces exactly what it produces alone;
``generate`` and the server's scheduler give the same text; a failure ends only the sequences it touched."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine, SamplingParams
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import AShape, Full, PageTopK, Policy
from server_common import mixed_plan
from tiny import ARCHS, tiny_model


def uniform_plan(spec, policy: Policy) -> HeadPlan:
    """``policy`` on every KV head (prefill patterns only on global-attention layers, as they require)."""
    rows = [[policy if spec.layer_windows[i] is None or not isinstance(policy, AShape) else Full()]
            * spec.num_kv_heads for i in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, rows)


def plans(spec) -> list[HeadPlan]:
    """Dense; full + streaming heads whose window the prompts overflow; Quest pages; an A-shape prefill."""
    return [HeadPlan.dense(spec), mixed_plan(spec, window=6), uniform_plan(spec, PageTopK(page_size=4, budget=8)),
            uniform_plan(spec, AShape(sink=16, local=16, block_size=16))]


def greedy_alone(engine: Engine, prompt: list[int], n: int, plan: HeadPlan) -> list[int]:
    alone = Engine(engine.lm, plan, chunk_size=engine.chunk_size)
    return [e.token_id for e in alone.generate(prompt, max_new_tokens=n, stop_token_ids=[]) if e.token_id >= 0]


@pytest.mark.parametrize("arch", ARCHS)
def test_sequences_with_different_lengths_plans_and_arrivals_equal_each_alone(arch):
    lm = tiny_model(arch)
    engine = Engine(lm, chunk_size=16)
    gen = torch.Generator().manual_seed(1)
    lengths, new, arrive = [5, 23, 40, 70], [6, 10, 8, 5], [0, 0, 3, 7]  # 40, 70 pass Gemma 3's window of 16
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in lengths]
    seq_plans = plans(lm.spec)
    want = [greedy_alone(engine, p, n, plan) for p, n, plan in zip(prompts, new, seq_plans)]

    seqs: list = [None] * len(prompts)
    mixed_steps = 0
    step = 0
    while step <= max(arrive) or engine.live:
        for i, at in enumerate(arrive):
            if at == step:
                seqs[i] = engine.add(prompts[i], max_new_tokens=new[i], stop_token_ids=[], plan=seq_plans[i])
        info = engine.step()
        assert info.prefill_tokens < 2 * engine.chunk_size, "about one chunk of prompt per step"
        mixed_steps += info.decode_rows > 0 and info.prefill_tokens > 0
        step += 1
    assert [s.generated for s in seqs] == want
    assert mixed_steps >= 2, "prompt chunks must have run beside decode tokens"
    assert all(s.finish_reason == "length" and s.cache is None for s in seqs)


def test_a_finished_sequence_keeps_its_cache_only_when_asked():
    """``keep_cache``: a finished sequence keeps its cache as the last step left it (all its tokens, the bytes its
    stats recorded) and nothing else; without it the engine frees the cache. Generation is the same either way.
    Under a page pool it is refused: a finished sequence gives its pages back."""
    from headwise.errors import InputError
    from headwise.pool import PagePool

    lm = tiny_model("llama")
    engine = Engine(lm, mixed_plan(lm.spec, window=6), chunk_size=16)
    prompt = list(range(1, 21))
    kept = engine.add(prompt, max_new_tokens=5, stop_token_ids=[], keep_cache=True)
    freed = engine.add(prompt, max_new_tokens=5, stop_token_ids=[])
    while engine.live:
        engine.step()
    assert freed.cache is None and kept.cache is not None and kept.graphs is None
    assert kept.cache.get_seq_length() == kept.max_tokens == 24
    assert engine.kv_bytes(kept.cache) == kept.stats.kv_bytes == freed.stats.kv_bytes > 0
    assert kept.generated == freed.generated == greedy_alone(engine, prompt, 5, engine.plan)
    pooled = Engine(lm, chunk_size=16, pool=PagePool(lm.spec, 1 << 22, dtype_bytes=4, page_size=4))
    with pytest.raises(InputError, match="keep_cache needs an engine without a page pool"):
        pooled.add(prompt, max_new_tokens=5, keep_cache=True)


def test_abandoned_generate_leaves_nothing_live():
    engine = Engine(tiny_model("llama"), chunk_size=16)
    events = engine.generate(list(range(1, 30)), max_new_tokens=20, stop_token_ids=[])
    next(events), next(events)
    events.close()
    assert engine.live == []


class _FailingTokenizer:
    """A tokenizer (stand-in for a third-party one) that cannot decode token ``bad``."""

    eos_token_id = None

    def __init__(self, bad: int):
        self.bad = bad

    def decode(self, ids, skip_special_tokens=True):
        if self.bad in ids:
            raise ValueError(f"cannot decode token {self.bad}")
        return " ".join(map(str, ids))


def test_a_failing_sequence_ends_alone_and_the_others_go_on():
    base = tiny_model("llama")
    gen = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, 128, (n,), generator=gen).tolist() for n in (12, 30))
    want_a = greedy_alone(Engine(base, chunk_size=16), a, 8, HeadPlan.dense(base.spec))
    want_b = greedy_alone(Engine(base, chunk_size=16), b, 8, HeadPlan.dense(base.spec))
    bad = next(t for t in want_a[2:] if t not in want_b)
    lm = LoadedModel(base.name, base.model, _FailingTokenizer(bad), base.spec, base.source)
    engine = Engine(lm, chunk_size=16)
    sa = engine.add(a, SamplingParams(max_new_tokens=8))
    sb = engine.add(b, SamplingParams(max_new_tokens=8))
    while engine.live:
        engine.step()
    assert sa.finish_reason == "error" and isinstance(sa.error, ValueError) and sa.cache is None
    assert sa.generated == want_a[: want_a.index(bad) + 1]
    assert sb.error is None and sb.generated == want_b
    with pytest.raises(ValueError, match="cannot decode"):
        list(engine.generate(a, max_new_tokens=8))
    assert engine.live == []


# --------------------------------------------------------------------------- generate == server (real model)
CASES = [
    # Emoji split over several byte tokens: never a half character in an event.
    ("Emoji story: 🐱🐶", ()),
    # Japanese, split characters, and a stop string whose first character ("バ") appears before it does.
    ("日本語の文章を書いてください。東京は", ("バス",)),
    ("The capital of France is", ("\n\n", " Paris.")),
]


def _serve_one(engine: Engine, prompt: str, params: SamplingParams, kv_budget: int):
    """``prompt`` through the server's scheduler over ``engine`` until it finishes: (the events it emitted, the
    scheduler)."""
    from headwise.server.scheduler import GenRequest, Scheduler

    emitted: list = []
    scheduler = Scheduler(engine, max_batch=2, kv_budget_bytes=kv_budget, max_queue=2)
    eos = {engine.lm.tokenizer.eos_token_id}
    req = GenRequest("r", engine.encode(prompt)[0].tolist(), params, eos, emitted.append)
    scheduler.submit(req)
    with scheduler._cond:
        scheduler._admit()
    while not req.finished:
        scheduler.step()
    return emitted, scheduler


@pytest.mark.parametrize(("prompt", "stop"), CASES)
def test_generate_and_the_server_scheduler_give_identical_text(smollm2, prompt, stop):
    engine = Engine(smollm2, mixed_plan(smollm2.spec, window=8))
    params = SamplingParams(max_new_tokens=24, stop=stop)
    offline = [e.text for e in engine.generate(prompt, params)]
    emitted, _ = _serve_one(engine, prompt, params, 1 << 30)
    served = [e.text for e in emitted if e.kind == "token"]
    assert "".join(served) == "".join(offline)
    assert [t for t in offline if t] == served, "the same pieces, released at the same tokens"
    assert not any("\ufffd" in t for t in served[:-1]), "a half character is held back until it is whole"
    if stop:
        text = "".join(served)
        assert emitted[-1].finish_reason == "stop" or not any(s in text for s in stop)
        assert not any(s in text for s in stop)


@pytest.mark.parametrize(("prompt", "stop"), CASES)
def test_the_server_over_a_page_pool_with_multi_step_gives_generates_text(smollm2, prompt, stop):
    """The scheduler driving an engine over a page pool whose decode steps run 4 forwards in a row (the tokens handed
    out four at a time) streams the pieces ``Engine.generate`` gives one step at a time: stop strings, held-back
    half characters and all."""
    from headwise.pool import PagePool

    plan = mixed_plan(smollm2.spec, window=8)
    params = SamplingParams(max_new_tokens=24, stop=stop)
    offline = [e.text for e in Engine(smollm2, plan).generate(prompt, params)]
    pool = PagePool(smollm2.spec, 1 << 26, dtype_bytes=4, page_size=16)
    engine = Engine(smollm2, plan, pool=pool, padded_decode=True, multi_step=4)
    runs: list[int] = []
    step = engine.step

    def recorded(*args):
        info = step(*args)
        runs.append(info.decode_steps)
        return info

    engine.step = recorded  # type: ignore[method-assign]
    emitted, scheduler = _serve_one(engine, prompt, params, pool.num_pages * pool.page_bytes)
    served = [e.text for e in emitted if e.kind == "token"]
    assert [t for t in offline if t] == served
    assert max(runs) == 4 and scheduler.metrics.decode_steps == sum(runs), runs
    assert pool.free_pages == pool.num_pages
