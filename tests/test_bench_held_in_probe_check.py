"""bench/experiments/held_in_probe_check.py: plan files on the profiler's held-in probes, by depth."""

from __future__ import annotations

import json

import torch

from bench_modules import bench_module
from headwise.plan import HeadPlan
from headwise.policies.streaming import Streaming


def test_by_quarter_counts_depth_order():
    mod = bench_module("experiments/held_in_probe_check.py")
    hits = torch.tensor([1, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)  # 2 lengths x 6 probes
    assert mod.hit_string(hits) == "100001111111"
    # depths (i + 0.5) / 6: 0.08, 0.25, 0.42, 0.58, 0.75, 0.92 -> quarters 0, 1, 1, 2, 3, 3
    assert mod.by_quarter(hits, [256, 512], 6) == {"256": [1, 0, 0, 1], "512": [1, 2, 1, 2]}


def test_held_in_probe_check_on_a_tiny_model(tiny_gemma, tmp_path, monkeypatch):
    mod = bench_module("experiments/held_in_probe_check.py")
    spec = tiny_gemma.spec
    plan = tmp_path / "ring.json"
    HeadPlan.from_policies(spec, [[Streaming(sink=0, window=32)] * 2] * spec.num_layers, tiny_gemma.name).save(plan)
    monkeypatch.setattr("headwise.models.load_model", lambda *a, **k: tiny_gemma)
    out = tmp_path / "r.json"
    mod.main(["tiny", str(out), str(plan), "--lengths", "256", "--probes", "4", "--distractors", "0"])
    rows = json.loads(out.read_text())["results"]["rows"]
    assert [r["plan"] for r in rows] == ["dense", "ring"]
    for r in rows:
        assert len(r["hits"]) == 4 and r["hits"].count("1") == r["answered"]
        assert sum(r["by_quarter"]["256"]) == r["answered"]
