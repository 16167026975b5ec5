"""bench/retrieval_curve.py: curve cells paired with dense rows from another run of the same prompts."""

from __future__ import annotations

import json

from bench_modules import bench_module


def _module():
    return bench_module("retrieval_curve.py")


def _results(plans: dict[str, list[float]], depths=(0.1, 0.9)) -> dict:
    """One passkey cell at 1K per plan; scores listed per sample (depth alternating)."""
    rows, acc, perf = [], [], []
    for label, scores in plans.items():
        for i, s in enumerate(scores):
            rows.append({"plan": label, "digest": f"d-{label}", "task": "passkey", "length": 1024,
                         "depth": depths[i % 2], "seed": 0, "idx": i // 2, "score": s})
        acc.append({"plan": label, "task": "passkey", "length": 1024, "n": len(scores),
                    "score": sum(scores) / len(scores), "ci95": [0.0, 1.0]})
        perf.append({"plan": label, "length": 1024, "kv_fraction": 0.25, "kv_fraction_measured": 0.251})
    return {"plans": [{"label": p, "digest": {"1024": f"d-{p}"}} for p in plans], "tasks": ["passkey"],
            "lengths": [1024], "accuracy": acc, "performance": perf, "rows": rows, "command": "headwise eval ...",
            "commit": "abc", "device": "test"}


def test_cells_pair_with_dense_sample_by_sample(tmp_path, monkeypatch):
    mod = _module()
    run = tmp_path / "run" / "eval-curve-q0.25"
    run.mkdir(parents=True)
    # the plan answers 3 of the 4 prompts dense answers and one dense misses; random answers 1 of dense's 4
    (run / "results.json").write_text(json.dumps(_results({"x-q0.25": [1, 1, 1, 0, 1, 1],
                                                           "random@equal": [1, 0, 0, 0, 1, 1]})))
    dense = tmp_path / "dense"
    dense.mkdir()
    (dense / "results.json").write_text(json.dumps(_results({"dense": [1, 1, 1, 1, 0, 0]})))
    rows = {(r["run"], r["kind"]): r for r in mod.collect([("v2", tmp_path / "run")], dense, "passkey")}
    plan, rnd = rows[("v2", "plan")], rows[("v2", "random")]
    assert (plan["kept"], plan["kept_n"], plan["budget"]) == (3, 4, 0.25)
    assert plan["accuracy_ratio"] == round(5 / 4, 4) and len(plan["accuracy_ratio_ci95"]) == 2  # 5 right of dense's 4
    assert (rnd["kept"], rnd["kept_n"]) == (1, 4)
    assert rows[("dense", "dense")]["n"] == 6
    titles = []
    real_savefig = mod.plt.Figure.savefig

    def savefig(fig, path, **kw):  # what the figure says, read as it is written
        titles.append((fig.get_suptitle(), [ax.get_title() for ax in fig.axes]))
        real_savefig(fig, path, **kw)

    monkeypatch.setattr(mod.plt.Figure, "savefig", savefig)
    mod.plot(list(rows.values()), "passkey", "the title", tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0
    from PIL import Image

    with Image.open(tmp_path / "c.png") as im:  # palette colours: a third of the bytes of the RGBA figure
        assert im.mode == "P" and len(im.getcolors() or []) <= 64
    assert titles[0][0] == "the title"
    assert titles[0][1][0] == "passkey at 1K tokens (dense 67%, n = 6)"


def test_baselines_at_a_budget_are_baselines():
    """The curve's SELECT_UNDER runs its baselines at the budget (``streaming@0.5``, ``quest@0.15``): they must be
    drawn as baselines, not as profiled plans (a plan named like one stays a plan)."""
    mod = _module()
    assert mod.kind_of("streaming@0.5") == "streaming"
    assert mod.kind_of("quest@0.15") == "quest"
    assert mod.kind_of("random@equal:3") == "random"
    assert mod.kind_of("random-full@equal:2") == mod.kind_of("random-full@0.35") == "random-full"
    assert mod.kind_of("kvpress:knorm@equal") == "kvpress:knorm"
    assert mod.kind_of("smollm2-135m-q0.5") == "plan"
    assert mod.kind_of("streaming@wide") == "plan"


def test_each_run_reads_apart_in_the_plot():
    """Several runs on one axis: each run its own marker, each run's plan its own shade; a kind keeps its colour
    across runs for the baselines, which are dashed with open markers."""
    mod = _module()
    styles = [mod.run_style("plan", i, 4, mod.COLOR) for i in range(4)]
    assert len({s["marker"] for s in styles}) == 4
    assert len({tuple(s["color"]) for s in styles}) == 4
    base = [mod.run_style("streaming", i, 4, mod.COLOR) for i in range(2)]
    assert base[0]["color"] == base[1]["color"] == mod.COLOR["streaming"]
    assert base[0]["marker"] != base[1]["marker"] and base[0]["linestyle"] == "--" and base[0]["mfc"] == "white"
    assert mod.run_style("plan", 0, 1, mod.COLOR)["color"] == mod.COLOR["plan"]


def test_a_baseline_named_at_a_budget_keeps_its_budget(tmp_path):
    """One eval may run a baseline at several budgets (``quest@0.1,quest@0.3``): each cell keeps the budget in its
    name, not the folder's; plans and ``@equal`` baselines keep the folder's."""
    mod = _module()
    run = tmp_path / "run" / "eval-curve-q0.1"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(_results({"quest@0.1": [1, 0], "quest@0.3": [1, 1],
                                                           "streaming@equal": [0, 0], "x-q0.1": [1, 1]})))
    got = {r["plan"]: r["budget"] for r in mod.collect([("q", tmp_path / "run")], None, "passkey")}
    assert got == {"quest@0.1": 0.1, "quest@0.3": 0.3, "streaming@equal": 0.1, "x-q0.1": 0.1}
    assert mod.at_budget("streaming@wide") is None and mod.at_budget("random@equal:3") is None
