"""The eval runner: plan specs and baselines, bad input, the per-sample cache, and a tiny end-to-end run."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from headwise.engine import Engine
from headwise.errors import ContextLengthError, InputError, PlanError
from headwise.eval.report import write_report
from headwise.eval.runner import (
    KIVI_MENU,
    EvalConfig,
    check_plan_specs,
    dtype_tag,
    kivi_baseline,
    measure_kv,
    model_key,
    parse_length,
    parse_tasks,
    quest_baseline,
    resolve_plans,
    run_eval,
    score_tables,
    streaming_baseline,
)
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec
from tiny import tiny_model

GEMMA_LIKE = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768,
                       tuple(None if i in (5, 11, 17) else 512 for i in range(18)))


def test_lengths_read_k_suffixes():
    assert [parse_length(x) for x in ("1k", "8K", "1500")] == [1024, 8192, 1500]
    with pytest.raises(InputError, match="cannot read length"):
        parse_length("1m")


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(InputError, match=r"unknown task 'haystack'; valid tasks: passkey, needle.*fidelity"):
        parse_tasks("passkey,haystack")


def test_streaming_baseline_holds_the_reference_kv_and_keeps_native_windows():
    ref = HeadPlan.uniform(GEMMA_LIKE, {"policy": "streaming", "params": {"sink": 64, "window": 448}})
    ref.layers[5] = [{"policy": "full"}]
    L = 4096
    target = ref.kv_tokens(GEMMA_LIKE, L)
    base = streaming_baseline(GEMMA_LIKE, "g", target, L, "streaming@equal")
    assert target - 18 < base.kv_tokens(GEMMA_LIKE, L) <= target
    for i, w in enumerate(GEMMA_LIKE.layer_windows):
        assert base.layers[i][0]["policy"] == ("full" if w is not None else "streaming")


def test_streaming_baseline_cuts_native_windows_when_the_reference_does():
    ref = HeadPlan.uniform(GEMMA_LIKE, {"policy": "streaming", "params": {"sink": 0, "window": 128}})
    ref.layers[5] = [{"policy": "full"}]
    L = 4096
    target = ref.kv_tokens(GEMMA_LIKE, L)
    base = streaming_baseline(GEMMA_LIKE, "g", target, L, "streaming@equal")
    assert target - 18 < base.kv_tokens(GEMMA_LIKE, L) <= target
    sliding = base.layers[0][0]
    assert sliding["policy"] == "streaming" and sliding["params"]["sink"] == 0
    assert sliding["params"]["window"] == sum(base.layers[5][0]["params"].values())


def test_quest_baseline_attends_the_reference_budget_per_head():
    pytest.importorskip("headwise.policies.page_topk")
    spec = ModelSpec("llama", 4, 4, 2, 16, 8192, (None,) * 4)
    base = quest_baseline(spec, "m", 0.25 * spec.dense_kv_tokens(2048), 2048, "quest@0.25")
    assert {h["params"]["budget"] for row in base.layers for h in row} == {512}


def test_plan_for_another_model_is_refused(smollm2, tmp_path):
    path = HeadPlan.dense(GEMMA_LIKE, "gemma3-270m").save(tmp_path / "gemma.json")
    with pytest.raises(PlanError, match="does not fit smollm2-135m"):
        resolve_plans([str(path)], smollm2)


def test_equal_memory_baselines_follow_the_plan_file_at_each_length(smollm2, tmp_path):
    spec = smollm2.spec
    ref = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 64, "window": 192}}, "smollm2-135m")
    ref.layers[3] = [{"policy": "full"}] * spec.num_kv_heads
    path = ref.save(tmp_path / "mine.json")
    entries = resolve_plans(["dense", str(path), "streaming@equal"], smollm2)
    assert [e.label for e in entries] == ["dense", "mine", "streaming@equal"]
    n_heads = spec.num_layers * spec.num_kv_heads
    for L in (1024, 4096):
        held = entries[2].plan_for(L).kv_tokens(spec, L)
        assert ref.kv_tokens(spec, L) - n_heads < held <= ref.kv_tokens(spec, L)


def test_equal_memory_of_a_quantized_plan_is_counted_in_the_runs_element_size(smollm2, tmp_path):
    """4-bit codes are a smaller share of fp32 KV than of bf16: on the fp32 model the streaming baseline matches the
    plan's bytes in fp32 (the CPU demo showed 49% against 38% when it counted bf16), at the plan's peak (its largest
    residual: at 2048 tokens the residual after the prompt is its shortest, 128 of up to 159 tokens)."""
    spec = smollm2.spec
    ref = HeadPlan.uniform(spec, {"policy": "quantized", "params": {"bits": 4}}, "smollm2-135m")
    path = ref.save(tmp_path / "q.json")
    base = resolve_plans([str(path), "streaming@equal"], smollm2)[1].plan_for(2048)
    want = ref.kv_bytes(spec, 2048, 4, peak=True)
    assert want > ref.kv_bytes(spec, 2048, 4) + spec.num_layers * spec.num_kv_heads * 2 * spec.head_dim * 4
    assert smollm2.dtype.itemsize == 4
    assert want - spec.num_layers * spec.num_kv_heads * 2 * spec.head_dim * 4 < base.kv_bytes(spec, 2048, 4) <= want


@pytest.mark.parametrize(("length", "fraction"), [(1024, 0.25), (2048, 0.3), (2048, 0.45), (8192, 0.6)])
def test_the_kivi_baseline_spreads_the_plans_bytes_evenly_at_the_most_bits_that_fit(smollm2, length, fraction):
    """``kivi_baseline``: every head quantized alike, at no more than the target at that length, and at the best of
    the menu that fits (the candidate before it would hold more); where none fits, the cheapest."""
    spec = smollm2.spec
    target = fraction * spec.dense_kv_tokens(length)
    plan = kivi_baseline(spec, "smollm2-135m", target, length, "kivi@equal", 2)
    heads = {json.dumps(h, sort_keys=True) for row in plan.layers for h in row}
    assert len(heads) == 1 and json.loads(heads.pop())["policy"] == "quantized"
    params = plan.layers[0][0]["params"]
    assert plan.kv_tokens(spec, length, 2, peak=True) <= target
    i = KIVI_MENU.index((params["bits"], params["residual"]))
    if i:  # the better candidate does not fit
        b, r = KIVI_MENU[i - 1]
        better = HeadPlan.uniform(spec, {"policy": "quantized", "params": {"bits": b, "group": 32, "residual": r}}, "t")
        assert better.kv_tokens(spec, length, 2, peak=True) > target
    tight = kivi_baseline(spec, "smollm2-135m", 0.05 * spec.dense_kv_tokens(length), length, "kivi@0.05", 2)
    assert tuple(tight.layers[0][0]["params"][k] for k in ("bits", "residual")) == KIVI_MENU[-1]


def test_kivi_baselines_resolve_and_hold_what_they_are_given(smollm2):
    entries = resolve_plans(["plans/smollm2-135m.json", "kivi@equal", "kivi@0.45"], smollm2)
    spec, ref = smollm2.spec, entries[0].plan_for(2048)
    assert [e.label for e in entries] == ["smollm2-135m", "kivi@equal", "kivi@0.45"]
    eq, wide = entries[1].plan_for(2048), entries[2].plan_for(2048)
    assert eq.kv_tokens(spec, 2048, 4, peak=True) <= ref.kv_tokens(spec, 2048, 4, peak=True)
    assert wide.kv_tokens(spec, 2048, 4, peak=True) <= 0.45 * spec.dense_kv_tokens(2048)
    assert wide.layers[0][0]["params"]["bits"] > eq.layers[0][0]["params"]["bits"]
    with pytest.raises(InputError, match="kivi@equal matches the memory of a plan file"):
        resolve_plans(["kivi@equal"], smollm2)


def _streaming_plan_with_full_heads(spec, window: int, every: int, tmp_path):
    """A SmolLM2 plan streaming 64 sinks + ``window`` on every head but head 0 of every ``every``-th layer (full),
    and the file it is saved to."""
    ref = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 64, "window": window}}, "smollm2-135m")
    for i in range(0, spec.num_layers, every):
        ref.layers[i][0] = {"policy": "full"}
    return ref, ref.save(tmp_path / "mine.json")


def test_random_placement_draws_are_seeded_and_hold_the_plans_kv(smollm2, tmp_path):
    """random@equal:SEED is another draw of the same policies: same KV at every length, other heads, and the same
    heads every time it is asked for (one draw is a lottery where few heads are streamed)."""
    spec = smollm2.spec
    ref, path = _streaming_plan_with_full_heads(spec, 64, 4, tmp_path)
    entries = resolve_plans([str(path), "random@equal", "random@equal:1", "random@equal:2"], smollm2)
    assert [e.label for e in entries[1:]] == ["random@equal", "random@equal:1", "random@equal:2"]
    draws = [e.plan_for(1024).layers for e in entries[1:]]
    assert draws[0] == resolve_plans([str(path), "random@equal:0"], smollm2)[1].plan_for(1024).layers
    assert draws[0] != draws[1] and draws[1] != draws[2]
    assert draws[1] == resolve_plans([str(path), "random@equal:1"], smollm2)[1].plan_for(1024).layers
    for e in entries[1:]:
        assert all(e.plan_for(L).kv_tokens(spec, L) == ref.kv_tokens(spec, L) for L in (1024, 4096))
    with pytest.raises(InputError, match="unknown plan"):
        resolve_plans([str(path), "random@equal:x"], smollm2)
    star = resolve_plans([str(path), "random@equal*3"], smollm2)
    assert [e.label for e in star[1:]] == ["random@equal:0", "random@equal:1", "random@equal:2"]
    assert [e.plan_for(1024).layers for e in star[1:]] == draws


@pytest.mark.parametrize("item", ["random@equal*1", "random@equal*21", "random@equal*"])
def test_random_draw_counts_out_of_range_are_refused_before_loading(item):
    with pytest.raises(InputError, match=r"random draws|unknown plan"):
        check_plan_specs(["dense", item])


def test_random_draws_are_pooled_into_one_accuracy_row_per_cell():
    """Two or more random@equal draws of a cell add one row over all their samples (random@equal and
    random@equal:0 being the same draw); a single draw adds none, and the plans' own rows are unchanged."""
    rows = []
    for plan, scores in {"dense": [1, 1, 1, 1], "random@equal": [1, 1, 0, 0], "random@equal:1": [0, 0, 0, 0],
                         "random@equal:2": [1, 1, 1, 0]}.items():
        rows += [{"plan": plan, "task": "passkey", "length": 1024, "depth": 0.5, "score": float(x)} for x in scores]
    rows += [{"plan": "random@equal:1", "task": "needle", "length": 1024, "depth": 0.5, "score": 1.0}]
    accuracy, _ = score_tables(rows)
    pooled = [a for a in accuracy if a.get("pooled")]
    assert len(pooled) == 1  # the needle cell has one draw only
    (row,) = pooled
    assert row["plan"] == "random@equal, 3 draws pooled" and row["n"] == 12 and row["score"] == round(5 / 12, 4)
    assert row["pooled"] == ["random@equal:0", "random@equal:1", "random@equal:2"]
    assert row["ci95"][0] < 5 / 12 < row["ci95"][1]
    assert {a["plan"]: a["score"] for a in accuracy if not a.get("pooled") and a["task"] == "passkey"} == {
        "dense": 1.0, "random@equal": 0.5, "random@equal:1": 0.0, "random@equal:2": 0.75}
    same = score_tables([*rows, {"plan": "random@equal:0", "task": "passkey", "length": 1024, "depth": 0.5,
                                 "score": 1.0}])[0]
    assert [a["n"] for a in same if a.get("pooled")] == [13]  # draw 0 under either label: still three draws
    from headwise.eval.report import accuracy_table

    results = {"accuracy": accuracy, "tasks": ["passkey"], "lengths": [1024],
               "plans": [{"label": p} for p in ("dense", "random@equal", "random@equal:1", "random@equal:2")]}
    _, table = accuracy_table(results)
    assert [r[0] for r in table][-1] == "random@equal, 3 draws pooled" and table[-1][1].startswith("42 [")


