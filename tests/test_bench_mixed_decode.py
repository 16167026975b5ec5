"""bench/mixed_batch_decode.py: one layer's batched decode over rows of different lengths, split settings swept (CPU
smoke under Triton's interpreter: the script's inputs, the sweep and the fp32 check, no rates)."""

from __future__ import annotations

import json

import pytest

from bench_modules import bench_module


def test_the_sweep_checks_every_setting_against_the_reference_and_counts_the_bytes(tmp_path):
    out = tmp_path / "mixed.json"
    bench_module("mixed_batch_decode.py").main([str(out), "--plan-rows", "2x100,3x40", "--dense-rows", "1x100,1x40",
                                                "--programs-per-sm", "1,8", "--tokens-per-iter", "32"])
    doc = json.loads(out.read_text())
    assert "--plan-rows 2x100,3x40" in doc["command"]
    rows = doc["results"]["rows"]
    assert [(r["group"], r["programs_per_sm"]) for r in rows] == [("plan_full_heads", 1), ("plan_full_heads", 8),
                                                                  ("dense", 1), ("dense", 8)]
    for r in rows:
        assert r["max_abs_err_vs_fp32_reference"] < 1e-4 and r["wall_ms"] > 0
    # K and V of every token of every row and head, bf16 on a GPU, fp32 here
    assert rows[0]["kv_gb"] == round(2 * (2 * 100 + 3 * 40) * 2 * 128 * 4 / 1e9, 4)
    assert rows[2]["kv_gb"] == round(8 * (100 + 40) * 2 * 128 * 4 / 1e9, 4)


def test_rows_must_be_counts_times_lengths():
    with pytest.raises(SystemExit, match="counts x lengths"):
        bench_module("mixed_batch_decode.py").parse_rows("13x")
