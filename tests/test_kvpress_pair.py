"""bench/kvpress/pair_outputs.py: a press's outputs paired prompt by prompt with a plan's rows in a results file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("pair_outputs", ROOT / "bench" / "kvpress" / "pair_outputs.py")
pair_outputs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pair_outputs)


def _key(i: int) -> dict:
    return {"task": "passkey", "length": 2048, "depth": 0.5, "seed": 0, "idx": i}


def _write(tmp_path: Path, press_right: list[bool], plan_right: list[bool | None]) -> tuple[Path, Path, Path]:
    prompts = [_key(i) | {"answers": ["12345"], "scoring": "contains"} for i in range(len(press_right))]
    outputs = [_key(i) | {"label": "kvpress:knorm@equal", "method": {"compression_ratio": 0.77}, "output": " 12345." if ok else " the pass key."}
               for i, ok in enumerate(press_right)]
    rows = [_key(i) | {"plan": "dense", "output": "x", "score": 1.0 if ok else 0.0}
            for i, ok in enumerate(plan_right) if ok is not None]
    rows.append(_key(0) | {"plan": "other", "output": "x", "score": 1.0})
    p, o, r = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl", tmp_path / "results.json"
    p.write_text("".join(json.dumps(x) + "\n" for x in prompts))
    o.write_text("".join(json.dumps(x) + "\n" for x in outputs))
    r.write_text(json.dumps({"format": "headwise-eval", "device": "NVIDIA H100", "dtype": "float32", "rows": rows}))
    return p, o, r


def test_pairs_only_the_prompts_both_ran_and_counts_each_side(tmp_path):
    # press right on 0, 1, 2; dense right on 1, 3; prompt 4 has no dense row (a shard that stopped early)
    p, o, r = _write(tmp_path, [True, True, True, False, False], [False, True, False, True, None])
    out = tmp_path / "pair.json"
    assert pair_outputs.main([str(out), str(o), "--prompts", str(p), "--against", f"{r}:dense"]) == 0
    doc = json.loads(out.read_text())["results"]
    cell = doc["paired"]["kvpress:knorm@equal (compression_ratio 0.77)"][f"{r}:dense"]
    assert cell["pairs"] == 4
    assert cell["press"]["correct"] == 3 and cell["plan"]["correct"] == 2
    ratio = cell["press_over_plan"]
    assert (ratio["both"], ratio["only_plan"], ratio["only_ref"]) == (1, 2, 1)  # only_plan: the press alone
    assert ratio["ratio"] == pytest.approx(1.5)
    assert cell["plan_device"] == "NVIDIA H100"
    assert doc["presses"]["kvpress:knorm@equal (compression_ratio 0.77)"]["n"] == 5  # every output, paired or not


def test_a_label_missing_from_the_results_is_a_clear_error(tmp_path, capsys):
    p, o, r = _write(tmp_path, [True], [True])
    assert pair_outputs.main([str(tmp_path / "x.json"), str(o), "--prompts", str(p), "--against", f"{r}:nope"]) == 2
    err = capsys.readouterr().err
    assert "no rows of plan 'nope'" in err and "dense" in err
    assert not (tmp_path / "x.json").exists()


def test_the_same_outputs_given_twice_are_refused(tmp_path, capsys):
    p, o, r = _write(tmp_path, [True, False], [True, True])
    assert pair_outputs.main([str(tmp_path / "x.json"), str(o), str(o), "--prompts", str(p),
                              "--against", f"{r}:dense"]) == 2
    assert "two outputs" in capsys.readouterr().err


def test_a_label_with_a_colon_names_the_rows_of_a_press_in_a_merged_file(tmp_path):
    p, o, r = _write(tmp_path, [True, True], [True, False])
    doc = json.loads(r.read_text())
    doc["rows"] = [dict(x, plan="kvpress:knorm@equal") for x in doc["rows"] if x["plan"] == "dense"]
    r.write_text(json.dumps(doc))
    out = tmp_path / "pair.json"
    assert pair_outputs.main([str(out), str(o), "--prompts", str(p), "--against", f"{r}:kvpress:knorm@equal"]) == 0
    (cell,) = json.loads(out.read_text())["results"]["paired"]["kvpress:knorm@equal (compression_ratio 0.77)"].values()
    assert (cell["press"]["correct"], cell["plan"]["correct"]) == (2, 1)
