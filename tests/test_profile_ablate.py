"""The ablation ranking: backward elimination keeps the heads whose joint loss is measured, not guessed."""

import json

import pytest
import torch

from headwise.attention import attention_implementation
from headwise.engine import Engine
from headwise.errors import HeadwiseError
from headwise.plan import HeadPlan
from headwise.policies import Full, Quantized, Streaming
from headwise.policies.quantized import QuantizedStore, fake_quantize
from headwise.profile.ablate import BASES, SWITCHES, _Masks, ablation_ranking, eliminate
from headwise.profile.runner import ABLATION_BASES, ABLATION_SWITCHES
from headwise.profile.select import (
    PLAN_MASK_NAME,
    ProbeSet,
    masked_text_logprobs,
    plan_masks,
    plan_rounding,
    probe_set,
    text_kl,
)
from tiny import tiny_model

HEADS = [(i, j) for i in range(4) for j in range(3)]


def test_elimination_keeps_the_costly_heads_last():
    cost = {h: 0.01 * n for n, h in enumerate(HEADS)}
    cost[(2, 1)] = 5.0
    cost[(0, 0)] = 3.0
    order, curve, finished = eliminate(HEADS, lambda s: sum(cost[h] for h in s), drop=0.3, progress=False)
    assert finished and sorted(order) == sorted(HEADS)
    assert order[-2:] == [(0, 0), (2, 1)]
    assert curve[0] == (12, 0.0) and curve[-1][0] == 1
    assert [n for n, _ in curve] == sorted((n for n, _ in curve), reverse=True)


def test_two_heads_that_back_each_other_up_are_not_switched_together():
    """Alone each of A and B costs nothing (the other covers for it); together they cost a lot. A per-head score
    ranks both at the bottom; the elimination switches one, then sees the other's cost and keeps it."""
    a, b = (1, 0), (3, 2)

    def loss(s: set) -> float:
        return 0.001 * len(s) + (4.0 if a in s and b in s else 0.0)

    order, _, _ = eliminate(HEADS, loss, drop=0.5, progress=False)
    assert {order[-1]} <= {a, b}  # one of the pair is the last head standing
    assert order.index(a) != order.index(b)


def test_time_limit_orders_the_rest_by_their_last_costs():
    cost = {h: float(n) for n, h in enumerate(HEADS)}
    order, curve, finished = eliminate(HEADS, lambda s: sum(cost[h] for h in s), drop=0.2, time_limit_s=0.0,
                                       progress=False)
    assert not finished and len(curve) == 1 and sorted(order) == sorted(HEADS)


def test_fake_quantization_gives_back_what_the_store_holds():
    pol = Quantized(bits=4, group=8, residual=8)
    g = torch.Generator().manual_seed(1)
    k, v = torch.randn(2, 3, 40, 12, generator=g) * 3, torch.randn(2, 3, 40, 12, generator=g)
    store = QuantizedStore(2, 3, 12, torch.device("cpu"), torch.float32, pol)
    store.append(k[:, :, :17], v[:, :, :17])
    store.append(k[:, :, 17:], v[:, :, 17:])
    held_k, held_v = store.view()
    n = pol.quantized_length(40)
    fk, fv = fake_quantize(k[:, :, :n], v[:, :, :n], pol)
    assert torch.equal(fk, held_k[:, :, :n]) and torch.equal(fv, held_v[:, :, :n])
    assert not torch.allclose(fk, k[:, :, :n], atol=1e-2)  # 4 bits round visibly


Q, S = Quantized(bits=4, group=8, residual=8), Streaming(sink=2, window=12)


