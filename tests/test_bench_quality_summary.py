"""bench/quality_summary.py: issue 19's cells of a plan file, read back from results files by the plan's digest."""

from __future__ import annotations

import json

from bench_modules import bench_module
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec

SPEC = ModelSpec("llama", num_layers=2, num_q_heads=2, num_kv_heads=1, head_dim=8, max_context=4096)


def _doc(plan_digest, device, cells, kv, rows=(), plans=None):
    """A `headwise eval` results document: ``cells`` {(label, task, length): (score, n)}, ``kv`` {label: fraction}."""
    labels = plans or sorted({c[0] for c in cells})
    digests = {lab: {"1024": plan_digest if lab == "mine" else f"d-{lab}"} for lab in labels}
    from headwise.eval.scoring import wilson

    return {"format": "headwise-eval", "device": device, "plans": [{"label": lab, "digest": digests[lab]}
                                                                   for lab in labels],
            "tasks": ["passkey"], "lengths": [1024],
            "accuracy": [{"plan": p, "task": t, "length": n, "score": s, "n": k, "ci95": list(wilson(s, k))}
                         for (p, t, n), (s, k) in cells.items()],
            "performance": [{"plan": lab, "length": 1024, "kv_fraction": f, "kv_fraction_measured": f}
                            for lab, f in kv.items()],
            "rows": list(rows)}


def _rows(label, digest, right):
    return [{"plan": label, "task": "passkey", "length": 1024, "depth": 0.5, "seed": 0, "idx": i, "digest": digest,
             "score": 1.0 if ok else 0.0} for i, ok in enumerate(right)]


def test_a_cell_is_met_only_above_every_equal_memory_baseline(tmp_path):
    mod = bench_module("quality_summary.py")
    plan = HeadPlan.dense(SPEC, "tiny")
    plan_path = tmp_path / "plan.json"
    plan.save(plan_path)
    digest = plan.digest()
    n = 100
    rows = _rows("dense", "d-dense", [True] * 90 + [False] * 10) + _rows("mine", digest, [True] * 92 + [False] * 8)
    run = _doc(digest, "NVIDIA H200", {("dense", "passkey", 1024): (0.9, n), ("mine", "passkey", 1024): (0.92, n),
                                       ("streaming@equal", "passkey", 1024): (0.2, n),
                                       ("quest@equal", "passkey", 1024): (0.97, n)},
               {"dense": 1.0, "mine": 0.3, "streaming@equal": 0.3, "quest@equal": 1.06}, rows)
    (tmp_path / "run.json").write_text(json.dumps(run))
    cells = mod.cells(str(plan_path), [str(tmp_path / "run.json")])
    assert len(cells) == 1
    cell = cells[0]
    assert cell["applies"] and cell["met"]  # Quest held 106% of dense: shown, not an equal-memory baseline
    assert cell["ratio"]["ratio"] == round(92 / 90, 4) and cell["beaten"] == ["streaming@equal"]
    assert [b["equal_memory"] for b in cell["baselines"]] == [False, True]

    # a press at the plan's KV above the plan, in another GPU run of the same plan (another label): not met
    press = _doc(digest, "NVIDIA H100 80GB HBM3", {("mine", "passkey", 1024): (0.9, n),
                                                  ("kvpress:knorm@equal", "passkey", 1024): (0.97, n)},
                 {"mine": 0.3, "kvpress:knorm@equal": 0.3}, plans=["kvpress:knorm@equal", "mine"])
    (tmp_path / "press.json").write_text(json.dumps(press))
    cpu = _doc(digest, "cpu", {("mine", "passkey", 1024): (0.1, 400)}, {"mine": 0.3})  # a CPU run: not counted
    (tmp_path / "cpu.json").write_text(json.dumps(cpu))
    files = [str(tmp_path / f) for f in ("run.json", "press.json", "cpu.json")]
    cell = mod.cells(str(plan_path), files)[0]
    assert cell["plan"]["n"] == n and cell["file"].endswith("run.json")  # of two runs of 100, the paired one
    assert cell["met"] is False and "kvpress:knorm@equal" not in cell["beaten"]
    table = mod.markdown([cell])
    assert "`kvpress:knorm@equal` 97" in table and "**no**" in table and "`quest@equal` (106% of dense)" in table

    # a larger run that scored another plan first: its streaming@equal sits at that plan's KV, above this plan's; the
    # cell held at this plan's KV stays the one counted (run 37 hid run 15's streaming@equal this way)
    other = _doc(digest, "NVIDIA H100 80GB HBM3", {("mine", "passkey", 1024): (0.92, 400),
                                                  ("streaming@equal", "passkey", 1024): (0.5, 400)},
                 {"mine": 0.3, "streaming@equal": 0.4}, plans=["mine", "streaming@equal"])
    (tmp_path / "other.json").write_text(json.dumps(other))
    cell = mod.cells(str(plan_path), [str(tmp_path / "run.json"), str(tmp_path / "other.json")])[0]
    streaming = [b for b in cell["baselines"] if b["plan"] == "streaming@equal"]
    assert [(b["n"], b["equal_memory"]) for b in streaming] == [(n, True)] and cell["beaten"] == ["streaming@equal"]


