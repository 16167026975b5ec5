"""bench/experiments/ring_text_steps.py: the text term's set of rings for a given order, on held-in text."""

from __future__ import annotations

import json

from bench_modules import bench_module
from headwise.plan import HeadPlan
from headwise.policies.quantized import Quantized
from headwise.policies.streaming import Streaming


def test_ring_text_steps_on_a_tiny_model(tiny_gemma, tmp_path, monkeypatch):
    mod = bench_module("experiments/ring_text_steps.py")
    spec = tiny_gemma.spec
    pols = [[Quantized(bits=2, residual=32)] * 2 for _ in range(spec.num_layers)]
    plan = tmp_path / "p.json"
    HeadPlan.from_policies(spec, pols, tiny_gemma.name).save(plan)
    monkeypatch.setattr(mod, "load_model", lambda *a, **k: tiny_gemma)
    out = tmp_path / "r.json"
    res = mod.main(["tiny", str(plan), "--heads", "1:1,2:0", "--ring", "32", "--target-len", "256", "--tokens", "512",
                    "--allowance", "10", "--result", str(out)])
    assert res["text"] == {"rows": 2, "tokens": 256, "positions": 256}
    assert [s["ringed"] for s in res["singles"]] == [[1, 1], [2, 0]]
    assert [s["ringed"] for s in res["steps"]] == [[[1, 1]], [[1, 1], [2, 0]]]
    assert res["steps"][0]["text_kl"] == res["singles"][0]["text_kl"] and all(s["within"] for s in res["steps"])
    assert res["kept"] == [[1, 1], [2, 0]] and res["kept_text_kl"] == res["steps"][1]["text_kl"]
    assert res["plan_text_kl"] >= 0 and res["steps"][1]["text_kl"] > res["plan_text_kl"]
    doc = json.loads(out.read_text())
    assert doc["results"]["kept"] == res["kept"] and "ring_text_steps.py" in doc["command"]
    assert mod.ringed_policies(spec, pols, [(2, 0)], 32)[2][0] == Streaming(sink=16, window=16)  # global: half sinks
