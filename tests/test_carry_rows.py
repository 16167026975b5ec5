"""bench/carry_rows.py: a saved evaluation's rows, carried into a new output directory, are reused, not run again."""

from __future__ import annotations

import json

import pytest

from bench_modules import bench_module
from headwise.eval.runner import EvalConfig, run_eval


def _cfg(out, **kw):
    base = dict(model="smollm2-135m", plans=["dense", "streaming@0.5"], tasks=["passkey"], lengths=[96],
                depths=[0.5], samples=2, out=out, max_new_tokens=4, progress=False, command="pytest")
    return EvalConfig(**(base | kw))


@pytest.mark.parametrize("chunk", [512, 32])
def test_carried_rows_are_reused_by_a_later_eval(smollm2, tmp_path, chunk):
    first = run_eval(_cfg(tmp_path / "a", chunk_size=chunk, command=f"headwise eval --chunk-size {chunk}"), smollm2)
    assert first["runs_this_time"] == 4
    saved = tmp_path / "results.json"
    saved.write_text((tmp_path / "a" / "results.json").read_text())
    mod = bench_module("carry_rows.py")
    later = tmp_path / "b"
    assert mod.main([str(saved), str(later / "samples-carried.jsonl"), "--plans", "dense"]) == 0
    assert len((later / "samples-carried.jsonl").read_text().splitlines()) == 2
    again = run_eval(_cfg(later, chunk_size=chunk), smollm2)
    assert again["runs_this_time"] == 2  # dense's two rows carried; streaming's run again
    dense = [a for a in again["accuracy"] if a["plan"] == "dense"]
    assert dense == [a for a in first["accuracy"] if a["plan"] == "dense"]


def test_a_file_that_is_not_an_eval_document_is_refused(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"rows": []}))
    with pytest.raises(SystemExit, match="not a headwise eval results file"):
        bench_module("carry_rows.py").main([str(bad), str(tmp_path / "o.jsonl")])


def _results(name):
    from pathlib import Path

    return json.loads((Path(__file__).resolve().parents[1] / "bench" / "results" / name).read_text())


def test_rows_of_a_gemma_run_on_mis_tokenized_prompts_are_refused(tmp_path):
    """Run 17 read Gemma through transformers 5.17 (converted cache v1): its keys would match today's rows."""
    saved = tmp_path / "run17.json"
    saved.write_text(json.dumps(_results("retrieval_quality_gemma3-270m_h200_run17_2026-12-03.json")))
    with pytest.raises(SystemExit, match=r"converted before the tokenizer fix \(cache format 1 < 2\).*not reused"):
        bench_module("carry_rows.py").main([str(saved), str(tmp_path / "o.jsonl"), "--plans", "dense"])
    assert not (tmp_path / "o.jsonl").exists()


def test_rows_of_a_well_tokenized_gemma_run_and_of_smollm2_runs_are_carried():
    mod = bench_module("carry_rows.py")
    gemma = mod.carry_rows(_results("retrieval_quality_gemma3-270m_h200_run18_2026-12-04.json"), {"dense"})
    assert len(gemma) == 900 and all(json.loads(r["key"])[0] == "gemma3-270m:18x1x256" for r in gemma)
    smol = mod.carry_rows(_results("retrieval_quality_smollm2-135m_h200_run8_2026-12-02.json"), {"dense"})
    assert smol and "-v1)" in _results("retrieval_quality_smollm2-135m_h200_run8_2026-12-02.json")["model_source"]


@pytest.mark.parametrize(("device", "dtype", "tag"), [
    ("NVIDIA H100 80GB HBM3", "bfloat16", ""), ("NVIDIA H100 80GB HBM3", "float32", ":float32"),
    ("cpu: AMD EPYC, 2 threads", "float32", ""), ("cpu: AMD EPYC, 2 threads", "bfloat16", ":bfloat16"),
    ("NVIDIA H200", None, "")])
def test_carried_keys_name_the_dtype_where_it_is_not_the_devices_default(device, dtype, tag):
    mod = bench_module("carry_rows.py")
    doc = {"model": "m", "spec": {"num_layers": 2, "num_kv_heads": 3, "head_dim": 4}, "device": device,
           "command": "headwise eval m", **({"dtype": dtype} if dtype else {})}
    assert mod.doc_model_key(doc) == "m:2x3x4" + tag