def test_a_plan_no_gpu_run_scored_is_refused_in_a_line(tmp_path, capsys):
    mod = bench_module("quality_summary.py")
    plan = HeadPlan.dense(SPEC, "tiny")
    plan.save(tmp_path / "plan.json")
    (tmp_path / "run.json").write_text(json.dumps(_doc("other", "NVIDIA H200", {("mine", "passkey", 1024): (1.0, 9)},
                                                       {"mine": 0.3})))
    assert mod.main([str(tmp_path / "plan.json"), str(tmp_path / "run.json")]) == 2
    assert "no GPU results file scored" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert mod.main([str(tmp_path / "plan.json"), str(tmp_path / "bad.json")]) == 2
    assert "not a readable results file" in capsys.readouterr().err


def test_a_cell_must_hold_in_every_large_run(tmp_path):
    """A second GPU run of >= 300 samples (another dtype, say) where the plan keeps only 0.8 of dense's accuracy
    makes the cell not met, though the largest run meets it."""
    mod = bench_module("quality_summary.py")
    plan = HeadPlan.dense(SPEC, "tiny")
    plan.save(tmp_path / "plan.json")
    digest = plan.digest()

    def run(n, dense_right, plan_right, name, **numerics):
        rows = _rows("dense", "d-dense", [i < dense_right for i in range(n)]) + _rows(
            "mine", digest, [i < plan_right for i in range(n)])
        doc = _doc(digest, "NVIDIA H100 80GB HBM3", {("dense", "passkey", 1024): (dense_right / n, n),
                                                    ("mine", "passkey", 1024): (plan_right / n, n)},
                   {"dense": 1.0, "mine": 0.3}, rows)
        (tmp_path / name).write_text(json.dumps(doc | numerics))
        return str(tmp_path / name)

    big = run(400, 300, 300, "big.json")
    cell = mod.cells(str(tmp_path / "plan.json"), [big])[0]
    assert cell["met"] and cell["held_in_large_runs"]
    other = run(300, 250, 200, "other.json", dtype="bfloat16", logits_dtype="float32")
    cell = mod.cells(str(tmp_path / "plan.json"), [big, other])[0]
    assert cell["file"] == big and not cell["held_in_large_runs"] and cell["met"] is False
    assert [r["n"] for r in cell["runs"]] == [400, 300] and cell["runs"][1]["logits_dtype"] == "float32"
    # the met column names the run that failed, with its card and numerics (not the one that held)
    assert "a run of >= 300: 0.800 [" in mod.markdown([cell])
    assert "], H100, bfloat16, fp32 logits)" in mod.markdown([cell])


def test_of_runs_as_large_the_one_in_served_numerics_is_shown(tmp_path):
    """An fp32 run as large as a bf16 one is a diagnostic: the table's row (and its KV share, which in fp32 bytes is
    not what the plan holds when served) comes from the bf16 run, whichever file comes first."""
    mod = bench_module("quality_summary.py")
    plan = HeadPlan.dense(SPEC, "tiny")
    plan.save(tmp_path / "plan.json")
    digest = plan.digest()

    def run(name, **numerics):
        rows = _rows("dense", "d-dense", [i < 300 for i in range(400)]) + _rows("mine", digest,
                                                                               [i < 300 for i in range(400)])
        doc = _doc(digest, "NVIDIA H100 80GB HBM3", {("dense", "passkey", 1024): (0.75, 400),
                                                    ("mine", "passkey", 1024): (0.75, 400)},
                   {"dense": 1.0, "mine": 0.3}, rows)
        (tmp_path / name).write_text(json.dumps(doc | numerics))
        return str(tmp_path / name)

    fp32, bf16 = run("fp32.json", dtype="float32"), run("bf16.json", dtype="bfloat16")
    for files in ([fp32, bf16], [bf16, fp32]):
        assert mod.cells(str(tmp_path / "plan.json"), files)[0]["file"] == bf16
