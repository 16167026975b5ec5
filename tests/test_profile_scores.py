"""Head measurements on hand-made attention patterns and tiny random models."""

from __future__ import annotations

import types

import pytest
import torch

from headwise.errors import HeadwiseError
from headwise.models import LoadedModel
from headwise.profile.duo import train_gates
from headwise.profile.mass import SPAN_OPTIONS, MassProbe
from headwise.profile.probe import HeadMask, Probe, QKProbe, probe_attention, probing
from headwise.profile.razor import RepeatProbe
from headwise.profile.retrieval import ArgmaxProbe, copy_events
from headwise.profile.runner import check_reachable, group_max
from headwise.spec import ModelSpec


def test_copy_event_needs_argmax_inside_needle_on_the_generated_token():
    prompt = torch.tensor([5, 6, 7, 42, 43, 44, 8, 9])  # needle = positions 3..5
    argmax = torch.tensor([[4, 4, 1], [3, 7, 4]])  # [layers=2, heads=3]
    hits = copy_events(argmax, token=43, prompt_ids=prompt, span=(3, 6))
    # (0,0), (0,1), (1,2) look at position 4 = token 43 inside the needle; (1,0) looks inside at another token;
    # (0,2) and (1,1) look outside the needle
    assert hits.tolist() == [[True, True, False], [False, False, True]]


def _layer(idx: int) -> torch.nn.Module:
    m = torch.nn.Module()
    m.layer_idx = idx
    return m


def test_probe_reports_each_query_heads_most_attended_absolute_position():
    D, S = 8, 10
    k = torch.randn(1, 1, S, D) * 0.1
    q = torch.zeros(1, 2, 1, D)
    k[0, 0, 3, 0] = 5.0  # key 3 stands out for query head 0 ...
    q[0, 0, 0] = 5.0
    k[0, 0, 7, 0] = -5.0
    k[0, 0, 7, 1] = 5.0  # ... key 7 for query head 1
    q[0, 1, 0, 1] = 5.0
    probe = ArgmaxProbe(num_layers=2, num_q_heads=2)
    probe.q_start = 100 + S - 1  # the cache holds positions 100..109 (a sliding layer trimmed its start)
    probe_attention(_layer(1), q, k, torch.randn(1, 1, S, D), None, headwise_probe=probe)
    assert probe.argmax[1].tolist() == [103, 107]


def test_probe_attention_equals_sdpa_and_head_mask_zeroes_one_head():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out, _ = probe_attention(_layer(0), q, k, v, None, headwise_probe=Probe())
    assert torch.allclose(out.transpose(1, 2), ref, atol=1e-6)
    masked, _ = probe_attention(_layer(0), q, k, v, None, headwise_probe=HeadMask([(0, 2)]))
    masked = masked.transpose(1, 2)
    assert masked[:, 2].abs().max() == 0 and torch.equal(masked[:, [0, 1, 3]], out.transpose(1, 2)[:, [0, 1, 3]])


def _one_hot_rows(q_pos: torch.Tensor, targets: list[int], S: int) -> torch.Tensor:
    """weights [1, heads, Lq, S]: head h puts all its mass on key ``q - targets[h]`` (a distance) or key -d."""
    w = torch.zeros(1, len(targets), len(q_pos), S)
    for h, t in enumerate(targets):
        for r, q in enumerate(q_pos.tolist()):
            w[0, h, r, (q - t) if t >= 0 else -t - 1] = 1.0
    return w


def test_mass_probe_separates_sink_local_and_far_heads():
    S = 1024
    q_pos = torch.arange(S - 128, S)
    k_pos = torch.arange(S)
    # head 0 on key 0 (sink), head 1 on itself (local), head 2 at distance 600 (far, outside the sink)
    probe = MassProbe(1, 3, bins=[S])
    probe.observe(0, _one_hot_rows(q_pos, [-1, 0, 600], S), q_pos, k_pos)
    n = probe.count[0, 0]
    assert (probe.sink[0, :, 0] / n).tolist() == [1.0, 0.0, 0.0]
    assert (probe.local[0, :, 0] / n).tolist() == [0.0, 1.0, 0.0]
    recall = probe.recall[0, :, :, 0] / n
    assert torch.all(recall[0] == 1) and torch.all(recall[1] == 1)  # sinks and the window are always kept
    for o, (a, b) in enumerate(SPAN_OPTIONS):
        assert recall[2, o] == float(a + b * S > 600)


