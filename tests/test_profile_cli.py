"""``headwise profile`` from the command line: user mistakes and Ctrl-C give one clear line and no plan file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from headwise.cli import main


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.25"])
def test_budget_outside_zero_one_is_a_one_line_error(budget, tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["profile", "smollm2-135m", "--budget", budget, "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("headwise: error:") and "(0, 1]" in err and "\n" not in err
    assert not out.exists()


def test_unknown_model_is_a_one_line_error(tmp_path, capsys):
    rc = main(["profile", "no-such-model", "--budget", "0.25", "-o", str(tmp_path / "p.json")])
    assert rc == 2 and "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--method", "duo"], ["--method", "ablation", "--from-scores", "p0.json"]])
def test_ablation_base_with_no_ablation_to_measure_is_a_one_line_error(extra, tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(tmp_path / "p.json"),
               "--ablation-base", "quantized4", *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--ablation-base quantized4" in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("extra", [["--quant-global-key-bits", "8"], ["--quant-residual", "64"],
                                   ["--quantize", "--quant-residual", "0"], ["--quant-2bit"],
                                   ["--quantize", "--quant-global-key-bits", "2"]])
def test_quantized_options_without_quantize_or_out_of_range_are_a_one_line_error(extra, tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(tmp_path / "p.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and ("--quantize" in err or "residual" in err or "--quant-2bit" in err) and "\n" not in err
    assert not (tmp_path / "p.json").exists()


def test_ctrl_c_during_profiling_leaves_no_plan(tmp_path):
    out = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "headwise.cli", "profile", "smollm2-135m", "--budget", "0.25", "-o", str(out), "--fast"],
        stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        # A run started in the background (``make test &``) inherits SIGINT ignored, and Python then installs no
        # KeyboardInterrupt handler: give the child the default disposition, as a terminal would.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = ""
    deadline = time.time() + 240
    assert proc.stderr is not None
    while "retrieval score" not in seen and time.time() < deadline:  # wait until profiling has started
        seen += proc.stderr.read(1)
    assert "retrieval score" in seen, seen
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "interrupted; no plan written" in seen + rest
    assert "Traceback" not in seen + rest
    assert not out.exists() and not list(tmp_path.iterdir())


def test_a_phase_is_timed_and_logged_only_without_bars(capsys):
    from headwise.profile.runner import phase

    timings: dict[str, float] = {}
    with phase(timings, "ablation", log=True):
        pass
    with phase(timings, "mass", log=False):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "headwise profile: ablation ..." and err[1].startswith("headwise profile: ablation took ")
    assert len(err) == 2 and set(timings) == {"ablation_s", "mass_s"} and min(timings.values()) >= 0


def test_a_phase_cut_short_leaves_its_start_logged_and_no_time(capsys):
    from headwise.profile.runner import phase

    timings: dict[str, float] = {}
    with pytest.raises(KeyboardInterrupt), phase(timings, "select_deals", log=True):
        raise KeyboardInterrupt
    assert capsys.readouterr().err == "headwise profile: select_deals ...\n" and timings == {}


@pytest.mark.slow
def test_fast_profile_writes_plan_png_and_command(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["profile", "smollm2-135m", "--budget", "0.25", "-o", str(out), "--fast", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "headwise profile: retrieval took" in err and "headwise profile: solve took" in err
    plan = json.loads(out.read_text())
    assert plan["meta"]["created_by"].startswith("headwise profile smollm2-135m --budget 0.25")
    assert plan["meta"]["solution"]["kv_fraction"] <= 0.25
    assert (tmp_path / "plan.png").stat().st_size > 10_000


@pytest.mark.parametrize(("extra", "says"), [
    (["--method", "ablation", "--ablation-text-weight", "-1"], "must be a number >= 0, got -1.0"),
    (["--method", "ablation", "--ablation-text-weight", "nan"], "must be a number >= 0, got nan"),
    (["--method", "duo", "--ablation-text-weight", "1"], "needs --method ablation"),
])
def test_a_bad_ablation_text_weight_is_a_one_line_error(extra, says, tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(tmp_path / "p.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--ablation-text-weight" in err and says in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("extra", "says"), [(["--act-objective", "retrieval"], "add --act"),
                                             (["--act", "--act-objective", "retrieval", "--from-scores", "p0.json"],
                                              "--act measures")])
def test_an_act_objective_without_act_or_with_from_scores_is_a_one_line_error(extra, says, tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(tmp_path / "p.json"), *extra])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("ring", ["7", "128", "-1"])
def test_a_min_ring_out_of_range_is_a_one_line_error(ring, tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.3", "-o", str(tmp_path / "p.json"), "--min-ring", ring])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and ("ring" in err or "--min-ring" in err) and "\n" not in err
    assert not (tmp_path / "p.json").exists()


def test_a_min_ring_reaches_budgets_below_the_spans_and_stays_in_the_command(tmp_path, capsys):
    """SmolLM2 from the shipped plan's scores at 1K: 0.1 is below its all-streaming floor with 128-token rings (a
    one-line error); ``--min-ring 32`` solves it, within the budget, and the plan's command carries the flag."""
    from pathlib import Path

    from headwise.models import load_model
    from headwise.plan import HeadPlan

    ranking = Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m.json"
    args = ["profile", "smollm2-135m", "--budget", "0.1", "--from-scores", str(ranking), "--target-len", "1024",
            "--method", "ablation", "--full-share", "1.0", "--no-progress", "--quantize"]
    assert main([*args, "-o", str(tmp_path / "no.json")]) == 2
    assert "smallest streaming plan" in capsys.readouterr().err
    out = tmp_path / "ring.json"
    assert main([*args, "-o", str(out), "--min-ring", "32"]) == 0, capsys.readouterr().err
    plan = HeadPlan.load(out)
    assert "--min-ring 32" in plan.meta["created_by"]
    assert plan.kv_fraction(load_model("smollm2-135m").spec, 1024) <= 0.1 + 1e-9