def test_random_placement_is_never_the_plan_itself_where_another_deal_exists():
    """The Gemma 3 plan shipped after run 9: 8, 8 and 4 bits on the three global heads, 4 bits on every sliding one. A deal that
    gives every head its own policy back is drawn again (seed 0 dealt exactly that in run 9); a plan with one
    policy everywhere has no other deal and is returned as is."""
    from pathlib import Path

    from headwise.eval.runner import random_baseline
    from headwise.spec import ModelSpec

    spec = ModelSpec("gemma3_text", 18, 4, 1, 256, 32768, tuple(None if i % 6 == 5 else 512 for i in range(18)))
    ref = HeadPlan.load(Path(__file__).resolve().parents[1] / "plans" / "gemma3-270m-run9.json")
    for seed in range(6):
        rnd = random_baseline(spec, ref, "gemma3-270m", seed)
        assert rnd.layers != ref.layers
        assert sorted(str(h) for row in rnd.layers for h in row) == sorted(str(h) for row in ref.layers for h in row)
        assert all(rnd.kv_bytes(spec, L) == ref.kv_bytes(spec, L) for L in (2048, 4096, 8192))
    uniform = HeadPlan.uniform(spec, {"policy": "full"}, "gemma3-270m")
    assert random_baseline(spec, uniform, "gemma3-270m").layers == uniform.layers