def test_repeat_probe_scores_echo_and_induction_heads():
    n, S = 16, 48
    q_pos = torch.arange(n, S)
    probe = RepeatProbe(1, 3, segment=n)
    # head 0 attends to the previous occurrence (echo), head 1 to the token after it (induction), head 2 to itself
    probe.observe(0, _one_hot_rows(q_pos, [n, n - 1, 0], S), q_pos, torch.arange(S))
    echo, induction = probe.echo[0] / probe.count, probe.induction[0] / probe.count
    assert echo.tolist() == [1.0, 0.0, 0.0]
    assert induction.tolist() == [0.0, 1.0, 0.0]


def test_group_max_takes_the_strongest_query_head_of_each_kv_head():
    x = torch.tensor([[0.1, 0.9, 0.2, 0.0, 0.3, 0.4]])
    assert group_max(x, 3).tolist() == [[pytest.approx(0.9), pytest.approx(0.4)]]


@pytest.fixture
def tiny(tiny_llama) -> LoadedModel:
    return tiny_llama


def test_probe_forward_equals_the_models_own_sdpa_forward(tiny):
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        ref = tiny.model(ids).logits
        with probing(tiny.model):
            got = tiny.model(ids, headwise_probe=Probe()).logits
    assert torch.allclose(got, ref, atol=1e-5)


def test_qk_probe_keeps_the_chosen_layers_queries_and_keys_as_made_or_in_fp32_on_the_host():
    """One probe for SeerAttention's gates (tensors as the model made them) and the pattern search (``to_host``: fp32
    host copies, so a GPU's memory stays free): the chosen layers only, queries before GQA, keys per KV head."""
    from tiny import tiny_model

    lm = tiny_model("llama", seed=3)
    spec, model = lm.spec, lm.model.to(torch.bfloat16)
    ids = torch.randint(0, model.config.vocab_size, (1, 24))
    kept, host = QKProbe({0}), QKProbe({1}, to_host=True)
    with torch.no_grad(), probing(model):
        model(ids, headwise_probe=kept)
        model(ids, headwise_probe=host)
    assert set(kept.qk) == {0} and set(host.qk) == {1}
    q, k, _ = kept.qk[0]
    assert q.dtype == k.dtype == torch.bfloat16
    assert q.shape == (1, spec.num_q_heads, 24, spec.head_dim) and k.shape == (1, spec.num_kv_heads, 24, spec.head_dim)
    hq, hk, scale = host.qk[1]
    assert hq.dtype == hk.dtype == torch.float32 and hq.device.type == "cpu" and scale == spec.head_dim ** -0.5


def test_gate_training_moves_only_the_gates(tiny):
    before = [p.detach().clone() for p in tiny.model.parameters()]
    flags = [p.requires_grad for p in tiny.model.parameters()]
    result = train_gates(tiny, steps=3, seq_len=256, n_keys=2, sink=4, window=8, batch=2, progress=False)
    assert result.alpha.shape == (2, 2)
    assert torch.all((result.alpha >= 0) & (result.alpha <= 1))
    assert result.alpha.min() < 1.0  # the L1 push moved them off their initial 1
    assert all(torch.equal(a, b) for a, b in zip(before, tiny.model.parameters()))
    assert [p.requires_grad for p in tiny.model.parameters()] == flags  # restored after training


def test_model_without_reachable_attention_is_refused():
    class NoAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.config = types.SimpleNamespace(_attn_implementation="sdpa")

        def forward(self, input_ids, **kwargs):
            return self.emb(input_ids)

    lm = LoadedModel("no-attn", NoAttention(), None, ModelSpec("llama", 2, 2, 1, 4, 128, (None, None)), "test")
    with pytest.raises(HeadwiseError, match=r"no attention heads reachable in layer\(s\) \[0, 1\]"):
        check_reachable(lm)