@pytest.mark.parametrize(("arch", "policies"), [
    ("llama", [[Q, S], [Q, Q], [S, Q]]),
    # layers 0 and 1 slide over 32 tokens: their quantized heads keep that window (the codes of groups that left
    # it dropped); the streaming head sits on the global layer
    ("gemma3_text", [[Q, Q], [Q, Full()], [S, Q]]),
])
@pytest.mark.parametrize("kernels", [False, True])
def test_rounded_masked_forward_equals_the_engine_running_the_quantized_policy(arch, policies, kernels):
    """Chunked prefill then decode steps through the engine (quantized heads in real stores; decode steps on the
    kernel or the reference path) give the logits of one masked forward that rounds those heads' K/V as the stores
    would. Without the rounding the masked forward misses by far more."""
    lm = tiny_model(arch, num_hidden_layers=3, **({"sliding_window": 32} if arch == "gemma3_text" else {}))
    prompt, total, chunk = 45, 50, 16
    ids = torch.randint(0, 128, (1, total), generator=torch.Generator().manual_seed(3))
    engine = Engine(lm, HeadPlan.from_policies(lm.spec, policies), chunk_size=chunk, use_kernels=kernels)
    cache = engine.new_cache(1)
    real = [engine.prefill(ids[:, :prompt], cache, all_logits=True)[0]]
    real += [engine.forward(ids[:, p : p + 1], cache) for p in range(prompt, total)]
    real = torch.cat(real)
    masks = plan_masks(lm.spec, policies, total, torch.device("cpu"))
    rounding = plan_rounding(lm.spec, policies, prompt, total, torch.device("cpu"), chunk, kernels)
    assert any(rounding), "the test must quantize something"
    with torch.no_grad(), attention_implementation(lm.model, PLAN_MASK_NAME):
        rounded = lm.model(input_ids=ids, use_cache=False, headwise_plan_masks=masks,
                           headwise_plan_rounding=rounding).logits[0]
        exact = lm.model(input_ids=ids, use_cache=False, headwise_plan_masks=masks).logits[0]
    err = (rounded - real).abs().max()
    assert err < 1e-5
    assert (exact - real).abs().max() > 100 * err


