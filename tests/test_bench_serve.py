"""``headwise bench serve``'s load and in-process driver (the HTTP driver runs the same requests through the
server, covered by the server tests)."""

from __future__ import annotations

import gc
import itertools
import json
import math
import sys
import time
import types

import pytest
import torch

from headwise import random_model
from headwise.bench.serve import (
    Load,
    _StepCounters,
    parse_mix,
    preset_plan,
    run_in_process,
    weight_bytes_read,
)
from headwise.cli import main
from headwise.engine import Engine
from headwise.errors import InputError, ModelLoadError, PlanError
from headwise.models import load_model, local_dir
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from headwise.policies.vertical_slash import VerticalSlash
from headwise.pool import PagePool
from headwise.spec import ModelSpec
from tiny import tiny_model


def test_poisson_arrivals_start_at_zero_and_grow_at_about_the_rate():
    at = Load(requests=200, rate=4.0).arrivals()
    assert at[0] == 0 and all(b >= a for a, b in itertools.pairwise(at))
    assert 199 / 4.0 * 0.7 < at[-1] < 199 / 4.0 * 1.3
    assert Load(requests=3, rate=math.inf).arrivals() == [0.0, 0.0, 0.0]


def test_in_process_load_generates_every_token_and_counts_pages():
    lm = tiny_model("llama", vocab_size=512)
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    out = run_in_process(Engine(lm, chunk_size=16, pool=pool), Load(requests=3, prompt_len=20, output_len=4))
    assert out["output_tokens"] == 12 and out["peak_concurrency"] == 3 and out["preemptions"] == 0
    assert out["decode_only_steps"] >= 2 and out["decode_only_graph_steps"] == 0, "no CUDA graph on the CPU"
    # Dense tiny llama: 4 layers x 2 KV heads, 23 tokens at most -> 6 pages of 4 tokens per head.
    assert out["peak_kv_bytes"] == 3 * 4 * 2 * 6 * pool.page_bytes
    assert pool.free_pages == pool.num_pages


# ------------------------------------------------------------------ random models, mixes, time caps (issue 13's run)
def test_random_llama_3_8b_has_the_issue_shapes_and_a_layer_override():
    spec = ModelSpec.from_config(random_model.config("random:llama-3-8b"))
    assert (spec.num_layers, spec.num_q_heads, spec.num_kv_heads, spec.head_dim) == (32, 32, 8, 128)
    assert spec.max_context >= 131072 + 256, "a 128K prompt and its 256 new tokens must fit"
    assert ModelSpec.from_config(random_model.config("random:llama-3-8b,layers=2")).num_layers == 2
    with pytest.raises(ModelLoadError, match="presets: llama-3-8b"):
        random_model.config("random:llama-9")
    with pytest.raises(ModelLoadError, match="layers=N"):
        random_model.config("random:llama-3-8b,layers=0")


def test_a_random_model_is_built_in_the_asked_dtype_without_a_tokenizer():
    lm = load_model("random:tiny-llama", device="cpu", dtype="bfloat16")
    assert lm.tokenizer is None and lm.dtype == torch.bfloat16 and lm.spec.num_kv_heads == 4
    w = lm.model.model.layers[0].self_attn.q_proj.weight
    assert 0.01 < w.float().std().item() < 0.03, "transformers' normal init, std 0.02"
    with pytest.raises(ModelLoadError, match="no model directory"):
        local_dir("random:tiny-llama")


def test_a_mix_offers_its_groups_in_order_and_one_length_keeps_the_old_prompts():
    load = Load(mix=parse_mix("3x40,2x70"), output_len=4)
    assert load.requests == 5 and load.prompt_lens() == [40, 40, 40, 70, 70]
    assert [len(p) for p in load.prompts(512)] == [40, 40, 40, 70, 70]
    assert load.prompts(512) == Load(mix=((3, 40), (2, 70))).prompts(512), "seeded"
    old = torch.randint(256, 512, (3, 20), generator=torch.Generator().manual_seed(0)).tolist()
    assert Load(requests=3, prompt_len=20).prompts(512) == old
    with pytest.raises(InputError, match="COUNTxPROMPT_LEN"):
        parse_mix("64x32k")