def test_pattern_search_picks_a_pattern_within_the_density_or_keeps_full(tiny):
    from headwise.policies import Full
    from headwise.profile.patterns import search_patterns

    found = search_patterns(tiny, [(0, 0), (1, 1)], length=512, density=0.6, min_recall=0.0, progress=False)
    assert set(found) == {(0, 0), (1, 1)}
    for choice in found.values():
        assert not isinstance(choice.policy, Full) and choice.density <= 0.6
        assert choice.recall == pytest.approx(max(r["recall"] for r in choice.table if r["density"] <= 0.6), abs=1e-4)
        assert choice.policy.kv_tokens(4096) == 4096  # a prefill pattern keeps the whole cache: memory unchanged


def test_span_error_measures_output_change_not_lost_mass():
    S, D, T = 1024, 4, 1024
    q_pos, k_pos = torch.arange(S - 128, S), torch.arange(S)
    g = torch.Generator().manual_seed(0)
    # head 0 spreads its attention evenly over every key, but all its values are equal: any window keeps its output
    # head 1 puts everything at distance 600: windows shorter than that change its output; head 2 attends to itself
    w = torch.cat([torch.full((1, 1, 128, S), 1.0 / S), _one_hot_rows(q_pos, [600, 0], S)], dim=1)
    w[0, 0] = w[0, 0].tril(S - 128)  # causal rows of a uniform head: renormalise over the visible keys
    w[0, 0] /= w[0, 0].sum(-1, keepdim=True)
    values = torch.randn(1, 3, S, D, generator=g)
    values[0, 0] = values[0, 0, :1]
    module = torch.nn.Module()
    module.o_proj = torch.nn.Linear(3 * D, 8, bias=False)
    probe = MassProbe(1, 3, bins=[S], target_len=T, num_kv_heads=3)
    probe.observe(0, w, q_pos, k_pos)
    probe.observe_values(0, w, values, q_pos, k_pos, module)
    err = probe.span_error()
    assert err is not None and err.shape == (1, 3, len(SPAN_OPTIONS))
    recall = probe.recall[0, :, :, 0] / probe.count[0, 0]
    for o, option in enumerate(SPAN_OPTIONS):
        win = round(option[0] + option[1] * T)
        assert err[0, 0, o] < 1e-6 and err[0, 2, o] < 1e-6
        assert (err[0, 1, o] > 0.01) == (win <= 600)
        if win < S - 128 - 64:
            assert recall[0, o] < 0.9  # the uniform head does lose mass under this window: mass alone would flag it


def test_span_error_is_none_without_o_proj():
    probe = MassProbe(1, 2, bins=[256], target_len=256, num_kv_heads=1)
    w = torch.softmax(torch.randn(1, 2, 128, 256), -1)
    probe.observe_values(0, w, torch.randn(1, 2, 256, 4), torch.arange(128, 256), torch.arange(256), torch.nn.Module())
    assert probe.span_error() is None


def test_layer_sensitivity_is_zero_only_where_streaming_changes_nothing(tiny):
    from headwise.profile.mass import layer_sensitivity

    kl = layer_sensitivity(tiny, 400, window=64, progress=False)  # 64 + 64 tokens kept of 400: the layers differ
    assert kl.shape == (2,) and bool((kl > 0).all())
    assert bool((layer_sensitivity(tiny, 100, window=64, progress=False) < 1e-6).all())  # 64 + 64 covers 100 tokens


def test_weighted_span_error_turns_each_layers_error_into_its_measured_kl():
    from headwise.profile.mass import CALIB_WINDOW, weighted_span_error

    o = SPAN_OPTIONS.index((CALIB_WINDOW, 0.0))
    err = torch.rand(3, 2, len(SPAN_OPTIONS)) + 0.1
    kl = torch.tensor([0.5, 0.01, 0.0])
    w = weighted_span_error(err, kl)
    assert torch.allclose(w[:, :, o].sum(-1), kl)  # the calibration window reproduces each layer's KL
    assert torch.allclose(w[0] / err[0], torch.full_like(err[0], float(0.5 / err[0, :, o].sum())))
    assert bool((w[2] == 0).all())


