"""ACT's hidden-sink calibration (policy ``act``): the paper's map edit, its place in the engine, its memory, and the
profiler's per-head choice."""

from __future__ import annotations

import pytest
import torch

from headwise.engine import Engine
from headwise.errors import PlanError
from headwise.plan import HeadPlan
from headwise.policies import ACT, Full, build_policy
from headwise.policies.act import act_attention, hidden_sinks
from headwise.policies.base import causal_attention
from headwise.profile.act import choose_act_heads, mean_loss, with_act
from tiny import tiny_model


def paper_act(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: float, thres: float) -> torch.Tensor:
    """ACT's own edit of one head's map (``atten_process_eval`` in the authors' code), transcribed: q, k, v [L, D]."""
    L = q.shape[0]
    scores = (q @ k.T) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    head = scores.softmax(-1)
    indices = torch.nonzero(torch.where(head.sum(0) / torch.arange(L, 0, -1) > thres, 1, 0))
    indices = indices[1:]
    copied = head.clone()
    available = head[:, indices].sum(dim=1) * (1 - beta)
    head[:, indices] *= beta
    copied[1:, indices] *= 0
    ratios = copied / copied.sum(dim=1, keepdim=True)
    head = head + available * ratios
    head[0, 0] = 1
    return head @ v


def planted(L: int = 40, D: int = 16, sinks: tuple[int, ...] = (7, 19), seed: int = 0):
    """Random queries and keys, except that every query has a strong affinity for the keys in ``sinks`` (and
    for key 0), which become sinks."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, D, generator=g)
    k = torch.randn(L, D, generator=g)
    v = torch.randn(L, D, generator=g)
    q[:, 0] = 4.0
    for j in (0, *sinks):
        k[j, 0] = 4.0
    return q, k, v


def test_act_reproduces_the_papers_edit_of_the_attention_map():
    q, k, v = planted()
    want = paper_act(q, k, v, beta=0.4, thres=0.1)
    received = torch.zeros(1, 1, q.shape[0])
    got = act_attention(q[None, None], k[None, None], v[None, None], received, 0, q.shape[-1] ** -0.5, 0.4, 0.1)
    sinks = hidden_sinks(received, q.shape[0], 1, 0.1)[0, 0]
    assert sinks[[7, 19]].all() and not sinks[0], "planted sinks found, the initial one left alone"
    assert torch.allclose(got[0, 0], want, atol=1e-5)
    plain = causal_attention(q[None, None], k[None, None], v[None, None], 0, q.shape[-1] ** -0.5)
    assert (got - plain).abs().max() > 1e-2, "calibration must change the output here"


def test_act_with_beta_one_or_no_sinks_is_full_attention():
    lm = tiny_model("llama")
    ids = torch.randint(0, 128, (2, 70))
    dense = Engine(lm, chunk_size=32).logits(ids)
    for policy in (ACT(beta=1.0), ACT(threshold=1.0)):
        got = Engine(lm, HeadPlan.uniform(lm.spec, policy.to_spec()), chunk_size=32).logits(ids)
        assert (got - dense).abs().max().item() <= 1e-4


def test_act_column_sums_count_every_query_of_prefill_and_decode():
    """Every query row hands out one unit of attention per query head: after a 50-token prefill and 3 decode steps
    the store's column sums of a KV head add up to 53 x its query heads."""
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, ACT(threshold=0.05).to_spec())
    eng = Engine(lm, plan, chunk_size=1000)
    ids = torch.randint(0, 128, (1, 50))
    cache = eng.new_cache(1, reserve=53)
    eng.prefill(ids, cache)
    for t in (3, 5, 7):
        eng.forward(torch.tensor([[t]]), cache)
    store = cache.layers[0].groups[0].store
    assert store.length == 53
    assert torch.allclose(store.received[:, :, :53].sum(-1), torch.full((1, 2), 53.0 * lm.spec.group_size), atol=1e-3)


def test_act_cache_counts_its_column_sums():
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, ACT().to_spec())
    eng = Engine(lm, plan)
    cache = eng.new_cache(1, reserve=60)
    eng.prefill(torch.randint(0, 128, (1, 60)), cache)
    assert cache.kv_bytes() == plan.kv_bytes(lm.spec, 60, 4)  # fp32 model: 4-byte keys and values


@pytest.mark.parametrize("bad", [{"beta": 1.5}, {"threshold": -0.1}, {"beta": "x"}])
def test_act_rejects_bad_parameters(bad):
    with pytest.raises(PlanError, match="act"):
        build_policy({"policy": "act", "params": bad})


def test_act_on_a_native_sliding_window_layer_is_refused():
    lm = tiny_model("gemma3_text")
    pols = [[ACT() if i == 0 else Full()] * lm.spec.num_kv_heads for i in range(lm.spec.num_layers)]
    with pytest.raises(PlanError, match="sliding window"):
        Engine(lm, HeadPlan.from_policies(lm.spec, pols)).logits(torch.randint(0, 128, (1, 20)))