def _answered_by_dense(lm, n: int = 3, length: int = 48) -> ProbeSet:
    """Probes whose answers are what the model itself writes greedily (so dense answers every one)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (n, length), generator=g)
    with torch.no_grad():
        a1 = lm.model(input_ids=ids).logits[:, -1].argmax(-1)
        a2 = lm.model(input_ids=torch.cat([ids, a1[:, None]], 1)).logits[:, -1].argmax(-1)
    answer = torch.stack([a1, a2], 1)
    return ProbeSet({length: torch.cat([ids, answer], 1)}, {length: answer})


def test_ranking_runs_the_plan_masks(tiny_llama):
    res = ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), sink=2, window=4, drop=0.5, progress=False)
    assert res.probes == res.probes_asked == 3 and res.finished
    assert sorted(res.score.flatten().tolist()) == [0.25, 0.5, 0.75, 1.0]
    assert res.curve[0] == (4, 0.0) and res.curve[-1][0] == 1 and res.forwards >= 4


def test_ranking_on_a_quantized_base_rounds_every_head_not_switched(tiny_llama):
    """Probes past the residual (128) plus a group (32): the unswitched heads' old K/V are rounded to 4 bits. The
    ranking is a valid score, its meta names the base, and its curve starts at the loss of every head rounded."""
    probes = _answered_by_dense(tiny_llama, n=2, length=200)
    res = ablation_ranking(tiny_llama, probes, sink=2, window=4, drop=0.5, progress=False, base="quantized4")
    assert sorted(res.score.flatten().tolist()) == [0.25, 0.5, 0.75, 1.0] and res.finished
    meta = res.meta()
    assert meta["base"] == "quantized4" and meta["base_policy"] == {"policy": "quantized",
                                                                    "params": {"bits": 4, "group": 32, "residual": 128}}
    assert meta["rounding"] == {"prefill_chunk": 512, "decode": "reference"}
    assert res.curve[0][0] == 4 and res.curve[0][1] >= 0.0
    assert ablation_ranking(tiny_llama, probes, sink=2, window=4, drop=0.5, progress=False).meta()["base"] == "full"


def test_unknown_ablation_base_is_refused(tiny_llama):
    with pytest.raises(HeadwiseError, match="quantized4"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), base="int4", progress=False)


def test_the_cli_offers_the_ablation_bases_and_switches():
    assert tuple(BASES) == ABLATION_BASES and SWITCHES == ABLATION_SWITCHES


@pytest.mark.slow
def test_ranking_on_the_real_model(smollm2):
    """SmolLM2 on CPU, short probes: a score per KV head in (0, 1], a curve that starts at dense, and the heads a
    plan keeps scored highest."""
    probes = probe_set(smollm2.tokenizer, [192], 4)
    res = ablation_ranking(smollm2, probes, sink=8, window=16, drop=0.6, batch=4, progress=False)
    spec = smollm2.spec
    assert res.score.shape == (spec.num_layers, spec.num_kv_heads)
    assert float(res.score.min()) > 0 and float(res.score.max()) == 1.0
    assert len(set(res.score.flatten().tolist())) == spec.num_layers * spec.num_kv_heads
    assert 0 < res.probes <= res.probes_asked == 4 and res.finished
    assert res.curve[0] == (spec.num_layers * spec.num_kv_heads, 0.0)
    assert res.curve[-1][1] > 0.5  # one full head left: the probes are lost


def test_no_answerable_probe_is_a_clear_error(tiny_llama):
    with pytest.raises(HeadwiseError, match="answers none"):
        ablation_ranking(tiny_llama, probe_set(tiny_llama.tokenizer, [160], 2), progress=False)


def test_drop_out_of_range_is_refused(tiny_llama):
    with pytest.raises(HeadwiseError, match="drop"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), drop=1.0, progress=False)


@pytest.mark.slow
def test_profile_on_a_quantized_base_records_it_in_the_plan(smollm2):
    """The whole profile with ``ablation_base``: the plan's meta names the base, and the solver walks the ranking
    into 4-bit and streaming heads as with any score."""
    from dataclasses import replace

    from headwise.profile.runner import Settings, profile_model

    # one round of the elimination (90 forwards over the probes), then the time limit orders the rest
    settings = replace(Settings.fast(), ablation_probes=2, ablation_time_limit_s=1.0)
    plan = profile_model(smollm2, 0.5, target_len=320, method="ablation", settings=settings, progress=False,
                         full_share=1.0, quantize=True, ablation_base="quantized4")
    abl = plan.meta["ablation"]
    assert abl["base"] == "quantized4" and abl["base_policy"]["params"]["bits"] == 4 and not abl["finished"]
    assert plan.meta["solution"]["quantized_heads"] and plan.meta["solution"]["kv_fraction"] <= 0.5



def _count_forwards(lm) -> list[int]:
    calls = [0]
    lm.model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_text_weight_zero_changes_nothing():
    """Text given at weight 0: the same ranking, curve and forwards as without it, and the model run as often."""
    lm = tiny_model("llama", num_hidden_layers=2, vocab_size=1024)
    probes = _answered_by_dense(lm)
    text = torch.randint(5, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    calls = _count_forwards(lm)
    runs = []
    for kw in ({}, {"text": text, "text_weight": 0.0}):
        calls[0] = 0
        res = ablation_ranking(lm, probes, sink=2, window=4, drop=0.5, progress=False, **kw)
        meta = res.meta()
        meta.pop("seconds")
        runs.append((res.order, res.curve, res.forwards, calls[0], meta))
    assert runs[0][:4] == runs[1][:4]
    assert runs[0][4] == runs[1][4] and runs[0][4]["text_weight"] == 0.0 and "curve_parts" not in runs[0][4]
    assert len(set(runs[0][0])) == 4


def _text_only_head(lm):
    """Every KV head's output zeroed except (0, 0)'s: switching any other head changes nothing at all."""
    g, d = lm.spec.group_size, lm.spec.head_dim
    with torch.no_grad():
        for i, layer in enumerate(lm.model.model.layers):
            w = layer.self_attn.o_proj.weight
            w[:, (g * d if i == 0 else 0):] = 0
    return lm


def test_a_large_text_weight_keeps_the_head_text_needs():
    """Probes shorter than the window (streaming = full on them: no retrieval loss anywhere) and one head that
    matters for text: by retrieval alone the tie puts it first out, with the text term it is the last kept."""
    lm = _text_only_head(tiny_model("llama", num_hidden_layers=2, vocab_size=1024))
    probes = _answered_by_dense(lm, length=4)
    text = torch.randint(5, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    kw = {"sink": 2, "window": 8, "drop": 0.5, "progress": False}
    plain = ablation_ranking(lm, probes, **kw, text=text)
    weighted = ablation_ranking(lm, probes, **kw, text=text, text_weight=1000.0)
    assert plain.order[0] == (0, 0) and all(loss == plain.curve[0][1] for _, loss in plain.curve)
    assert weighted.order[-1] == (0, 0) and float(weighted.score[0, 0]) == 1.0
    meta = weighted.meta()
    assert meta["text_weight"] == 1000.0 and meta["text"] == {"rows": 2, "tokens": 40, "positions": 40}
    parts = meta["curve_parts"]
    assert [p[0] for p in parts] == [n for n, _ in meta["curve"]]
    assert all(r == parts[0][1] and abs(k) < 1e-5 for _, r, k in parts)  # (0, 0) never switched: no text lost
    # the head it kept costs text: its switch alone is far above the noise
    masks = _Masks(lm, 2, 8)
    masks.streamed = {(0, 0)}
    dense = masked_text_logprobs(lm, None, text, 40)
    assert text_kl(dense, masked_text_logprobs(lm, masks, text, 40)) > 1e-4


@pytest.mark.parametrize("base", ["full", "quantized4"])
def test_text_loss_of_no_switched_head(base):
    """No head switched: a full base's masked forward over text is dense's (KL 0 up to float noise); a 4-bit base
    rounds the K/V that later prefill chunks see as codes (past the residual) and loses a little; one streamed head
    loses more than either."""
    lm = tiny_model("llama", num_hidden_layers=2, vocab_size=1024)
    text = torch.randint(5, 128, (1, 200), generator=torch.Generator().manual_seed(2))
    masks = _Masks(lm, 2, 4, BASES[base], chunk=32)
    rounding = masks.rounding if base != "full" else None
    dense = masked_text_logprobs(lm, None, text, 64)
    none = text_kl(dense, masked_text_logprobs(lm, masks, text, 64, rounding_for=rounding))
    masks.streamed = {(1, 0)}
    one = text_kl(dense, masked_text_logprobs(lm, masks, text, 64, rounding_for=rounding))
    assert abs(none) < 1e-6 if base == "full" else none > 1e-8  # the rounding, small on a random model: 8e-8
    assert one > max(1e-4, 100 * none)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), float("inf")])
def test_a_bad_text_weight_is_refused(tiny_llama, weight):
    with pytest.raises(HeadwiseError, match="text weight"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), text_weight=weight, progress=False)


def test_a_text_weight_needs_text(tiny_llama):
    with pytest.raises(HeadwiseError, match="needs held-in text"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), text_weight=1.0, progress=False)


def _profile_the_tiny_model(lm, monkeypatch) -> dict:
    """``headwise profile`` loads ``lm`` and its ablation ranks on probes ``lm`` answers; returns the dict the
    ranking's keyword arguments land in."""
    from headwise.profile import ablate, cli

    seen: dict = {}
    real = ablate.ablation_ranking

    def ranking(model, probes, **kw):
        seen.update(kw)
        return real(model, _answered_by_dense(model), **kw)

    monkeypatch.setattr(cli, "load_from_args", lambda args: lm)
    monkeypatch.setattr(ablate, "ablation_ranking", ranking)
    return seen