def test_random_full_heads_hold_the_plans_kv_with_as_many_full_heads_as_fit(smollm2, tmp_path):
    """random-full@equal (DuoAttention's random baseline): seeded full heads, the rest streaming at one size, within
    the plan's KV slots at every length; another draw picks other heads; with no room for a full head it is the
    streaming baseline itself."""
    spec = smollm2.spec
    ref, path = _streaming_plan_with_full_heads(spec, 192, 3, tmp_path)
    entries = resolve_plans([str(path), "random-full@equal", "random-full@equal:1", "streaming@equal"], smollm2)
    for L in (1024, 2048):
        target = ref.kv_tokens(spec, L, smollm2.dtype.itemsize, peak=True)
        draws = [e.plan_for(L) for e in entries[1:3]]
        for plan in draws:
            full = sum(h["policy"] == "full" for row in plan.layers for h in row)
            assert full >= 1
            assert target - spec.num_layers * spec.num_kv_heads <= plan.kv_tokens(spec, L, peak=True) <= target
            windows = {h["params"]["window"] for row in plan.layers for h in row if h["policy"] == "streaming"}
            assert len(windows) == 1 and 64 + windows.pop() >= 320
        assert draws[0].layers != draws[1].layers
        assert entries[1].plan_for(L).layers == draws[0].layers  # seeded: the same heads when asked again
    small = resolve_plans([str(path), "random-full@0.05", "streaming@0.05"], smollm2)
    assert small[1].plan_for(1024).layers == small[2].plan_for(1024).layers  # no full head fits: streaming
    with pytest.raises(InputError, match="only random-full"):
        resolve_plans([str(path), "streaming@equal:1"], smollm2)


