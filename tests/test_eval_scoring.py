"""Scoring on hand-made answers: right, wrong and partial, for every task."""

from __future__ import annotations

import pytest

from headwise.errors import InputError
from headwise.eval.scoring import found, score, score_task

CASES = [
    # task, answers, output, expected score
    ("passkey", ["71432"], " 71432. Remember it.", 1.0),
    ("passkey", ["71432"], " 71423.", 0.0),
    ("passkey", ["71432"], " 714321", 0.0),
    ("needle", ["4726193"], " 4726193.", 1.0),
    ("needle", ["4726193"], " 4726 193", 1.0),
    ("needle", ["4726193"], " not mentioned", 0.0),
    ("multikey_needle", ["5550001"], " 5550001", 1.0),
    ("multikey_needle", ["5550001"], " 5550002 (the other key)", 0.0),
    ("multivalue_needle", ["1111111", "2222222", "3333333", "4444444"], " 1111111, 2222222, 3333333 and 4444444", 1.0),
    ("multivalue_needle", ["1111111", "2222222", "3333333", "4444444"], " 1111111 and 3333333", 0.5),
    ("multivalue_needle", ["1111111", "2222222", "3333333", "4444444"], " 9999999", 0.0),
    ("multiquery_needle", ["1234567", "7654321", "1111222", "3333444"], " 1234567, 7654321, 0000000", 0.5),
    ("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"], " ABCDE, FGHIJ, KLMNO, PQRST, UVWXY", 1.0),
    ("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"], " abcde fghij", 0.4),
    ("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"], " ABCDEF", 0.0),
    ("common_words", [f"w{i}" for i in range(10)], " " + ", ".join(f"w{i}" for i in range(10)), 1.0),
    ("common_words", [f"w{i}" for i in range(10)], "\n1. W0\n2. w1\n3. x", 0.2),
    ("frequent_words", ["toz", "ljmg", "fge"], " toz, ljmg, fge", 1.0),
    ("frequent_words", ["toz", "ljmg", "fge"], " tozz ljmg", 1 / 3),
    ("mqar", ["1355", "1790", "3527", "2459"], " 1355, scarcity = 1790, doom = 3527, eagle = 2459", 1.0),
    ("mqar", ["1355", "1790", "3527", "2459"], " 1355, scarcity = 2991", 0.25),
    ("mqar", ["1355", "1790", "3527", "2459"], " 2991", 0.0),
]


@pytest.mark.parametrize(("task", "answers", "output", "expected"), CASES)
def test_scores_hand_made_answers(task, answers, output, expected):
    assert score_task(task, output, answers) == pytest.approx(expected)


def test_matching_ignores_case_and_whitespace():
    assert found("silver lantern", "The  SILVER\n lantern shone")


def test_answer_must_stand_as_a_whole_word():
    assert not found("fair", "an affair")
    assert not found("123", "41234")


def test_unknown_rule_is_refused():
    with pytest.raises(InputError, match="unknown scoring rule"):
        score("fuzzy", "x", ["x"])


def test_sample_without_answers_is_refused():
    with pytest.raises(InputError, match="no answers"):
        score("recall", "x", [])


def test_retention_pairs_samples_with_dense_and_skips_rows_of_an_old_plan():
    from headwise.eval.report import retention, retention_table

    def row(plan, digest, idx, score, task="passkey"):
        return {"plan": plan, "digest": digest, "task": task, "length": 1024, "depth": 0.5, "seed": 0, "idx": idx,
                "score": score}

    results = {
        "tasks": ["passkey", "fidelity"], "lengths": [1024],
        "plans": [{"label": "dense", "digest": {"1024": "d"}}, {"label": "p", "digest": {"1024": "new"}}],
        "rows": [row("dense", "d", 0, 1.0), row("dense", "d", 1, 1.0), row("dense", "d", 2, 0.0),
                 row("p", "new", 0, 1.0), row("p", "new", 1, 0.0), row("p", "new", 2, 1.0),  # idx 2: dense missed
                 row("p", "old", 0, 0.0)],  # an earlier plan under the same label: ignored
    }
    (r,) = retention(results)
    assert (r["plan"], r["kept"], r["n"], r["share"]) == ("p", 1, 2, 0.5)
    assert r["ci95"][0] < 0.5 < r["ci95"][1]
    # accuracy as a share of dense's on the same three prompts: 2 of 3 against 2 of 3, one flip each way
    ratio = r["accuracy_ratio"]
    assert (ratio["pairs"], ratio["both"], ratio["only_plan"], ratio["only_ref"], ratio["ratio"]) == (3, 1, 1, 1, 1.0)
    assert ratio["mcnemar_p"] == 1.0
    header, rows = retention_table(results)
    assert header == ["plan", "passkey 1K"] and rows[0][1].startswith("1/2 [")


def test_paired_ratio_interval_covers_like_a_bootstrap_and_mcnemar_sees_one_sided_flips():
    """Bonett-Price's adjusted log interval against a paired bootstrap of the same table (SmolLM2's 2K passkey at 30%
    KV: 61 both, 8 plan only, 12 dense only, 19 neither), and the exact McNemar p-value."""
    import random

    from headwise.eval.scoring import paired_ratio

    r = paired_ratio(61, 8, 12, 19)
    assert r["ratio"] == pytest.approx(69 / 73, abs=1e-4)
    pairs = [(1, 1)] * 61 + [(1, 0)] * 8 + [(0, 1)] * 12 + [(0, 0)] * 19
    rng = random.Random(0)
    boot = sorted(sum(x for x, _ in s) / sum(y for _, y in s)
                  for s in ([pairs[rng.randrange(100)] for _ in range(100)] for _ in range(4000)))
    assert r["ratio_ci95"][0] == pytest.approx(boot[100], abs=0.02)
    assert r["ratio_ci95"][1] == pytest.approx(boot[3900], abs=0.02)
    assert 0.4 < r["mcnemar_p"] < 0.6  # 8 against 12 flips: no evidence of a difference
    assert paired_ratio(80, 0, 12, 8)["mcnemar_p"] < 0.001  # 12 lost, none gained: a real loss
    assert paired_ratio(100, 0, 0, 0)["ratio_ci95"][0] > 0.97  # n = 100 in full agreement clears 0.90
    assert paired_ratio(0, 0, 0, 5)["ratio"] is None  # dense answered none: no ratio


def test_accuracy_vs_kv_plot_draws_wilson_intervals(tmp_path, monkeypatch):
    """The accuracy-vs-KV plot puts each point's Wilson 95% interval (over all its samples) on it as an error bar."""
    import matplotlib.axes

    from headwise.eval.report import accuracy_vs_memory
    from headwise.eval.scoring import wilson

    seen: list[tuple[list[float], list[list[float]]]] = []
    real = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kw):
        seen.append((list(y), [list(e) for e in yerr]))
        return real(self, x, y, yerr=yerr, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    results = {"model": "m", "lengths": [1024], "plans": [{"label": "dense"}],
               "accuracy": [{"plan": "dense", "task": "passkey", "length": 1024, "score": 0.8, "n": 50},
                            {"plan": "dense", "task": "needle", "length": 1024, "score": 0.6, "n": 50}],
               "performance": [{"plan": "dense", "length": 1024, "kv_bytes": 2**20}]}
    assert accuracy_vs_memory(results, tmp_path / "a.png") is not None
    (y, (low, high)), = seen
    lo, hi = wilson(0.7, 100)
    assert y == pytest.approx([70.0])
    assert low == pytest.approx([100 * (0.7 - lo)]) and high == pytest.approx([100 * (hi - 0.7)])