def test_the_duo25_presets_make_a_quarter_of_the_heads_full_and_the_rest_streaming():
    spec = ModelSpec.from_config(random_model.config("random:llama-3-8b"))
    for name, first in (("duo25", Full), ("duo25-vs", VerticalSlash), ("duo25-vst", VerticalSlash)):
        plan = preset_plan(name, spec)
        for row in plan.policies():
            assert [type(p) for p in row] == [first] * 2 + [Streaming] * 6
            if first is VerticalSlash:
                assert row[0].columns == ("tokens" if name == "duo25-vst" else "blocks")
            assert row[2] == Streaming(sink=64, window=256)
            assert all(getattr(p, "decode", Full()) == Full() for p in row[:2]), "full heads keep every token"
        assert 0.25 < plan.kv_fraction(spec, 32768) < 0.26
    with pytest.raises(PlanError, match="rounds to 0"):
        HeadPlan.split(tiny_model("llama").spec, 0.25, {"policy": "full"}, {"policy": "streaming"})


@pytest.mark.parametrize("plan", ["duo25-vs", "duo25-vst"])
def test_bench_serve_runs_a_mix_on_a_random_model_in_process_and_writes_the_json(tmp_path, capsys, plan):
    rc = main(["bench", "serve", "--model", "random:tiny-llama", "--plan", plan, "--mix", "3x40,2x70",
               "--output-len", "4", "--chunk-size", "32", "--kv-memory", "0.01", "--warmup", "--out-dir", str(tmp_path)])
    assert rc == 0 and "skipping --mode http" in capsys.readouterr().out
    (path,) = tmp_path.glob(f"serve_{plan}_*.json")
    res = json.loads(path.read_text())["results"]
    out = res["in-process"]
    assert not out["partial"] and out["finished"] == 5 and out["output_tokens"] == 20 and "http" not in res
    assert {k: v["finished"] for k, v in out["by_prompt_len"].items()} == {"40": 3, "70": 2}
    assert out["prompt_tokens_read"] == 3 * 40 + 2 * 70 and out["peak_concurrency"] >= 2
    assert res["plan_summary"].startswith("6×streaming, 2×vertical_slash")
    assert out["gc_frozen_objects"] > 1000  # the model and the engine, frozen after the warm-up
    assert gc.get_freeze_count() == 0  # and thawed when the run ends


def test_decode_steps_report_their_read_rate_from_the_weights_and_the_pages_held():
    """With the weights' bytes and a pool, each decode-only step's read rate is (weights + KV pages held) / its time,
    recomputed here from the steps themselves; without the weights, no rate."""
    lm = tiny_model("llama", vocab_size=512)
    weights = weight_bytes_read(lm.model)
    params = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    emb = lm.model.get_input_embeddings().weight
    tied = lm.model.get_output_embeddings().weight is emb
    assert weights == params - (0 if tied else emb.numel() * emb.element_size())
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool)
    seen: list[float] = []
    step = engine.step

    def recorded():
        info = step()
        if info.decode_rows and not info.prefill_tokens:
            held = (pool.num_pages - pool.free_pages) * pool.page_bytes + sum(s.stats.kv_bytes for s in info.finished)
            seen.append((weights + held) / info.seconds / 1e9)
        return info

    engine.step = recorded
    out = run_in_process(engine, Load(mix=((2, 20),), output_len=6), log=lambda line: None, weights=weights)
    want = torch.tensor(seen, dtype=torch.float64)
    assert len(seen) == out["decode_only_steps"] >= 4
    assert out["decode_only_read_gb_per_s"]["p50"] == pytest.approx(float(want.quantile(0.5)), rel=1e-3, abs=1e-4)
    assert out["decode_only_read_gb_per_s"]["mean"] == pytest.approx(float(want.mean()), rel=1e-3, abs=1e-4)
    assert "decode_only_read_gb_per_s" not in run_in_process(Engine(lm, chunk_size=16, pool=pool),
                                                             Load(mix=((1, 20),), output_len=3), log=lambda line: None)


