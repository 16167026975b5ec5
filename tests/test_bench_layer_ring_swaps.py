"""bench/experiments/layer_ring_swaps.py: heads put on rings one plan each, or all in one plan with --together."""

from __future__ import annotations

import json
from pathlib import Path

from bench_modules import bench_module
from headwise.plan import HeadPlan

PLAN = Path(__file__).resolve().parents[1] / "plans" / "gemma3-270m-b0.3-select2bit.json"


def _module():
    return bench_module("experiments/layer_ring_swaps.py")


def test_heads_on_rings_alone_and_together(tmp_path):
    mod = _module()
    base = json.loads(PLAN.read_text())
    src = tmp_path / "g.json"
    src.write_text(json.dumps(base))
    mod.main([str(src), str(src), str(tmp_path / "one"), "--heads", "5:0,7:0", "--ring", "0/32"])
    alone = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert alone == ["g-hyb-l5h0.json", "g-hyb-l7h0.json"]
    l5 = json.loads((tmp_path / "one" / "g-hyb-l5h0.json").read_text())
    assert l5["layers"][5] == [{"policy": "streaming", "params": {"sink": 0, "window": 32, "compensation": False}}]
    assert l5["layers"][7] == base["layers"][7] and l5["layers"][6] == base["layers"][6]
    mod.main([str(src), str(src), str(tmp_path / "all"), "--heads", "0:0,1:0,10:0", "--ring", "0/128", "--together"])
    (out,) = (tmp_path / "all").iterdir()
    assert out.name == "g-hyb-l0h0-l1h0-l10h0-r0+128.json"
    wide = json.loads(out.read_text())
    for i in (0, 1, 10):
        assert wide["layers"][i][0]["params"]["window"] == 128
    assert [wide["layers"][i] for i in (2, 3, 4, 5, 7)] == [base["layers"][i] for i in (2, 3, 4, 5, 7)]
    assert "layer 0 head 0, layer 1 head 0, layer 10 head 0 a 128-token ring" in wide["meta"]["note"]
    HeadPlan.load(out)  # still a plan the engine reads
