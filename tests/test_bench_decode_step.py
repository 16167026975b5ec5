"""bench/decode_step_breakdown.py: decode-only steps of each plan timed, profiled and set against their bytes (CPU smoke)."""

from __future__ import annotations

import json

import pytest

from bench_modules import bench_module
from headwise.errors import InputError


def _module():
    return bench_module("decode_step_breakdown.py")


def test_breakdown_times_profiles_and_counts_the_bytes_of_decode_steps_on_cpu(tmp_path):
    out = tmp_path / "decode.json"
    _module().main([str(out), "--model", "random:tiny-llama", "--device", "cpu", "--context", "40", "--chunk", "16",
                    "--batch", "1,3", "--kv-gb", "0.01", "--steps", "2", "--warmup", "1", "--plans", "dense,duo25",
                    "--top", "5"])
    doc = json.loads(out.read_text())
    assert "--context 40" in doc["command"]
    res = doc["results"]
    assert [(c["plan"], c["batch"]) for c in res["cases"]] == [("dense", 1), ("dense", 3), ("duo25", 1), ("duo25", 3)]
    for case in res["cases"]:
        assert len(case["step_ms"]) == 2 and all(t > 0 for t in case["step_ms"])
        assert case["graph_steps"] == 0  # no graph on the CPU: the padded step runs eagerly
        assert case["padded_size"] >= case["batch"]
        assert case["weights_bytes"] > 0 and case["kv_bytes_held"] > 0
        assert case["read_gb_per_s"] > 0 and case["read_over_copy"] is None  # no copy bandwidth on the CPU
        assert case["eager_profile"] is not None and case["eager_profile"]["ops"]
    dense = {c["batch"]: c["kv_bytes_held"] for c in res["cases"] if c["plan"] == "dense"}
    duo = {c["batch"]: c["kv_bytes_held"] for c in res["cases"] if c["plan"] == "duo25"}
    assert dense[3] > dense[1] and duo[3] <= dense[3]  # three sequences hold more than one; the plan no more than dense


def test_kernel_groups_sort_attention_gemm_and_the_rest():
    from headwise.bench.timing import kernel_group

    assert kernel_group("_batch_decode_kernel") == "attention"
    assert kernel_group("flash_fwd_kernel<...>") == "attention"
    assert kernel_group("nvjet_tst_128x64_64x8") == "gemm"
    assert kernel_group("sm90_xmma_gemm_bf16bf16") == "gemm"
    assert kernel_group("triton_red_fused_rms_norm_0") == "other"


def test_unknown_plan_is_refused():
    with pytest.raises(InputError, match="dense or a preset"):
        _module().main(["/tmp/never.json", "--model", "random:tiny-llama", "--device", "cpu", "--context", "8",
                        "--plans", "nonsense", "--steps", "1"])


def test_breakdown_with_multi_step_times_each_forward(tmp_path):
    out = tmp_path / "multi.json"
    _module().main([str(out), "--model", "random:tiny-llama", "--device", "cpu", "--context", "24", "--chunk", "16",
                    "--batch", "3", "--kv-gb", "0.01", "--steps", "2", "--warmup", "1", "--plans", "dense",
                    "--top", "5", "--multi-step", "4"])
    case = json.loads(out.read_text())["results"]["cases"][0]
    assert case["multi_step"] == 4 and case["forwards_per_step"] == [4, 4]
    assert case["kernels_per_forward_ms"] >= 0
    assert case["gap_per_forward_ms"] == pytest.approx(case["step_ms_median"] - case["kernels_per_forward_ms"],
                                                        abs=2e-4)
    assert all(t > 0 for t in case["step_ms"])
