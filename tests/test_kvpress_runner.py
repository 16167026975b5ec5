"""bench/kvpress/run_presses.py in kvpress's own environment (.venv-kvpress: `bench/kvpress/setup.sh`), on two short
prompts of the eval. Skipped where that environment is absent (it is not part of `make test`'s setup)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from headwise.eval.external import export_prompts, merge_outputs, read_jsonl
from headwise.eval.report import retention

ROOT = Path(__file__).resolve().parents[1]
KV_PYTHON = Path(os.environ.get("KVPRESS_VENV", ROOT / ".venv-kvpress")) / "bin" / "python"
RUNNER = ROOT / "bench" / "kvpress" / "run_presses.py"

pytestmark = pytest.mark.skipif(not KV_PYTHON.is_file(), reason="no .venv-kvpress: run bench/kvpress/setup.sh")


def _kvpress(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "2"}
    return subprocess.run([str(KV_PYTHON), *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def exported(smollm2, tmp_path_factory):
    from headwise.models import local_dir

    tmp = tmp_path_factory.mktemp("kvpress")
    export_prompts(smollm2, tmp / "prompts.jsonl", ["passkey"], [256], [0.25, 0.75], 2, 0,
                   model_dir=local_dir("smollm2-135m")[0])
    return tmp, read_jsonl(tmp / "prompts.jsonl", "prompts")


def test_kvpress_environment_is_transformers_4_with_kvpress_0_5_5():
    got = _kvpress("-c", "import kvpress, transformers; from importlib.metadata import version; "
                         "print(version('kvpress'), transformers.__version__)")
    assert got.returncode == 0, got.stderr[-2000:]
    kv, tf = got.stdout.split()
    assert kv == "0.5.5" and tf.startswith("4.")


def test_rope_theta_of_a_converted_copy_reaches_transformers_4(exported):
    _, prompts = exported
    code = ("import sys; sys.path.insert(0, 'bench/kvpress'); from run_presses import transformers4_config; "
            "from transformers import AutoConfig; c = AutoConfig.from_pretrained(sys.argv[1]); "
            "print(c.rope_theta, transformers4_config(c).rope_theta)")
    got = _kvpress("-c", code, prompts[0]["model_dir"])
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.split() == ["10000.0", "100000.0"]  # 4.57 alone would read SmolLM2's as its default


def test_presses_run_at_a_plans_memory_and_undressed_kvpress_answers_as_headwise_dense(exported, smollm2):
    from headwise.engine import Engine
    from headwise.eval.runner import EvalConfig, run_eval
    from headwise.plan import HeadPlan

    tmp, prompts = exported
    res = run_eval(EvalConfig(model="smollm2-135m", plans=["dense", "streaming@0.5"], tasks=["passkey"], lengths=[256],
                              depths=[0.25, 0.75], samples=2, out=tmp / "eval", progress=False), smollm2)
    target = next(r["kv_fraction_measured"] for r in res["performance"] if r["plan"] == "streaming@0.5")
    out = tmp / "outputs.jsonl"
    got = _kvpress(str(RUNNER), str(tmp / "prompts.jsonl"), "--presses", "none,streaming,snapkv", "--match",
                   f"{tmp / 'eval' / 'results.json'}:streaming@0.5", "--device", "cpu", "--out", str(out))
    assert got.returncode == 0, got.stderr[-3000:]
    summary = json.loads(got.stdout.strip().splitlines()[-1])
    assert {k: v["runs"] for k, v in summary["presses"].items()} == {
        "kvpress:none": 2, "kvpress:streaming@equal": 2, "kvpress:snapkv@equal": 2}
    rows = read_jsonl(out, "outputs")
    dense = {(r["depth"], r["idx"]): r for r in rows if r["label"] == "kvpress:none"}
    engine = Engine(smollm2, HeadPlan.dense(smollm2.spec))
    for p in prompts:
        text = "".join(ev.text for ev in engine.generate(p["input_ids"], max_new_tokens=p["max_new_tokens"],
                                                          temperature=0.0) if ev.stats is None)
        assert dense[(p["depth"], p["idx"])]["output"].strip() == text.strip()
    heads = smollm2.spec.num_layers * smollm2.spec.num_kv_heads
    for r in rows:
        d = dense[(r["depth"], r["idx"])]
        assert d["kv_tokens"] == r["prompt_tokens"] * heads
        n = r["prompt_tokens"] - 1
        if r["label"] == "kvpress:none":
            assert r["kv_tokens_peak"] == r["kv_tokens"]  # dense holds the most after the last prompt token
        else:
            # every layer and KV head keeps int(n * F) of the n prefilled tokens, plus the last prompt token
            assert r["kv_fraction_target"] == pytest.approx(target)
            kept = int(n * (1 - round(1 - target, 6)))
            assert r["kv_tokens"] == (kept + 1) * heads
            # the press cuts each layer in its own forward hook: at its peak the layers before the last hold their
            # cut caches, the last its whole context and its cut copy (not dense's KV, nor only the cut cache)
            layers = smollm2.spec.num_layers
            assert r["kv_tokens_peak"] == (layers * kept + n) * smollm2.spec.num_kv_heads

    # the outputs merge into the eval of the same prompts, their memory beside the plan they match
    merged = merge_outputs(res, rows, prompts)
    perf = {r["plan"]: r for r in merged["performance"]}
    assert perf["kvpress:snapkv@equal"]["kv_fraction"] == pytest.approx(target, abs=0.01)
    assert perf["kvpress:snapkv@equal"]["kv_fraction_peak"] == pytest.approx(
        target + 1 / smollm2.spec.num_layers, abs=0.02)
    kept = {r["plan"]: r for r in retention(merged)}
    if "kvpress:none" in kept:  # dense answered something at this length: undressed kvpress keeps all of it
        assert kept["kvpress:none"]["kept"] == kept["kvpress:none"]["n"]


def test_gemma3_text_is_refused_with_the_reason(tmp_path):
    from headwise.models import local_dir

    model_dir = local_dir("gemma3-270m")[0]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"format": "headwise-prompts", "model": "gemma3-270m", "model_key": "g",
                                   "model_dir": str(model_dir), "task": "passkey", "length": 256, "depth": 0.5,
                                   "seed": 0, "idx": 0, "input_ids": [2, 3, 4], "max_new_tokens": 2}) + "\n")
    got = _kvpress(str(RUNNER), str(prompts), "--presses", "snapkv", "--kv-fraction", "0.5", "--device", "cpu",
                   "--out", str(tmp_path / "o.jsonl"))
    assert got.returncode == 2
    assert "does not handle Gemma 3" in got.stderr and "--allow-gemma3" in got.stderr


@pytest.mark.slow  # Gemma 3 at 1K tokens in both environments: about a minute on 2 cores
def test_gemma3_run_anyway_keeps_every_token_in_its_sliding_layers_and_presses_them_alike(gemma3, tmp_path):
    """What --allow-gemma3 shows (docs/eval.md): the dense model answers as headwise's does; in kvpress's pipeline
    cache (``DynamicCache()``) the sliding-window layers hold every prompt token, not their window, and a press cuts
    them by the same ratio as the global layers (kvpress skips them only for Gemma3ForConditionalGeneration)."""
    from headwise.engine import Engine
    from headwise.models import local_dir
    from headwise.plan import HeadPlan

    export_prompts(gemma3, tmp_path / "p.jsonl", ["passkey"], [1024], [0.5], 1, 0,
                   model_dir=local_dir("gemma3-270m")[0])
    (prompt,) = read_jsonl(tmp_path / "p.jsonl", "prompts")
    got = _kvpress(str(RUNNER), str(tmp_path / "p.jsonl"), "--allow-gemma3", "--presses", "none,streaming",
                   "--kv-fraction", "0.5", "--device", "cpu", "--out", str(tmp_path / "o.jsonl"))
    assert got.returncode == 0, got.stderr[-3000:]
    rows = {r["label"]: r for r in read_jsonl(tmp_path / "o.jsonl", "outputs")}
    dense, pressed = rows["kvpress:none-untested"], rows["kvpress:streaming-untested@0.5"]
    engine = Engine(gemma3, HeadPlan.dense(gemma3.spec))
    text = "".join(ev.text for ev in engine.generate(prompt["input_ids"], max_new_tokens=prompt["max_new_tokens"],
                                                      temperature=0.0) if ev.stats is None)
    assert dense["output"].strip() == text.strip()
    n = len(prompt["input_ids"]) - 1
    assert n + 1 > max(w for w in gemma3.spec.layer_windows if w is not None)  # past the sliding window
    # every layer, sliding or global: all n + 1 prompt tokens dense; int(n * 0.5) + the last one pressed
    assert dense["kv_tokens_per_layer"] == [n + 1] * gemma3.spec.num_layers
    assert pressed["kv_tokens_per_layer"] == [int(n * 0.5) + 1] * gemma3.spec.num_layers
    # so kvpress's dense holds more than headwise's dense, whose sliding layers keep their window
    assert dense["kv_tokens"] > gemma3.spec.dense_kv_tokens(n + 1)


@pytest.mark.parametrize(("args", "message"), [
    (["--presses", "duo", "--kv-fraction", "0.5"], "booksum"),
    (["--presses", "snapkv"], "give one of --kv-fraction"),
    (["--presses", "snapkv", "--kv-fraction", "1024=0.5"], "no KV fraction for length"),
    (["--presses", "h2o", "--kv-fraction", "0.5"], "unknown press 'h2o'"),
])
def test_bad_runs_are_refused_in_one_line(exported, args, message):
    tmp, _ = exported
    got = _kvpress(str(RUNNER), str(tmp / "prompts.jsonl"), *args, "--out", str(tmp / "never.jsonl"))
    assert got.returncode == 2 and message in got.stderr and len(got.stderr.strip().splitlines()) == 1