def test_equal_memory_baseline_needs_a_plan_file(smollm2):
    with pytest.raises(InputError, match="list a plan file"):
        resolve_plans(["dense", "streaming@equal"], smollm2)


def test_unknown_plan_spec_says_what_is_accepted(smollm2):
    with pytest.raises(InputError, match="streaming@equal"):
        resolve_plans(["sparse"], smollm2)


def _cfg(tmp_path, **kw):
    base = dict(model="smollm2-135m", plans=["dense"], tasks=["passkey"], lengths=[96], depths=[0.5], samples=1,
                out=tmp_path / "out", max_new_tokens=4, progress=False, command="pytest")
    return EvalConfig(**(base | kw))


def test_length_above_context_stops_when_asked(smollm2, tmp_path):
    with pytest.raises(ContextLengthError, match="exceeds smollm2-135m's context of 8192"):
        run_eval(_cfg(tmp_path, lengths=[9000], on_too_long="stop"), smollm2)


def test_a_length_just_under_the_context_names_the_longest_that_fits(smollm2, tmp_path):
    """8100 + the answer is under 8192, but prompts may run 2% over their length: the error says so and names the
    longest length that fits (it once read as if 8100 + 4 were past 8192)."""
    with pytest.raises(ContextLengthError, match="2% over") as info:
        run_eval(_cfg(tmp_path, lengths=[8100], on_too_long="stop"), smollm2)
    fits = int(re.search(r"longest that fits is (\d+)", str(info.value)).group(1))
    assert 7900 < fits < 8100


def test_length_above_context_is_skipped_with_a_note(smollm2, tmp_path):
    res = run_eval(_cfg(tmp_path, lengths=[9000]), smollm2)
    assert res["lengths"] == [] and res["rows"] == []
    assert any("9000" in n and "skipped" in n for n in res["notes"])


def test_plans_that_are_one_plan_at_a_length_say_so(smollm2, tmp_path):
    """random-full@F with no room for a whole head is streaming@F itself: the table shows two rows of the same runs,
    and a note says why (it read as a coincidence in run 29)."""
    _, path = _streaming_plan_with_full_heads(smollm2.spec, 192, 3, tmp_path)
    res = run_eval(_cfg(tmp_path, plans=[str(path), "random-full@0.05", "streaming@0.05"], lengths=[1024]), smollm2)
    assert any(n.startswith("at 1024 tokens random-full@0.05 and streaming@0.05 are one plan") for n in res["notes"])
    assert not any(str(path) in n for n in res["notes"] if "one plan" in n)


def test_tiny_eval_writes_results_and_report_then_resumes_without_model_work(smollm2, tmp_path):
    cfg = _cfg(tmp_path, plans=["dense", "streaming@0.5"], tasks=["passkey", "fidelity"])
    res = run_eval(cfg, smollm2)
    out = cfg.out
    saved = json.loads((out / "results.json").read_text())
    assert saved["model"] == "smollm2-135m" and saved["seed"] == 0
    assert {p["label"] for p in saved["plans"]} == {"dense", "streaming@0.5"}
    assert len(saved["rows"]) == 2 and {r["task"] for r in saved["fidelity"]} == {"fidelity"}
    kv = {r["plan"]: r["kv_bytes"] for r in saved["performance"]}
    assert kv["streaming@0.5"] < kv["dense"]
    # Streaming never cycles: its measured peak is its count after the prompt (both over dense at the same length).
    for r in saved["performance"]:
        assert r["kv_fraction_measured"] == r["kv_fraction_measured_prefill"] is not None
    assert res["runs_this_time"] == 4  # 2 plans x (1 passkey sample + fidelity)
    files = write_report(saved, out)
    page = files["html"].read_text()
    assert "data:image/png;base64," in page and "pytest" in page

    calls = []
    hook = smollm2.model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = run_eval(cfg, smollm2)
    finally:
        hook.remove()
    assert calls == [] and again["runs_this_time"] == 0
    assert again["accuracy"] == res["accuracy"]