def test_the_cli_text_weight_reaches_settings_and_the_plan(tiny_llama, tmp_path, monkeypatch):
    """``--ablation-text-weight`` through ``headwise profile`` (tiny Llama; the ablation's probes swapped for ones a
    random model answers): the settings carry it, the ranking measures Shakespeare from the profiler's text, and the
    plan's command line and ``meta.ablation`` record it with the curve's two parts."""
    from headwise.cli import main
    from headwise.profile import cli

    seen = _profile_the_tiny_model(tiny_llama, monkeypatch)
    real_settings = cli._settings
    monkeypatch.setattr(cli, "_settings", lambda *a: seen.setdefault("settings", real_settings(*a)))
    out = tmp_path / "plan.json"
    rc = main(["profile", "smollm2-135m", "--budget", "0.5", "-o", str(out), "--fast", "--no-progress",
               "--method", "ablation", "--target-len", "512", "--full-share", "1.0", "--ablation-text-weight", "0.5"])
    assert rc == 0
    assert seen["settings"].ablation_text_weight == 0.5 and seen["text_weight"] == 0.5
    assert seen["text"].shape == (1, 512)  # Settings.fast's 512 tokens, in rows of the target length
    meta = json.loads(out.read_text())["meta"]
    assert "--ablation-text-weight 0.5" in meta["created_by"]
    abl = meta["ablation"]
    assert abl["text_weight"] == 0.5 and abl["text"]["positions"] == 512
    assert len(abl["curve_parts"]) == len(abl["curve"])
    for (n, loss), (m, retrieval, kl) in zip(abl["curve"], abl["curve_parts"]):
        assert n == m and loss == pytest.approx(retrieval + 0.5 * kl, abs=1e-3)


def test_a_knorm_switch_is_measured_and_becomes_the_plans_knorm_heads(tiny_llama, tmp_path, monkeypatch):
    """``--ablation-switch knorm`` through ``headwise profile`` (tiny Llama, probes it answers): the ranking measures
    switches to knorm (the plan's rounding carries their key choice), and the solved plan's streaming heads become
    knorm heads of the same slots; its command line and meta record it."""
    from headwise.cli import main
    from headwise.policies.knorm import KNorm

    seen = _profile_the_tiny_model(tiny_llama, monkeypatch)
    out = tmp_path / "plan.json"
    args = ["profile", "smollm2-135m", "--budget", "0.3", "-o", str(out), "--fast", "--no-progress",
            "--method", "ablation", "--target-len", "512", "--full-share", "1.0", "--ablation-switch", "knorm"]
    assert main(args) == 0
    assert seen["switch"] == "knorm"
    plan = HeadPlan.load(out)
    assert "--ablation-switch knorm" in plan.meta["created_by"] and plan.meta["ablation"]["switch"] == "knorm"
    kinds = {type(p) for row in plan.policies() for p in row}
    assert KNorm in kinds and Streaming not in kinds
    # without --full-share the plan selection would judge streaming plans: refused before any work
    assert main([a for a in args if a not in ("--full-share", "1.0")]) == 2


