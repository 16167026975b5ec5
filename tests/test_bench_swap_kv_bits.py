"""bench/experiments/swap_kv_bits.py: 4-bit keys over 2-bit values become 2-bit keys over 4-bit values, the same
bytes; other heads untouched; the plan still loads."""

from __future__ import annotations

import json

import pytest

from bench_modules import bench_module
from headwise.plan import HeadPlan


def test_swaps_key_and_value_bits_of_the_named_heads_only(smollm2, tmp_path):
    mod = bench_module("experiments/swap_kv_bits.py")
    spec = smollm2.spec
    plan = HeadPlan.uniform(spec, {"policy": "streaming", "params": {"sink": 4, "window": 60}}, smollm2.name).to_dict()
    plan["layers"][0][0] = {"policy": "quantized", "params": {"bits": 2, "key_bits": 4, "group": 32, "residual": 32}}
    plan["layers"][1][2] = {"policy": "quantized", "params": {"bits": 4, "group": 32, "residual": 32}}
    src, out = tmp_path / "p.json", tmp_path / "s.json"
    src.write_text(json.dumps(plan))
    mod.main([str(src), str(out)])
    got = json.loads(out.read_text())
    assert got["layers"][0][0]["params"] == {"bits": 4, "key_bits": 2, "group": 32, "residual": 32}
    assert got["layers"][1][2] == plan["layers"][1][2] and got["layers"][2] == plan["layers"][2]
    before, after = HeadPlan.load(src), HeadPlan.load(out)
    assert before.kv_bytes(spec, 2048) == after.kv_bytes(spec, 2048) and before.digest() != after.digest()
    with pytest.raises(SystemExit, match="no quantized head"):
        mod.main([str(out), str(tmp_path / "t.json")])  # nothing left of 4-bit keys over 2-bit values