def test_rows_of_another_prefill_chunk_size_are_not_reused(smollm2, tmp_path):
    cfg = _cfg(tmp_path, plans=["dense"], tasks=["passkey"])
    assert run_eval(cfg, smollm2)["runs_this_time"] == 1
    assert run_eval(cfg, smollm2)["runs_this_time"] == 0  # the same chunk size: reused
    other = _cfg(tmp_path, plans=["dense"], tasks=["passkey"], chunk_size=32)
    assert run_eval(other, smollm2)["runs_this_time"] == 1  # a prompt of 96 tokens in chunks of 32: run again
    assert run_eval(other, smollm2)["runs_this_time"] == 0


def test_rows_of_another_dtype_are_not_reused(smollm2, tmp_path):
    """A run in bfloat16 on the CPU (not its default) does not resume from the float32 rows in the same directory,
    nor they from it: on SmolLM2's 2K passkey the dtype alone moves dense by 13 points (docs/quality.md)."""
    from headwise.models import load_model

    cfg = _cfg(tmp_path, plans=["dense"], tasks=["passkey"])
    assert run_eval(cfg, smollm2)["runs_this_time"] == 1
    bf16 = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    assert run_eval(cfg, bf16)["runs_this_time"] == 1  # float32's row is not bfloat16's
    assert run_eval(cfg, bf16)["runs_this_time"] == 0
    assert run_eval(cfg, smollm2)["runs_this_time"] == 0  # float32's row kept its old key
    keys = [json.loads(json.loads(line)["key"])[0] for line in (cfg.out / "samples.jsonl").read_text().splitlines()]
    assert set(keys) == {"smollm2-135m:30x3x64", "smollm2-135m:30x3x64:bfloat16"}


def test_float32_logits_are_a_run_of_their_own_and_leave_the_model_as_it_was(smollm2, tmp_path):
    """``--fp32-logits`` on a bfloat16 model: its rows do not resume from (nor feed) a bfloat16 run's, since the
    logits' rounding decides greedy ties; the results say so; the model's own head is back after the run. On a
    float32 model the logits are float32 already: the same rows."""
    from headwise.models import Fp32Logits, load_model

    bf16 = load_model("smollm2-135m", device="cpu", dtype="bfloat16")
    head = bf16.model.get_output_embeddings()
    cfg = _cfg(tmp_path, plans=["dense"], tasks=["passkey"])
    f32 = _cfg(tmp_path, plans=["dense"], tasks=["passkey"], fp32_logits=True)
    assert run_eval(cfg, bf16)["runs_this_time"] == 1
    res = run_eval(f32, bf16)
    assert res["runs_this_time"] == 1 and res["logits_dtype"] == "float32"
    assert run_eval(f32, bf16)["runs_this_time"] == 0 and run_eval(cfg, bf16)["runs_this_time"] == 0
    assert bf16.model.get_output_embeddings() is head and not isinstance(head, Fp32Logits)
    assert "logits_dtype" not in run_eval(cfg, bf16)
    assert run_eval(cfg, smollm2)["runs_this_time"] == 1 and run_eval(f32, smollm2)["runs_this_time"] == 0


def test_float32_logits_are_the_heads_product_unrounded(tiny_llama):
    """``models.fp32_logits``: inside, a bfloat16 model's logits are float32 and equal the float32 product of its
    last hidden state and head weight (bfloat16 logits of a 49K vocabulary hold a few thousand distinct values)."""
    import copy

    import torch

    from headwise.models import LoadedModel, fp32_logits

    model = copy.deepcopy(tiny_llama.model).to(torch.bfloat16)
    lm = LoadedModel("tiny-llama", model, tiny_llama.tokenizer, tiny_llama.spec, "random")
    ids = torch.tensor([[5, 17, 300, 42, 7, 99]])
    engine = Engine(lm, None)
    rounded = engine.logits(ids)[0, -1]
    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, -1]
    with fp32_logits(lm):
        exact = engine.logits(ids)[0, -1]
    assert rounded.dtype == torch.bfloat16 and exact.dtype == torch.float32
    want = hidden.float() @ model.get_output_embeddings().weight.float().T
    assert torch.allclose(exact, want, atol=1e-4)
    assert (exact - rounded.float()).abs().max() <= exact.abs().max() / 128  # bfloat16's rounding, no more
    assert exact.unique().numel() > rounded.unique().numel()


def test_sample_keys_name_a_dtype_only_where_it_is_not_the_devices_default():
    assert dtype_tag("float32", on_gpu=False) is None and dtype_tag("bfloat16", on_gpu=True) is None
    assert dtype_tag("float32", on_gpu=True) == "float32" and dtype_tag("bfloat16", on_gpu=False) == "bfloat16"
    assert model_key("m", 2, 3, 4) == "m:2x3x4"
    assert model_key("m", 2, 3, 4, 32, "float32") == "m:2x3x4:chunk32:float32"