def test_streaming_heads_become_knorm_heads_of_the_same_slots_on_global_layers_only():
    from headwise.policies.knorm import KNorm
    from headwise.profile.runner import streaming_to_knorm
    from headwise.spec import ModelSpec

    spec = ModelSpec("gemma3_text", 2, 2, 1, 8, 4096, (512, None))
    got = streaming_to_knorm([[Streaming(sink=0, window=128)], [Streaming(sink=64, window=448)]], spec)
    assert got[0][0] == Streaming(sink=0, window=128)  # a native sliding layer keeps its window
    assert got[1][0] == KNorm(tokens=448, window=64) and got[1][0].kv_tokens(4096) == 512
    assert streaming_to_knorm([[Full()], [Streaming(sink=4, window=20)]], spec)[1][0] == KNorm(tokens=0, window=24)


def test_an_unknown_switch_is_refused(tiny_llama):
    with pytest.raises(HeadwiseError, match="knorm"):
        ablation_ranking(tiny_llama, _answered_by_dense(tiny_llama), switch="quest", progress=False)


def test_a_ring_switch_masks_the_solvers_ring_per_layer():
    """``ring``: a switched head's mask is the solver's smallest ring on its layer (``solver.ring_policy``): half sinks
    and half recent tokens on a global layer, a window of ``ring`` on a native sliding one, whatever sink/window say."""
    from headwise.profile.solver import QuantMenu, ring_policy

    lm = tiny_model("gemma3_text", num_hidden_layers=3)  # layers 0, 1 slide over 16 tokens; layer 2 is global
    spec = lm.spec
    n = 40
    masks = _Masks(lm, 2, 4, ring=10)
    masks.streamed = {(i, 0) for i in range(spec.num_layers)}
    got = masks(n)
    want = plan_masks(spec, [[ring_policy(10, spec.native_window(i))] for i in range(spec.num_layers)], n,
                      torch.device("cpu"))
    for i in range(spec.num_layers):
        native = spec.native_window(i)
        assert torch.equal(got[i][0], want[i][0])
        assert ring_policy(10, native) == QuantMenu(min_ring=10).ring(native)
    pos = torch.arange(n)
    assert int(got[2][0][n - 1].sum()) == 10 and bool(got[2][0][n - 1][:5].all())  # 5 sinks + 5 recent
    assert int(got[0][0][n - 1].sum()) == 10 and bool(got[0][0][n - 1][pos >= n - 10].all())  # a 10-token window
    # without a ring the switch is sink + window, as before
    plain = _Masks(lm, 2, 4)
    plain.streamed = {(2, 0)}
    assert int(plain(n)[2][0][n - 1].sum()) == 6


def test_the_ranking_records_its_ring_and_refuses_a_knorm_ring(tiny_llama):
    probes = _answered_by_dense(tiny_llama)
    res = ablation_ranking(tiny_llama, probes, sink=2, window=4, drop=0.5, progress=False, ring=8)
    assert res.meta()["ring"] == 8 and "ring" not in ablation_ranking(
        tiny_llama, probes, sink=2, window=4, drop=0.5, progress=False).meta()
    with pytest.raises(HeadwiseError, match="ring"):
        ablation_ranking(tiny_llama, probes, progress=False, switch="knorm", ring=8)


def test_the_cli_min_ring_sets_the_rankings_ring(tiny_llama, tmp_path, monkeypatch):
    """``--min-ring`` through ``headwise profile``: the ablation ranking switches heads to that ring, and the plan's
    meta says so."""
    from headwise.cli import main

    seen = _profile_the_tiny_model(tiny_llama, monkeypatch)
    out = tmp_path / "plan.json"
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(out), "--fast", "--no-progress",
               "--method", "ablation", "--target-len", "512", "--full-share", "1.0", "--quantize", "--min-ring", "32"])
    assert rc == 0 and seen["ring"] == 32
    assert json.loads(out.read_text())["meta"]["ablation"]["ring"] == 32
