"""Baselines run outside headwise: exported prompts are the eval's own samples, and merged outputs are scored and
paired with headwise's rows of the same samples (the kvpress runner itself is smoke-tested in .venv-kvpress:
tests/test_kvpress_runner.py)."""

from __future__ import annotations

import json

import pytest

from headwise.errors import InputError
from headwise.eval.external import OUTPUTS_FORMAT, export_prompts, merge_outputs, read_jsonl
from headwise.eval.report import retention, terminal_report, write_report
from headwise.eval.runner import EvalConfig, job_order, run_eval, sample_seed
from headwise.eval.tasks import make_sample

TASKS = ["passkey", "needle"]
LENGTH = 256


@pytest.fixture(scope="module")
def dense_run(smollm2, tmp_path_factory):
    """A dense eval and the prompts exported for the same configuration."""
    tmp = tmp_path_factory.mktemp("external")
    cfg = EvalConfig(model="smollm2-135m", plans=["dense"], tasks=TASKS, lengths=[LENGTH], depths=[0.5], samples=2,
                     out=tmp / "out", progress=False, command="pytest")
    results = run_eval(cfg, smollm2)
    n = export_prompts(smollm2, tmp / "prompts.jsonl", [*TASKS, "fidelity"], [LENGTH], [0.5], 2, 0,
                       model_dir=tmp / "model")
    return results, read_jsonl(tmp / "prompts.jsonl", "prompts"), n, tmp


def _outputs(prompts, label="kvpress:snapkv@0.5", right=(0,), kv_share=0.5, **over):
    """Output lines as run_presses.py writes them: the answer for the samples at the ``right`` positions."""
    out = []
    for k, p in enumerate(prompts):
        n = len(p["input_ids"])
        out.append({"format": OUTPUTS_FORMAT, "label": label, "model": p["model"], "model_key": p["model_key"],
                    "method": {"name": "SnapKVPress", "compression_ratio": 0.5}, "method_version": "kvpress 0.5.5",
                    "task": p["task"], "length": p["length"], "depth": p["depth"], "seed": p["seed"], "idx": p["idx"],
                    "output": f" {p['answers'][0]}." if k in right else " I do not know.", "prompt_tokens": n,
                    "new_tokens": 4, "kv_tokens": round(kv_share * n) * 30 * 3, "prefill_s": 0.1, "decode_s": 0.2,
                    "kv_fraction_target": 0.5} | over)
    return out


def test_exported_prompts_are_the_eval_samples_in_its_order(dense_run, smollm2):
    _, prompts, n, tmp = dense_run
    jobs = job_order([LENGTH], TASKS, [0.5], 2)
    assert n == len(prompts) == len(jobs) == 4  # fidelity generates nothing, so it exports nothing
    for p, (L, t, d, i) in zip(prompts, jobs, strict=True):
        s = make_sample(t, smollm2.tokenizer, L, d, sample_seed(0, i))
        assert (p["task"], p["length"], p["depth"], p["idx"]) == (t, L, d, i)
        assert p["prompt"] == s.prompt and p["answers"] == s.answers and p["max_new_tokens"] == s.max_new_tokens
        assert p["input_ids"] == smollm2.tokenizer(s.prompt, return_tensors="pt").input_ids[0].tolist()
        assert p["model_dir"] == str(tmp / "model")


def test_exported_prompt_lengths_match_the_eval_rows(dense_run):
    results, prompts, _, _ = dense_run
    rows = {(r["task"], r["depth"], r["idx"]): r["prompt_tokens"] for r in results["rows"]}
    assert {(p["task"], p["depth"], p["idx"]): len(p["input_ids"]) for p in prompts} == rows