@pytest.mark.parametrize("prompt", [40, 45])
def test_measured_kv_peaks_while_decoding_at_the_plans_peak(prompt):
    """The memory row decodes after the prompt: a quantized plan's residual grows back to its largest (here within
    the 15 steps: group 8), so the measured peak is the plan's predicted peak at the request's length, above the
    count after the prompt. At 40 tokens (40 - residual 8 is a multiple of the group) the residual after the prompt
    is at its shortest: read there alone, the lucky length gave the least the plan ever holds."""
    lm = tiny_model("llama")
    plan = HeadPlan.uniform(lm.spec, {"policy": "quantized", "params": {"bits": 4, "group": 8, "residual": 8}}, "tiny")
    got = measure_kv(Engine(lm, plan), prompt)
    total, item = prompt + 15, lm.dtype.itemsize
    assert got["tokens"] == total and got["kv_bytes_allocator"] is None and not got["cuda_graph"]
    assert got["kv_bytes_tensors_peak"] == plan.kv_bytes(lm.spec, total, item, peak=True) <= lm.spec.dense_kv_bytes(total, item)
    assert got["kv_bytes_tensors"] < got["kv_bytes_tensors_peak"]
    dense = HeadPlan.dense(lm.spec, "tiny")
    flat = measure_kv(Engine(lm, dense), prompt)
    assert flat["kv_bytes_tensors"] == flat["kv_bytes_tensors_peak"] == lm.spec.dense_kv_bytes(total, item)


class _EosTokenizer:
    """No text, and an EOS the greedy loop samples: a measurement that stopped at EOS would generate fewer tokens."""

    def __init__(self, eos: int):
        self.eos_token_id = eos

    def decode(self, ids, skip_special_tokens=True):
        return ""


@contextmanager
def _fed(model) -> Iterator[list[list[int]]]:
    """The ids fed to ``model``, forward by forward."""
    fed: list[list[int]] = []
    hook = model.register_forward_hook(lambda m, a, kw, o: fed.append(kw["input_ids"][0].tolist()), with_kwargs=True)
    try:
        yield fed
    finally:
        hook.remove()


def _hand_loop_kv(engine: Engine, length: int, new: int, cuda: bool = False) -> dict:
    """The memory row as measured before it ran through ``Engine.step`` (issue 19): a prefill into a cache reserved
    by hand, then ``new - 1`` greedy decode steps counted by hand, from the engine's CUDA-graph decoder where it
    gives one; the allocator read after the prefill and each eager step, and under a graph once it is freed."""
    import torch

    lm = engine.lm
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        m0 = torch.cuda.memory_allocated(lm.device)

    def allocator() -> int | None:
        if not cuda:
            return None
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated(lm.device) - m0

    cache = engine.new_cache(1, reserve=length + new - 1)
    ids = torch.randint(0, min(1000, lm.model.config.vocab_size), (1, length))
    logits = engine.prefill(ids.to(lm.device), cache)
    token = int(logits[0].argmax())
    del logits
    out = {"kv_bytes_tensors": engine.kv_bytes(cache), "kv_bytes_allocator": allocator()}
    peak = [out["kv_bytes_tensors"], out["kv_bytes_allocator"]]

    def seen(allocated: int | None) -> None:
        peak[0] = max(peak[0], engine.kv_bytes(cache))
        if allocated is not None:
            peak[1] = max(peak[1] or 0, allocated)

    decoder = engine.graph_decoder(cache, new - 1)
    graph = False
    for _ in range(new - 1):
        cache.decode_step += 1
        if decoder is not None:
            token = int(decoder.step(token)[0].argmax())
            seen(None)
            continue
        ids = torch.tensor([[token]], device=lm.device)
        logits = engine.forward(ids, cache)
        token = int(logits[0].argmax())
        del logits, ids
        seen(allocator())
    if decoder is not None:
        graph = decoder.graph is not None
        del decoder
        seen(allocator())
    return out | {"kv_bytes_tensors_peak": peak[0], "kv_bytes_allocator_peak": peak[1], "cuda_graph": graph,
                  "tokens": length + new - 1}


@pytest.mark.parametrize("policy", [
    {"policy": "quantized", "params": {"bits": 4, "group": 8, "residual": 8}},
    {"policy": "streaming", "params": {"sink": 4, "window": 16}},
], ids=["quantized", "streaming"])
def test_measured_kv_runs_the_engines_loop_as_the_hand_loop_did(policy):
    """``measure_kv`` steps one request through ``Engine.step`` (prompt chunks of 16, then decode steps): it feeds
    the model exactly what a hand-written prefill and greedy decode loop over the same random prompt feeds it (so it
    generated the ``new`` tokens, EOS ignored: here the tokenizer's EOS is the first token sampled), and reads the
    same bytes after the prompt and at their peak. It leaves no live sequence behind, and refuses an engine that has
    one."""
    import torch

    from headwise.models import LoadedModel

    base = tiny_model("llama")
    plan = HeadPlan.uniform(base.spec, policy, "tiny")
    torch.manual_seed(3)
    with _fed(base.model) as want:
        ref = _hand_loop_kv(Engine(base, plan, chunk_size=16), 45, 16)
    assert [len(f) for f in want] == [16, 16, 13] + [1] * 15
    lm = LoadedModel(base.name, base.model, _EosTokenizer(want[3][0]), base.spec, base.source)
    engine = Engine(lm, plan, chunk_size=16)
    torch.manual_seed(3)
    with _fed(lm.model) as fed:
        got = measure_kv(engine, 45, 16)
    assert fed == want
    assert got == ref and got["kv_bytes_allocator"] is None and not got["cuda_graph"] and got["tokens"] == 60
    if policy["policy"] == "quantized":
        assert got["kv_bytes_tensors"] < got["kv_bytes_tensors_peak"], "45 tokens: the residual grows while decoding"
    assert engine.live == []
    engine.add([1, 2, 3], max_new_tokens=2)
    with pytest.raises(InputError, match="no live sequences"):
        measure_kv(engine, 45, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [None, False], ids=["graph", "eager"])