def test_profile_records_calibrated_spans_and_resolving_at_another_target_measures_them_again(tiny, capsys):
    from headwise.profile.mass import QUANT_PROBE
    from headwise.profile.runner import Settings, Spans, profile_model, resolve_from_scores

    plan = profile_model(tiny, 0.5, target_len=512, settings=Settings.fast(), progress=False)
    meta = plan.meta
    # Without bars, each phase says when it starts and how long it took, in order, as the timings record them
    took = [line.split()[2] for line in capsys.readouterr().err.splitlines() if " took " in line]
    assert took == ["retrieval", "mass", "razor", "duo", "layer_sensitivity", "solve"]  # the default method: duo
    assert [k for k in meta["timings_s"] if k != "process_cpu_s"] == [f"{n}_s" for n in took]
    assert meta["span_recall_target_len"] == 512 and len(meta["layer_kl"]) == 2
    spans = Spans.from_meta(meta)
    assert spans is not None and spans.error is not None and spans.error.shape == (2, 2, len(SPAN_OPTIONS))
    assert spans.quant_error is not None and spans.quant_error.shape == (2, 2, len(QUANT_PROBE))
    assert meta["quant_error_options"]["key_value_bits"] == [list(o) for o in QUANT_PROBE]
    assert meta["solution"]["kv_tokens"] <= meta["solution"]["cap_tokens"]
    again = resolve_from_scores(tiny, plan, 0.4, 512, "retrieval")
    assert again.meta["solution"]["kv_fraction"] <= 0.4
    # another target length: the ranking carries over, the span recalls are measured again at that length
    longer = resolve_from_scores(tiny, plan, 0.4, 1024, "retrieval")
    assert longer.meta["span_recall_target_len"] == 1024 and longer.meta["span_recall_remeasured_from"] == 512
    assert longer.meta["scores"]["retrieval_kv"] == meta["scores"]["retrieval_kv"]
    assert longer.meta["span_recall_kv"] != meta["span_recall_kv"]
    # the quantized options' errors are measured again with them (on the same text: no window depends on the target)
    assert longer.meta["quant_error_kv"] == meta["quant_error_kv"]
    assert longer.meta["solution"]["kv_fraction"] <= 0.4 and longer.meta["target_len"] == 1024


def test_quant_error_grows_as_bits_fall(tiny):
    """The probe's measured error of each quantized option (keys and values as KIVI codes outside the residual):
    every option errs on a random model's keys and values, and fewer bits err more, for values at equal key bits
    and for keys at equal value bits. (2-bit keys over 2-bit values need not err more than 4-bit keys over them:
    a random model attends almost evenly, so its output barely moves with the keys.)"""
    from headwise.profile.mass import QUANT_PROBE, mass_scores

    mass = mass_scores(tiny, 512, progress=False, target_len=512)
    err = mass.quant_error
    assert err is not None and err.shape == (2, 2, len(QUANT_PROBE))
    total = err.sum(dim=(0, 1))
    by = dict(zip(QUANT_PROBE, total.tolist(), strict=True))
    assert by[(8, 8)] > 0
    assert by[(4, 2)] > by[(4, 4)] > by[(8, 4)] > by[(8, 8)]
    assert by[(2, 2)] > by[(4, 4)]


def test_quant_probe_measures_every_option_the_solvers_menus_offer():
    """``QUANT_PROBE`` is written out in mass.py (the solver imports mass, not the other way round): it must name
    exactly the (key bits, value bits) of the menus' options, so every option a plan can hold has a measured error."""
    from headwise.profile.mass import QUANT_GROUP, QUANT_PROBE
    from headwise.profile.solver import QUANT_OPTIONS, TWO_BIT_OPTIONS

    menu = QUANT_OPTIONS + TWO_BIT_OPTIONS
    assert sorted((q.k_bits, q.bits) for q in menu) == sorted(QUANT_PROBE)
    assert {q.group for q in menu} == {QUANT_GROUP}


def test_quant_error_is_zero_where_nothing_is_old_enough_to_be_coded(tiny):
    """A text shorter than the residual plus a group holds no codes: the quantized options change nothing."""
    from headwise.profile.mass import BIN, QUANT_GROUP, QUANT_PROBE_RESIDUAL, mass_scores

    mass = mass_scores(tiny, 128, bins=[128], progress=False, target_len=128)
    first_query = 128 - BIN
    assert first_query + 1 - QUANT_PROBE_RESIDUAL < QUANT_GROUP  # not one whole group is older than its residual
    assert mass.quant_error is not None and float(mass.quant_error.abs().max()) == 0.0