def test_profiler_tries_every_full_head_and_ignores_noise_sized_gains():
    """On a tiny random model the per-head losses are real (each head's delta is its loss with ACT alone), and
    gains of noise size (~1e-7 nats, whose sign depends on the CPU's arithmetic) switch nothing on at the default
    margin."""
    lm = tiny_model("llama")
    g = torch.Generator().manual_seed(1)
    held_in, held_out = torch.randint(0, 128, (1, 96), generator=g), torch.randint(0, 128, (1, 96), generator=g)
    base = [[Full()] * lm.spec.num_kv_heads for _ in range(lm.spec.num_layers)]
    act = ACT(threshold=0.05)
    choice = choose_act_heads(lm, base, held_in, held_out, act=act, margin=0.0, progress=False)
    assert len(choice.delta) == lm.spec.num_layers * lm.spec.num_kv_heads  # every full head was tried
    i, j = next(iter(choice.delta))
    alone = mean_loss(lm, with_act(base, [(i, j)], act), held_in) - choice.base_loss
    assert abs(alone - choice.delta[(i, j)]) < 1e-6
    default = choose_act_heads(lm, base, held_in, held_out, act=act, progress=False)
    assert default.heads == [], "noise-sized gains switch nothing on at the default margin"
    strict = choose_act_heads(lm, base, held_in, held_out, act=act, margin=1e9, progress=False)
    assert strict.heads == [] and strict.held_out_with is None


def test_profiler_keeps_act_only_where_it_lowers_the_loss(monkeypatch):
    """The rule on losses that are not noise: heads whose ACT lowers the held-in loss are candidates, and they are
    kept only if together they lower the held-out loss too."""
    from headwise.profile import act as act_module

    lm = tiny_model("llama")
    held_in, held_out = torch.zeros(1, 8, dtype=torch.long), torch.ones(1, 8, dtype=torch.long)
    base = [[Full()] * lm.spec.num_kv_heads for _ in range(lm.spec.num_layers)]
    helps = {(0, 0): -0.2, (1, 1): -0.1}  # held-in loss change with ACT on the head; every other head +0.05
    held_out_change = {"value": -0.25}

    def loss(_lm, policies, ids, chunk_size=512):
        on = [(i, j) for i, row in enumerate(policies) for j, p in enumerate(row) if isinstance(p, ACT)]
        if ids is held_out:
            return 5.0 + (held_out_change["value"] if on else 0.0)
        return 5.0 + sum(helps.get(h, 0.05) for h in on)

    monkeypatch.setattr(act_module, "mean_loss", loss)
    kept = choose_act_heads(lm, base, held_in, held_out, margin=0.01, progress=False)
    assert kept.heads == [(0, 0), (1, 1)]
    assert kept.held_out_with == pytest.approx(4.75) and kept.held_out_base == pytest.approx(5.0)
    held_out_change["value"] = +0.25  # together they raise the held-out loss: none is kept
    vetoed = choose_act_heads(lm, base, held_in, held_out, margin=0.01, progress=False)
    assert vetoed.heads == [] and vetoed.held_out_with == pytest.approx(5.25)
    assert vetoed.candidates == [(0, 0), (1, 1)]  # what bench/act_quality.py --force-candidates evaluates
    assert vetoed.meta()["candidates"] == [[0, 0], [1, 1]] and vetoed.meta()["heads"] == []
    only_big = choose_act_heads(lm, base, held_in, held_out, margin=0.15, progress=False)
    assert only_big.heads == []  # (0, 0) is a candidate, but the held-out loss rose
    held_out_change["value"] = -0.25
    only_big = choose_act_heads(lm, base, held_in, held_out, margin=0.15, progress=False)
    assert only_big.heads == [(0, 0)]


def test_act_quality_summary_pairs_the_same_prompts_and_draws_them(tmp_path):
    """bench/act_quality.py's summary: ACT's accuracy as a share of dense's on the same prompts (7 answered only with
    ACT, none only without: McNemar p = 2/2^7), both perplexities, and a plot of the two accuracies."""
    from bench_modules import bench_module

    act_quality = bench_module("act_quality.py")
    plans = [{"label": "dense", "digest": {"1024": "d"}}, {"label": "act_x", "digest": {"1024": "a"}}]
    rows = []
    for i in range(20):
        rows.append({"plan": "dense", "digest": "d", "task": "passkey", "length": 1024, "depth": 0.5, "seed": 0,
                     "idx": i, "score": float(i >= 7)})
        rows.append({"plan": "act_x", "digest": "a", "task": "passkey", "length": 1024, "depth": 0.5, "seed": 0,
                     "idx": i, "score": 1.0})
    ev = {"plans": plans, "tasks": ["passkey", "fidelity"], "lengths": [1024], "rows": rows,
          "accuracy": [{"plan": "dense", "task": "passkey", "length": 1024, "score": 0.65, "n": 20, "ci95": [0.43, 0.82]},
                       {"plan": "act_x", "task": "passkey", "length": 1024, "score": 1.0, "n": 20, "ci95": [0.84, 1.0]}],
          "fidelity": [{"plan": "act_x", "length": 1024, "overall": {"ppl_dense": 40.0, "ppl": 40.5, "kl": 0.01,
                                                                      "top1": 0.97}}]}
    rows_out = act_quality.summary(ev)
    passkey, fidelity = rows_out
    assert passkey["dense"] == 0.65 and passkey["act"] == 1.0
    assert passkey["paired"]["only_plan"] == 7 and passkey["paired"]["only_ref"] == 0
    assert passkey["paired"]["mcnemar_p"] == pytest.approx(2 / 2**7, abs=1e-4)
    assert fidelity == {"task": "fidelity", "length": 1024, "ppl_dense": 40.0, "ppl_act": 40.5, "kl": 0.01, "top1": 0.97}
    png = act_quality.plot(rows_out, "t", tmp_path / "x.json")
    assert png.suffix == ".png" and png.stat().st_size > 1000