def test_merged_outputs_are_scored_and_paired_with_dense(dense_run, tmp_path):
    results, prompts, _, _ = dense_run
    merged = merge_outputs(results, _outputs(prompts, right=(0, 1)), prompts)
    assert [p["label"] for p in merged["plans"]] == ["dense", "kvpress:snapkv@0.5"]
    acc = {(a["plan"], a["task"]): a for a in merged["accuracy"]}
    first_task = prompts[0]["task"]  # samples 0 and 1 are the first round: one of each task
    assert {prompts[0]["task"], prompts[1]["task"]} == set(TASKS)
    assert acc[("kvpress:snapkv@0.5", first_task)]["score"] == 0.5 and acc[("kvpress:snapkv@0.5", first_task)]["n"] == 2
    assert acc[("dense", first_task)] == next(a for a in results["accuracy"] if a["task"] == first_task)
    perf = {r["plan"]: r for r in merged["performance"]}
    assert perf["kvpress:snapkv@0.5"]["kv_fraction"] == pytest.approx(0.5, abs=0.01)
    assert perf["kvpress:snapkv@0.5"]["kv_bytes"] < perf["dense"]["kv_bytes"]
    # paired with dense sample by sample: kept only where both answer
    dense_right = {(r["task"], r["idx"]) for r in results["rows"] if r["score"] >= 1.0}
    ours_right = {(p["task"], p["idx"]) for p in prompts[:2]}
    for r in retention(merged):
        assert r["plan"] == "kvpress:snapkv@0.5"
        n_ref = sum(1 for t, _ in dense_right if t == r["task"])
        assert r["n"] == n_ref and r["kept"] == len({x for x in dense_right & ours_right if x[0] == r["task"]})
    assert "kvpress:snapkv@0.5" in terminal_report(merged)
    assert write_report(merged, tmp_path)["html"].is_file()


def test_merging_again_replaces_the_label(dense_run):
    results, prompts, _, _ = dense_run
    once = merge_outputs(results, _outputs(prompts, right=()), prompts)
    twice = merge_outputs(once, _outputs(prompts, right=(0, 1, 2, 3)), prompts)
    assert len(twice["rows"]) == len(results["rows"]) + len(prompts)
    assert all(a["score"] == 1.0 for a in twice["accuracy"] if a["plan"] == "kvpress:snapkv@0.5")


def test_an_output_of_another_prompt_is_refused(dense_run):
    results, prompts, _, _ = dense_run
    bad = _outputs(prompts)
    bad[0]["prompt_tokens"] += 7
    with pytest.raises(InputError, match="not the same prompt"):
        merge_outputs(results, bad, prompts)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 3, "export the prompts with the eval's --seed"),
    ("length", 4096, "which the results do not hold"),
    ("model", "gemma3-270m", "same model"),
])
def test_outputs_of_another_configuration_are_refused(dense_run, field, value, message):
    results, prompts, _, _ = dense_run
    with pytest.raises(InputError, match=message):
        merge_outputs(results, _outputs(prompts, **{field: value}), prompts)


def test_two_methods_under_one_label_are_refused(dense_run):
    results, prompts, _, _ = dense_run
    mixed = _outputs(prompts)
    mixed[-1]["method"] = {"name": "KnormPress", "compression_ratio": 0.5}
    with pytest.raises(InputError, match="give each its own label"):
        merge_outputs(results, mixed, prompts)


def test_import_script_writes_results_the_report_reads(dense_run, tmp_path):
    from bench_modules import bench_module

    _, prompts, _, tmp = dense_run
    mod = bench_module("kvpress/import_outputs.py")
    outs = tmp_path / "outputs.jsonl"
    outs.write_text("".join(json.dumps(o) + "\n" for o in _outputs(prompts)))
    assert mod.main([str(tmp / "out"), str(outs), "--prompts", str(tmp / "prompts.jsonl"), "--out", str(tmp_path)]) == 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert "kvpress:snapkv@0.5" in [p["label"] for p in saved["plans"]]
    assert mod.main([str(tmp_path / "nowhere"), str(outs)]) == 2


def test_cli_exports_prompts_without_running(tmp_path, capsys):
    from headwise.cli import main

    path = tmp_path / "p.jsonl"
    assert main(["eval", "smollm2-135m", "--tasks", "passkey", "--lengths", "96", "--depths", "0.5", "--samples", "1",
                 "--export-prompts", str(path)]) == 0
    (row,) = read_jsonl(path, "prompts")
    assert row["task"] == "passkey" and row["model"] == "smollm2-135m" and row["model_dir"]
    assert "1 prompts" in capsys.readouterr().out