def test_prompt_steps_are_timed_and_the_asked_steps_profiled():
    """Every step that reads prompt tokens is timed with the decode rows it carried, except the profiled ones, which
    land in ``profiled_steps`` with what they carried and their kernels (here, on the CPU, their operators)."""
    lm = tiny_model("llama", vocab_size=512)
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool)
    carried: list[tuple[int, int]] = []  # (prompt tokens, decode rows) of each step, in order
    starts: list[list[int]] = []  # the prompt positions each step's chunks started at
    step = engine.step

    def recorded():
        info = step()
        carried.append((info.prefill_tokens, info.decode_rows))
        starts.append(info.chunk_starts)
        return info

    engine.step = recorded
    # Three prompts of 40 tokens, 16-token chunks (a step takes chunks until 16 prompt tokens are spent: 7 steps
    # read the 120 tokens): the later chunks ride with earlier decodes.
    out = run_in_process(engine, Load(requests=3, prompt_len=40, output_len=5), log=lambda line: None,
                         profile_steps=(2, 5))
    prompt = [i + 1 for i, (tokens, _) in enumerate(carried) if tokens]
    assert len(prompt) == 7 and 2 in prompt and 5 in prompt
    assert out["prompt_steps"] == len(prompt) - 2, "the two profiled steps are left out"
    rows = [carried[i - 1][1] for i in prompt if i not in (2, 5)]
    assert max(rows) >= 1, "some prompt step carried decode rows"
    assert out["prompt_step_decode_rows"]["mean"] == pytest.approx(sum(rows) / len(rows), rel=1e-6)
    assert 0 < out["prompt_step_ms"]["p50"] <= 1e3 * out["prompt_steps_s"]
    assert [p["step"] for p in out["profiled_steps"]] == [2, 5]
    # the slowest prompt steps (here all five timed ones, slowest first) with what they carried
    slow = out["slowest_prompt_steps"]
    assert sorted(p["step"] for p in slow) == [i for i in prompt if i not in (2, 5)]
    assert [p["ms"] for p in slow] == sorted((p["ms"] for p in slow), reverse=True)
    for p in slow:
        assert p["decode_rows"] == carried[p["step"] - 1][1] and p["chunk_starts"] == starts[p["step"] - 1]
        assert p["compiled_graphs"] == 0 and p["preempted"] == 0 and 0 <= p["gc_ms"] <= p["ms"]
    assert out["gc_s"] >= 0
    assert sorted(x for s in starts for x in s) == sorted([0, 16, 32] * 3)
    for p in out["profiled_steps"]:
        assert (p["prefill_tokens"], p["decode_rows"]) == carried[p["step"] - 1]
        assert p["ops"] and "gpu_busy_ms" in p
    assert out["output_tokens"] == 15
    decode_only = [i + 1 for i, (tokens, rows) in enumerate(carried) if rows and not tokens]
    assert out["decode_only_steps"] == len(decode_only)
    slow_decode = out["slowest_decode_only_steps"]  # the decode-only steps, slowest first, with what they ran
    assert len(decode_only) <= 8 and sorted(p["step"] for p in slow_decode) == decode_only
    assert [p["ms"] for p in slow_decode] == sorted((p["ms"] for p in slow_decode), reverse=True)
    assert slow_decode[0]["ms"] >= out["decode_only_step_ms"]["p50"]
    for p in slow_decode:  # on the CPU no step replays a graph
        assert p["rows"] == carried[p["step"] - 1][1] and p["forwards"] >= 1 and p["graph"] is False
    # A profiled decode-only step is left out of the decode-only timings as well.
    again = run_in_process(Engine(lm, chunk_size=16, pool=pool), Load(requests=3, prompt_len=40, output_len=5),
                           log=lambda line: None, profile_steps=(decode_only[0],))
    assert again["decode_only_steps"] == len(decode_only) - 1 and again["prompt_steps"] == len(prompt)
    assert again["profiled_steps"][0]["prefill_tokens"] == 0 and again["profiled_steps"][0]["decode_rows"] >= 1


def test_profile_steps_are_numbers_from_one():
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--model", "random:tiny-llama", "--profile-steps", "0,3"])
    with pytest.raises(SystemExit):
        main(["bench", "serve", "--model", "random:tiny-llama", "--profile-steps", "a"])


def test_multi_step_decode_steps_report_per_forward_times_and_rates():
    """Under ``multi_step``, a decode-only step runs several forwards: its time and read rate are per forward."""
    lm = tiny_model("llama", vocab_size=512)
    weights = weight_bytes_read(lm.model)
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool, padded_decode=True, multi_step=3)
    seen: list[tuple[int, float]] = []
    step = engine.step

    def recorded():
        info = step()
        if info.decode_rows and not info.prefill_tokens:
            held = (pool.num_pages - pool.free_pages) * pool.page_bytes + sum(s.stats.kv_bytes for s in info.finished)
            seen.append((info.decode_steps, (weights + held) / (info.seconds / info.decode_steps) / 1e9))
        return info

    engine.step = recorded
    out = run_in_process(engine, Load(mix=((2, 20),), output_len=8), log=lambda line: None, weights=weights)
    assert out["output_tokens"] == 16 and any(n == 3 for n, _ in seen), seen
    want = torch.tensor([r for _, r in seen], dtype=torch.float64)
    assert out["decode_only_read_gb_per_s"]["mean"] == pytest.approx(float(want.mean()), rel=1e-3, abs=1e-4)