@pytest.mark.parametrize("policy", [
    {"policy": "quantized", "params": {"bits": 4, "group": 8, "residual": 8}},
    {"policy": "streaming", "params": {"sink": 4, "window": 64}},
], ids=["quantized", "streaming"])
def test_measured_kv_on_cuda_reads_what_the_hand_loop_read(policy, graphs):
    """On CUDA, from a CUDA graph or eagerly: ``measure_kv`` through ``Engine.step`` and the hand loop it replaced,
    on one engine after a first round (as the eval runs it), read the same tensors, the same graph use and the
    allocator within its rounding of each tensor to 512 bytes."""
    import torch

    lm = tiny_model("llama")
    lm.model.to("cuda", torch.bfloat16)
    engine = Engine(lm, HeadPlan.uniform(lm.spec, policy, "tiny"), chunk_size=128, cuda_graphs=graphs)
    measure_kv(engine, 300, cuda=True)  # the first round allocates the kernels' own buffers
    torch.manual_seed(3)
    ref = _hand_loop_kv(engine, 300, 16, cuda=True)
    torch.manual_seed(3)
    got = measure_kv(engine, 300, cuda=True)
    assert got["cuda_graph"] == ref["cuda_graph"] == (graphs is None)
    for key in ("kv_bytes_tensors", "kv_bytes_tensors_peak", "tokens"):
        assert got[key] == ref[key], key
    rounding = 512 * 9 * lm.spec.num_layers  # 8 tensors and the bounds per layer's store
    for key in ("kv_bytes_allocator", "kv_bytes_allocator_peak"):
        assert abs(got[key] - ref[key]) <= rounding, (key, got[key], ref[key])


@pytest.mark.gpu
def test_measured_kv_under_a_cuda_graph_is_the_plans_peak_by_both_counts():
    """On CUDA the memory row decodes from a CUDA graph where the engine would (a quantized plan reserved for 315
    tokens allows one): the tensors hold the plan's peak, and the allocator, read once the graph and its buffers are
    freed, holds the same bytes up to its rounding of each tensor to 512 bytes."""
    import torch

    lm = tiny_model("llama")
    lm.model.to("cuda", torch.bfloat16)
    plan = HeadPlan.uniform(lm.spec, {"policy": "quantized", "params": {"bits": 4, "group": 8, "residual": 8}}, "tiny")
    engine = Engine(lm, plan)
    measure_kv(engine, 300, cuda=True)  # as the eval does: the first round allocates the kernels' own buffers
    got = measure_kv(engine, 300, cuda=True)
    peak = plan.kv_bytes(lm.spec, 315, 2, peak=True)
    assert got["cuda_graph"] and got["kv_bytes_tensors_peak"] == peak > got["kv_bytes_tensors"]
    rounding = 512 * 9 * lm.spec.num_layers  # 8 tensors and the bounds per layer's store
    assert peak <= got["kv_bytes_allocator_peak"] <= peak + rounding