def test_answer_loss_is_the_answers_nll_after_their_prompts(tiny_llama):
    """The retrieval objective's loss: the mean NLL of each probe's answer tokens fed after its prompt, through the
    engine in chunks, equals the dense model's own log-probabilities of those tokens."""
    from headwise.profile.act import answer_loss
    from headwise.profile.select import probe_set

    lm = tiny_llama
    probes = probe_set(lm.tokenizer, [160], 2)
    dense = [[Full()] * lm.spec.num_kv_heads for _ in range(lm.spec.num_layers)]
    total, count = 0.0, 0
    for ids, answer in zip(probes.ids[160], probes.answer[160]):
        n = int((answer >= 0).sum())
        x = ids[None, : 160 + n]
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(input_ids=x).logits[0, 159 : 159 + n].float(), -1)
        total -= float(logp.gather(-1, x[0, 160 : 160 + n, None]).sum())
        count += n
    assert answer_loss(lm, dense, probes, chunk_size=64) == pytest.approx(total / count, rel=1e-4)


def test_the_retrieval_objective_measures_probe_answers(monkeypatch):
    """With probe sets instead of text, the two steps run on ``answer_loss`` (held-in probes, then held-out ones),
    and the choice says which objective it used; ``profile --act retrieval`` reaches it."""
    from headwise.profile import act as act_module
    from headwise.profile.select import ProbeSet

    lm = tiny_model("llama")
    held_in = ProbeSet({64: torch.zeros(1, 66, dtype=torch.long)}, {64: torch.zeros(1, 2, dtype=torch.long)})
    held_out = ProbeSet({64: torch.ones(1, 66, dtype=torch.long)}, {64: torch.ones(1, 2, dtype=torch.long)})
    base = [[Full()] * lm.spec.num_kv_heads for _ in range(lm.spec.num_layers)]

    def loss(_lm, policies, probes, chunk_size=512):
        on = [(i, j) for i, row in enumerate(policies) for j, p in enumerate(row) if isinstance(p, ACT)]
        return 2.0 - (0.5 if (0, 1) in on else 0.0) - (0.1 if probes is held_out and on else 0.0)

    monkeypatch.setattr(act_module, "answer_loss", loss)
    monkeypatch.setattr(act_module, "mean_loss", lambda *a, **k: pytest.fail("the text loss was measured"))
    choice = choose_act_heads(lm, base, held_in, held_out, margin=0.01, progress=False)
    assert choice.heads == [(0, 1)] and choice.objective == "retrieval"
    assert choice.meta()["objective"] == "retrieval" and choice.held_out_with == pytest.approx(1.4)


def test_act_heads_are_kept_only_within_the_budget():
    """ACT's column sums cost bytes: a dense plan has no room for them (no plan holds more than dense), a plan with
    streaming heads under a budget of 1.0 has, and with room for one head the most helpful one is kept."""
    from headwise.policies import Streaming
    from headwise.profile.runner import act_within_budget

    lm = tiny_model("llama")
    spec, L = lm.spec, 256
    dense = [[Full()] * spec.num_kv_heads for _ in range(spec.num_layers)]
    heads = [(0, 0), (1, 0)]
    delta = {(0, 0): -0.01, (1, 0): -0.05}  # (1, 0) helps more
    assert act_within_budget(lm, dense, heads, delta, 1.0, (L,)) == []
    mixed = [[Full()] + [Streaming(sink=4, window=8)] * (spec.num_kv_heads - 1) for _ in range(spec.num_layers)]
    assert act_within_budget(lm, mixed, heads, delta, 1.0, (L,)) == heads
    base = HeadPlan.from_policies(spec, mixed).kv_bytes(spec, L, peak=True)
    one = L * 4  # one head's fp32 column sums
    budget = (base + one) / spec.dense_kv_bytes(L, 2)
    assert act_within_budget(lm, mixed, heads, delta, budget, (L,)) == [(1, 0)]
    assert act_within_budget(lm, mixed, heads, delta, budget, (L, 2 * L)) == [(1, 0)]  # and at twice the length