def test_max_seconds_stops_the_run_and_keeps_what_was_measured(tmp_path):
    lm = tiny_model("llama", vocab_size=512)
    pool = PagePool(lm.spec, 1 << 24, dtype_bytes=4, page_size=4)
    engine = Engine(lm, chunk_size=16, pool=pool)
    lines: list[str] = []
    # A quick first request, then far more work than the cap allows.
    load = Load(mix=((1, 16), (6, 400)), output_len=300)
    out = run_in_process(engine, load, deadline=time.perf_counter() + 1.5, progress_s=0.2, log=lines.append)
    assert out["partial"] and out["finished"] < load.requests and out["added"] == load.requests
    assert out["first_tokens"] >= 1 and out["output_tokens"] >= 1 and out["ttft_s"]["p50"] > 0
    assert out["by_prompt_len"]["16"]["first_tokens"] == 1
    assert lines and lines[-1].endswith("stopped at --max-seconds") and len(lines) >= 3
    assert not engine.live and pool.free_pages == pool.num_pages, "the live sequences were aborted, pages returned"
    rc = main(["bench", "serve", "--model", "random:tiny-llama", "--requests", "2", "--prompt-len", "40",
               "--max-seconds", "0", "--compile-layers", "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("serve_dense_*.json")
    res = json.loads(path.read_text())["results"]
    assert rc == 0 and res["max_seconds"] == 0 and res["in-process"]["partial"] and res["in-process"]["finished"] == 0
    assert res["compile_layers"] is True


def test_warmup_compiles_every_step_shape_the_mix_runs(tmp_path):
    """With ``--compile-layers``, the warm-up's two overlapping requests run the steps the mix runs (one sequence's
    chunk, two sequences' chunks, a chunk beside a decoding row), so the measured run compiles no graph: run 18 spent
    3.7 s of each plan's mix compiling in its first step with two sequences."""
    rc = main(["bench", "serve", "--model", "random:tiny-llama", "--plan", "duo25-vs", "--mix", "3x40,2x70",
               "--output-len", "4", "--chunk-size", "32", "--kv-memory", "0.01", "--warmup", "--compile-layers",
               "--out-dir", str(tmp_path)])
    (path,) = tmp_path.glob("serve_duo25-vs_*.json")
    out = json.loads(path.read_text())["results"]["in-process"]
    assert rc == 0 and out["finished"] == 5
    steps = out["slowest_prompt_steps"]
    assert any(len(s["chunk_starts"]) == 2 for s in steps) and any(s["decode_rows"] for s in steps)
    assert sum(s["compiled_graphs"] for s in steps) == 0, steps


def test_step_counters_count_headwise_triton_kernels_behind_their_wrappers(monkeypatch):
    """The kernels a step loaded: each JITFunction's per-device cache entries, found in headwise's modules also behind
    an autotuner's ``fn``, counted once however many names hold them; a module imported later is looked at too."""
    from triton.runtime.jit import JITFunction

    def kernel(x):
        pass

    jit = JITFunction(kernel)
    module = types.ModuleType("headwise._counted_kernels")
    module.k, module.tuned, module.other = jit, types.SimpleNamespace(fn=types.SimpleNamespace(fn=jit)), object()
    counters = _StepCounters(torch.device("cpu"))
    base = counters.last["triton_kernels"]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    jit.device_caches[0] = ({"a": 1, "b": 2}, {}, None, None, None)  # two specializations on device 0
    name = f"{kernel.__module__}.kernel 0"
    assert counters.delta() == {"compiled_graphs": 0, "triton_kernels": 2, "alloc_retries": 0, "cuda_mallocs": 0,
                                "triton_loaded": [f"{name} a", f"{name} b"]}
    jit.device_caches[0][0]["c"] = 3
    grown = counters.delta()
    assert grown["triton_kernels"] == 1 and counters.last["triton_kernels"] == base + 3
    assert grown["triton_loaded"] == [f"{name} c"]
    assert counters.delta()["triton_loaded"] == []


def test_plan_split_writes_the_presets_plan_from_a_random_models_config_alone(tmp_path):
    out = tmp_path / "p.json"
    assert main(["plan", "split", "random:llama-3-8b", "--share", "0.25", "--first", "vertical_slash", "--rest",
                 "streaming", "--rest-params", "sink=64,window=256", "-o", str(out)]) == 0
    spec = ModelSpec.from_config(random_model.config("random:llama-3-8b"))
    assert HeadPlan.load(out).policies() == preset_plan("duo25-vs", spec).policies()


def test_the_gc_clock_counts_collections_only_while_installed():
    import gc

    from headwise.bench.serve import _GcClock

    with _GcClock() as clock:
        gc.collect()
        gc.collect()
    assert clock.seconds > 0
    took = clock.seconds
    gc.collect()
    assert clock.seconds == took and clock._callback not in gc.callbacks