def test_cli_reports_bad_task_in_one_line(capsys):
    from headwise.cli import main

    assert main(["eval", "smollm2-135m", "--tasks", "haystack"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'haystack'" in err[0]


def test_jobs_run_in_rounds_so_a_cut_run_keeps_depths_balanced():
    from headwise.eval.runner import cell_samples, job_order

    jobs = job_order([1024, 2048], ["passkey", "multikey_needle"], [0.1, 0.5, 0.9], 9)
    assert sorted(jobs) == sorted((L, t, d, i) for L in (1024, 2048) for t in ("passkey", "multikey_needle")
                                  for d, i in cell_samples(t, [0.1, 0.5, 0.9], 9))
    # A prefix (here a third), and the first jobs of four shards cut at once (shard i runs jobs[i::4]), hold every
    # cell at every depth, no depth two samples ahead of another.
    shards_cut = [j for i in range(4) for j in jobs[i::4][:3]]
    for part in (jobs[: len(jobs) // 3], shards_cut):
        counts: dict[tuple, int] = {}
        for L, t, d, _ in part:
            counts[(L, t, d)] = counts.get((L, t, d), 0) + 1
        for L in (1024, 2048):
            for t in ("passkey", "multikey_needle"):
                per = [counts.get((L, t, d), 0) for d in ((None,) if t == "multikey_needle" else (0.1, 0.5, 0.9))]
                assert min(per) >= 1 and max(per) - min(per) <= 1, (L, t, per)


def test_rows_reused_without_timings_count_for_accuracy_not_speed(tiny_llama, tmp_path):
    """Run 10 reused run 9's dense rows from a results file whose rows keep no timings (slim rows): the collect step
    raised KeyError 'prefill_s'. Such rows count for accuracy and the KV held; speed is over the rows that were timed."""
    import json

    from headwise.eval.runner import EvalConfig, run_eval

    cfg = dict(model="tiny", plans=["dense"], tasks=["passkey"], lengths=[200], depths=[0.25, 0.75], samples=2,
               max_new_tokens=4, progress=False, command="pytest")
    first = run_eval(EvalConfig(**cfg, out=tmp_path / "a"), tiny_llama)
    keep = ("prompt_tokens", "new_tokens", "kv_bytes", "dense_kv_bytes", "kv_fraction", "cuda_graph")
    rows = [json.loads(line) for f in (tmp_path / "a").glob("samples*.jsonl") for line in f.read_text().splitlines()]
    slim = [r | {"stats": {k: v for k, v in r["stats"].items() if k in keep}} if r.get("task") == "passkey" and
            r.get("depth") == 0.25 else r for r in rows]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "samples-reused.jsonl").write_text("".join(json.dumps(r) + "\n" for r in slim))
    again = run_eval(EvalConfig(**cfg, out=tmp_path / "b"), tiny_llama)
    assert again["accuracy"] == first["accuracy"]
    perf = next(p for p in again["performance"] if p["plan"] == "dense")
    assert perf["runs"] == 1 and perf["prefill_s"] is not None  # the one timed row (depth 0.75)
    before = next(p for p in first["performance"] if p["plan"] == "dense")
    assert (perf["kv_bytes"], perf["kv_fraction"]) == (before["kv_bytes"], before["kv_fraction"])  # every row
    (tmp_path / "c").mkdir()  # every row reused without timings: the KV held is still known, the speed is not
    (tmp_path / "c" / "samples-reused.jsonl").write_text("".join(
        json.dumps(r | {"stats": {k: v for k, v in r["stats"].items() if k in keep}} if r.get("task") == "passkey"
                   else r) + "\n" for r in rows))
    only = next(p for p in run_eval(EvalConfig(**cfg, out=tmp_path / "c"), tiny_llama)["performance"]
                if p["plan"] == "dense")
    assert (only["runs"], only["prefill_s"], only["kv_bytes"]) == (0, None, before["kv_bytes"])
    # rows carried from a results file (bench/carry_rows.py: stats keep new_tokens, kv_fraction and finish_reason)
    # beside new rows: run 37's collect raised KeyError 'kv_bytes'; the bytes are the new rows', the fraction all rows'
    (tmp_path / "d").mkdir()
    carried = ("new_tokens", "kv_fraction", "finish_reason")
    (tmp_path / "d" / "samples-reused.jsonl").write_text("".join(
        json.dumps(r | {"stats": {k: v for k, v in r["stats"].items() if k in carried}} if r.get("task") == "passkey"
                   and r.get("depth") == 0.25 else r) + "\n" for r in rows))
    mixed = next(p for p in run_eval(EvalConfig(**cfg, out=tmp_path / "d"), tiny_llama)["performance"]
                 if p["plan"] == "dense")
    assert (mixed["runs"], mixed["kv_bytes"], mixed["kv_fraction"]) == (1, before["kv_bytes"], before["kv_fraction"])


def test_the_report_names_the_cells_a_run_left_short():
    """A run cut short (run 13: 27-42 prompts in cells of 100) says so under the header; pooled rows are not cells."""
    from headwise.eval.report import report_header, short_cells

    results = {"model": "m", "device": "cpu", "seed": 0, "samples": 100, "tasks": ["passkey"], "lengths": [2048],
               "plans": [{"label": "dense"}, {"label": "p"}],
               "accuracy": [{"plan": "dense", "task": "passkey", "length": 2048, "score": 0.9, "n": 100},
                            {"plan": "p", "task": "passkey", "length": 2048, "score": 0.8, "n": 34},
                            {"plan": "random@equal, 5 draws pooled", "task": "passkey", "length": 2048,
                             "score": 0.7, "n": 160, "pooled": ["a"]}]}
    assert short_cells(results) == ["p passkey 2K (34/100)"]
    header = report_header(results)
    assert len(header) == 2 and header[1].startswith("warning: 1 cell(s) hold fewer samples than asked")
    results["accuracy"][1]["n"] = 100
    assert short_cells(results) == [] and len(report_header(results)) == 1