@pytest.mark.parametrize(("kind", "budget"), [("longheads", "0.5"), ("longheads", "1.0"), ("offload", "0.5")])
def test_full_heads_run_as_longheads_or_offload(kind, budget, tmp_path, capsys):
    """``--full-heads``: the heads the solver keeps whole become LongHeads (max chunk scores) or RetrievalAttention
    (sinks + window on the device: less KV on the GPU than the same plan with full heads); every other head as
    solved, and the command in the plan's meta. A LongHeads plan runs past the model's context only when no global
    layer keeps a streaming head (budget 1.0 here); otherwise it says so."""
    from pathlib import Path

    from headwise.models import load_model
    from headwise.plan import HeadPlan

    ranking = Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m.json"  # scores measured at 1K: re-solved
    plans = {}
    for heads in ("full", kind):
        out = tmp_path / f"{heads}.json"
        rc = main(["profile", "smollm2-135m", "--budget", budget, "-o", str(out), "--from-scores", str(ranking),
                   "--target-len", "1024", "--method", "ablation", "--full-share", "1.0", "--no-progress",
                   "--full-heads", heads])
        assert rc == 0, capsys.readouterr().err
        plans[heads] = HeadPlan.load(out)
    said = capsys.readouterr().out
    spec = load_model("smollm2-135m").spec
    solved, got = plans["full"], plans[kind]
    want = "longheads" if kind == "longheads" else "retrieval_offload"
    pairs = [(a["policy"], b["policy"]) for ra, rb in zip(solved.layers, got.layers) for a, b in zip(ra, rb)]
    assert ("full", want) in pairs and all(b == (want if a == "full" else a) for a, b in pairs)
    assert f"--full-heads {kind}" in got.meta["created_by"]
    if kind == "longheads":
        assert solved.max_context(spec) == 8192
        assert all(h.get("params") == {"chunk_score": "max"} for row in got.layers for h in row
                   if h["policy"] == "longheads")
        extends = budget == "1.0"  # every head kept whole: no streaming head left
        assert (got.max_context(spec) is None) == extends and ("keep it within the model's context" in said) != extends
    else:
        assert got.kv_bytes(spec, 8192) < solved.kv_bytes(spec, 8192)


def test_full_heads_with_act_or_prefill_patterns_is_a_one_line_error(tmp_path, capsys):
    rc = main(["profile", "smollm2-135m", "--budget", "0.5", "-o", str(tmp_path / "p.json"), "--full-heads",
               "longheads", "--prefill-patterns", "0.3"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--full-heads longheads" in err and "\n" not in err
    assert not (tmp_path / "p.json").exists()
