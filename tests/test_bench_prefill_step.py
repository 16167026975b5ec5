"""bench/prefill_step_breakdown.py: one chunk step of each plan timed, profiled and written with its floor (CPU smoke)."""

from __future__ import annotations

import json

import pytest

from bench_modules import bench_module
from headwise.errors import InputError


def _module():
    return bench_module("prefill_step_breakdown.py")


def test_breakdown_times_and_profiles_a_chunk_step_of_each_plan_on_cpu(tmp_path):
    out = tmp_path / "breakdown.json"
    _module().main([str(out), "--model", "random:tiny-llama", "--device", "cpu", "--prefix", "32", "--chunk", "16",
                    "--kv-gb", "0.01", "--reps", "2", "--floor-reps", "1", "--plans", "dense,duo25",
                    "--decode-rows", "0,2", "--top", "5"])
    doc = json.loads(out.read_text())
    assert {"command", "commit", "device", "torch", "results"} <= set(doc)
    assert "--prefix 32" in doc["command"]
    res = doc["results"]
    assert [(c["plan"], c["decode_rows"]) for c in res["cases"]] == [("dense", 0), ("dense", 2), ("duo25", 0),
                                                                       ("duo25", 2)]
    for case in res["cases"]:
        assert case["prefixes"] == [32, 48] and len(case["step_ms"]) == 2 and all(t > 0 for t in case["step_ms"])
        prof = case["profile"]
        assert prof["prefix"] == 64 and 0 < len(prof["ops"]) <= 5
        assert {"name", "calls", "device_ms", "self_cpu_ms"} <= set(prof["ops"][0])
        assert prof["kernels"] == [] and prof["gpu_busy_ms"] == 0  # no GPU: no kernels
    floor = res["floor"]
    assert set(floor["linear_ms"]) == {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in
                                                                                    ("gate", "up", "down")}
    assert floor["keys"] == 48 and floor["causal_attention_all_heads_ms"] > 0
    # tiny-llama: 4 KV heads, duo25 keeps one full
    assert floor["duo25"]["full_kv_heads"] == 1 and floor["duo25"]["streaming_kv_heads"] == 3
    assert floor["duo25"]["streaming_masked_sdpa_ms"] > 0


def test_breakdown_refuses_a_prefix_that_is_not_whole_chunks(tmp_path):
    with pytest.raises(InputError, match="multiple of --chunk"):
        _module().parse_args([str(tmp_path / "x.json"), "--prefix", "40", "--chunk", "16"])


def test_breakdown_refuses_decode_rows_the_pool_cannot_hold_before_any_prefill(tmp_path):
    """A pool too small for the rows is refused up front, with the number of rows that fit; that many run."""
    mod = _module()
    argv = [str(tmp_path / "x.json"), "--model", "random:tiny-llama", "--device", "cpu", "--prefix", "32",
            "--chunk", "16", "--kv-gb", "0.0003", "--reps", "1", "--floor-reps", "1", "--plans", "dense", "--top", "3"]
    with pytest.raises(InputError, match=r"at most (\d+) rows fit") as err:
        mod.main([*argv, "--decode-rows", "64"])
    fit = int(err.value.args[0].split("at most ")[1].split(" rows")[0])
    assert 1 <= fit < 64
    doc = mod.main([*argv, "--decode-rows", str(fit)])
    assert doc["results"]["cases"][0]["decode_rows"] == fit


def test_breakdown_refuses_a_sequence_longer_than_the_context_and_names_the_longest_prefix(tmp_path):
    mod = _module()
    args = mod.parse_args([str(tmp_path / "x.json"), "--model", "random:tiny-llama", "--prefix", "16",
                           "--chunk", "16"])
    lm = mod.load_model("random:tiny-llama", "cpu", None)
    plan = mod.make_plan("dense", lm)
    args.prefix = lm.spec.max_context // 16 * 16
    with pytest.raises(InputError, match=r"exceeds random:tiny-llama's context .*--prefix \d+ at most") as err:
        mod.check_context(lm, plan, args)
    args.prefix = int(err.value.args[0].split("--prefix ")[-1].split(" at most")[0])
    mod.check_context(lm, plan, args)  # the longest prefix the message names fits; one chunk more does not
    args.prefix += 16
    with pytest.raises(InputError, match="exceeds"):
        mod.check_context(lm, plan, args)
