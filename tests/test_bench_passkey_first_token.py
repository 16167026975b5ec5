"""bench/experiments/passkey_first_token.py: the margin of the first answer token under dense and plans."""

from __future__ import annotations

import json

import torch

from bench_modules import bench_module


def test_answer_start_and_margin():
    mod = bench_module("experiments/passkey_first_token.py")
    vocab = ["", " ", " the", "8", " 8", " 88", " 9", "x"]
    assert mod.answer_start_ids("8803", vocab) == [1, 4, 5]  # " ", " 8", " 88"; not "8" (no space), not " 9"
    logits = torch.tensor([0.0, 1.0, 3.0, 5.0, 2.5, 0.0, 0.0, 0.0])
    m, top = mod.margin(logits, [1, 4, 5])
    assert top == 3 and abs(m - (2.5 - 5.0)) < 1e-6
    s = mod.summary([0.05, -0.3, 2.0, -0.8], [True, False, True, False])
    assert s["first_token_right"] == 2 and s["within_0.1"] == 1 and s["within_0.5"] == 2 and s["within_1"] == 3
    # an exact tie (bf16 logits hold ~3 significant digits): argmax takes the lower id, here the answer's " "
    tied = torch.tensor([0.0, 4.0, 4.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    m, top = mod.margin(tied, [1, 4, 5])
    assert m == 0.0 and top == 1
    s = mod.summary([m], [top in [1, 4, 5]])
    assert s["first_token_right"] == 1 and s["margin_positive"] == 0 and s["exact_ties"] == 1


def test_first_token_on_a_tiny_model(tiny_llama, tmp_path, monkeypatch):
    mod = bench_module("experiments/passkey_first_token.py")
    monkeypatch.setattr("headwise.models.load_model", lambda *a, **k: tiny_llama)
    ids = tiny_llama.tokenizer("The pass key is 12345. What is the pass key? The pass key is")["input_ids"]
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"depth": d, "seed": 0, "idx": 0, "input_ids": ids, "answers": ["12345"]})
                               + "\n" for d in (0.1, 0.9)))
    out = tmp_path / "r.json"
    mod.main(["tiny", str(prompts), str(out), "--dtypes", "float32", "--transformers", "--generate"])
    res = json.loads(out.read_text())["results"]
    assert res["by"]["dense/float32"]["n"] == 2
    # on the CPU the dense engine runs transformers' own attention: the same first token on every prompt
    assert res["first_token_changes_vs_dense/float32"] == {"transformers/float32": 0}
    assert res["by"]["transformers/float32"]["max_abs_logit_diff_vs_first"] < 1e-4
    # generate() takes the forward's argmax
    dense = res["by"]["dense/float32"]
    assert dense["generate_first_token_right"] == dense["first_token_right"]
    for p in res["per_prompt"].values():
        assert isinstance(p["dense/float32"]["margin"], float)
    # an earlier run's records counted again with the argmax rule: the same counts as the run's own
    again = mod.rescore(json.loads(out.read_text()))
    assert again["dense/float32"]["first_token_right"] == dense["first_token_right"]
    assert again["dense/float32"]["generate_token_is_argmax"] == 2
