"""bench/experiments/passkey_answer_rate.py: a passkey cell split into answering (digits first) and retrieving."""

from __future__ import annotations

import json

from bench_modules import bench_module


def _row(plan, output, score, length=2048, task="passkey"):
    return {"plan": plan, "task": task, "length": length, "output": output, "score": score}


def test_rows_split_into_answered_and_right_when_answered(tmp_path):
    mod = bench_module("experiments/passkey_answer_rate.py")
    rows = [_row("press", " 12345.", 1.0), _row("press", " 99999.", 0.0), _row("press", "12345", 1.0),
            _row("plan", " 12345.", 1.0), _row("plan", " the pass key. The", 0.0),
            _row("plan", " 1", 0.0, length=1024), _row("plan", "x", 1.0, task="needle")]
    got = mod.split(rows, 2048)
    assert got["press"]["answered"] == 3 and got["press"]["right"] == 2 and got["press"]["right_share_of_answers"] == 0.6667
    assert got["plan"]["n"] == 2 and got["plan"]["answered"] == 1 and got["plan"]["right_share_of_answers"] == 1.0
    assert got["plan"]["right_otherwise"] == 0 and got["plan"]["answer_rate"] == 0.5
    lo, hi = got["plan"]["answer_rate_wilson"]
    assert lo < 0.5 < hi
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"rows": rows}))
    samples = tmp_path / "samples.jsonl"
    samples.write_text("\n".join(json.dumps(r) for r in rows[:3]) + "\n")
    out = tmp_path / "out.json"
    assert mod.main([str(out), str(results), str(samples)]) == 0
    doc = json.loads(out.read_text())["results"]["by_file"]
    assert doc["results.json"]["plan"]["answered"] == 1 and doc["samples.jsonl"]["press"]["answered"] == 3


def test_a_file_without_rows_is_refused_in_a_line(tmp_path, capsys):
    mod = bench_module("experiments/passkey_answer_rate.py")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"command": "x"}))
    assert mod.main([str(tmp_path / "o.json"), str(bad)]) == 2
    assert "no 'rows'" in capsys.readouterr().err


def test_external_outputs_are_scored_against_their_prompts(tmp_path):
    mod = bench_module("experiments/passkey_answer_rate.py")
    key = {"task": "passkey", "length": 2048, "depth": 0.5, "seed": 0, "idx": 3}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(key | {"answers": ["4242"], "scoring": "contains"}) + "\n")
    outputs = tmp_path / "kv.jsonl"
    outputs.write_text(json.dumps(key | {"label": "kvpress:knorm", "output": " 4243."}) + "\n")
    out = tmp_path / "o.json"
    assert mod.main([str(out), str(outputs), "--prompts", str(prompts)]) == 0
    got = json.loads(out.read_text())["results"]["by_file"]["kv.jsonl"]["kvpress:knorm"]
    assert got["answered"] == 1 and got["right"] == 0
    assert mod.main([str(out), str(outputs)]) == 2  # no prompts to score it against
