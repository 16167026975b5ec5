"""Bad input gets one clear line on stderr and exit status 2, never a traceback (issue 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from headwise.cli import main
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec
from tiny import tiny_config


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, smollm2) -> Path:
    """A tiny random llama saved as a Hugging Face directory, with SmolLM2's tokenizer and a 64-token context."""
    import transformers as tf

    d = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_config("llama", vocab_size=len(smollm2.tokenizer), hidden_size=32, max_position_embeddings=64)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(d)
    smollm2.tokenizer.save_pretrained(d)
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("headwise: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_unknown_model_name(capsys):
    rc, _, err = run(capsys, "info", "llama-9000")
    assert_one_line_error(rc, err, "unknown model 'llama-9000'", "smollm2-135m")


def test_missing_weight_file(capsys, tmp_path):
    rc, _, err = run(capsys, "info", str(tmp_path / "nope.gguf"))
    assert_one_line_error(rc, err, "does not exist")


def test_corrupt_weight_file(capsys, tmp_path):
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\xff" * 64)
    rc, _, err = run(capsys, "info", str(bad))
    assert_one_line_error(rc, err, "cannot load model from", "corrupt.gguf")


def test_directory_without_config(capsys, tmp_path):
    rc, _, err = run(capsys, "info", str(tmp_path))
    assert_one_line_error(rc, err, "no config.json")


def test_info_and_dense_plan_on_a_hf_directory(capsys, tiny_dir, tmp_path):
    rc, out, _ = run(capsys, "info", str(tiny_dir), "--json")
    assert rc == 0 and json.loads(out)["kv_bytes_per_token"] == 2 * 4 * 2 * 16 * 4
    rc, out, _ = run(capsys, "plan", "dense", str(tiny_dir), "-o", str(tmp_path / "p.json"))
    assert rc == 0 and HeadPlan.load(tmp_path / "p.json").counts() == {"full": 8}


def _plan_for(layers: int, kv: int, tmp_path: Path, name: str = "p.json") -> Path:
    spec = ModelSpec("llama", layers, 4, kv, 16, 64, (None,) * layers)
    return HeadPlan.dense(spec, "other-model").save(tmp_path / name)


def test_plan_for_another_model_names_the_mismatch(capsys, tiny_dir, tmp_path):
    plan = _plan_for(6, 2, tmp_path)
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--plan", str(plan), "--prompt", "hi")
    assert_one_line_error(rc, err, "num_layers=6", "num_layers=4")


def test_plan_with_a_missing_head_names_layer_and_head(capsys, tiny_dir, tmp_path):
    path = _plan_for(4, 2, tmp_path)
    data = json.loads(path.read_text())
    data["layers"][2].pop()
    path.write_text(json.dumps(data))
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--plan", str(path), "--prompt", "hi")
    assert_one_line_error(rc, err, "layer 2 lists 1 KV heads", "2")


def test_plan_with_unknown_policy(capsys, tiny_dir, tmp_path):
    path = _plan_for(4, 2, tmp_path)
    data = json.loads(path.read_text())
    data["layers"][3][1] = {"policy": "magic"}
    path.write_text(json.dumps(data))
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--plan", str(path), "--prompt", "hi")
    assert_one_line_error(rc, err, "unknown policy 'magic'", "layer 3 KV head 1", "streaming")


def test_plan_with_bad_parameter(capsys, tiny_dir, tmp_path):
    path = _plan_for(4, 2, tmp_path)
    data = json.loads(path.read_text())
    data["layers"][0][0] = {"policy": "streaming", "params": {"sink": 4, "windw": 8}}
    path.write_text(json.dumps(data))
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--plan", str(path), "--prompt", "hi")
    assert_one_line_error(rc, err, "unknown parameter(s) windw")


def test_plan_that_is_not_json(capsys, tiny_dir, tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--plan", str(path), "--prompt", "hi")
    assert_one_line_error(rc, err, "not valid JSON")


def test_prompt_longer_than_context(capsys, tiny_dir, tmp_path):
    f = tmp_path / "long.txt"
    f.write_text("word " * 200)
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt-file", str(f), "--max-new-tokens", "4")
    assert_one_line_error(rc, err, "exceeds", "context of 64 tokens")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_cuda_graphs_on_a_cpu(capsys, tiny_dir):
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", "--cuda-graphs", "on")
    assert_one_line_error(rc, err, "CUDA-graph decode was asked for", "not CUDA")
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", "--cuda-graphs",
                       "auto")
    assert rc == 0 and "CUDA graph" not in err


def test_unreadable_prompt_file(capsys, tiny_dir, tmp_path):
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(rc, err, "missing.txt", "does not exist")
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\xfa" * 10)
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt-file", str(binary))
    assert_one_line_error(rc, err, "not UTF-8")


def test_generate_streams_and_reports_kv(capsys, tiny_dir, tmp_path):
    stats = tmp_path / "stats.json"
    rc, _, err = run(capsys, "generate", str(tiny_dir), "--prompt", "Once upon", "--max-new-tokens", "5",
                     "--stats-json", str(stats))
    assert rc == 0
    assert "tok/s" in err and "KV held" in err
    data = json.loads(stats.read_text())
    assert data["new_tokens"] <= 5 and data["kv_bytes"] > 0



def test_a_reader_that_goes_away_gets_no_traceback(monkeypatch):
    """``headwise plan show PLAN | head -1``: writing to the closed pipe raises BrokenPipeError; the command stops
    quietly with status 141 instead of a traceback."""
    import os
    import sys

    r, w = os.pipe()
    saved = os.dup(1)

    class ClosedPipe:
        def write(self, _text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            pass

        def fileno(self) -> int:
            return 1

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    try:
        os.dup2(w, 1)
        status = main(["plan", "show", str(Path(__file__).resolve().parents[1] / "plans" / "smollm2-135m.json")])
    finally:
        os.dup2(saved, 1)
        for fd in (r, w, saved):
            os.close(fd)
    assert status == 141
