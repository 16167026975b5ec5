"""Tensor parallelism on the CPU: two processes over gloo give the logits and tokens of one process.

The model is a tiny random Llama (4 layers, 8 query / 4 KV heads) saved with SmolLM2's tokenizer, loaded by
transformers' own tensor parallelism (``DistributedConfig(tp_size=2)``). Tolerance: fp32 logits within 1e-5
absolute; the two runs differ only in the order of fp32 sums (each rank's share of o and of the MLP, summed by
an all-reduce; the vocabulary-split embedding): 3.6e-7 at most on logits of magnitude 0.8 when this was written.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from headwise.engine import Engine
from headwise.models import LoadedModel, local_dir
from headwise.placement import balance, is_identity
from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming
from headwise.spec import ModelSpec

ATOL = 1e-5
SRC = Path(__file__).resolve().parents[1] / "src"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def mixed_plan(spec: ModelSpec) -> HeadPlan:
    """Per layer: KV heads 0 and 1 full (the naive split puts both on rank 0), 2 and 3 streaming."""
    pols = [[Full(), Full(), Streaming(sink=2, window=6), Streaming(sink=4, window=8)] for _ in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, pols, "tiny-tp")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer, saved as a Hugging Face directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(local_dir("smollm2-135m")[0]), local_files_only=True)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("tiny-tp")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _one_process(path: Path, plan: HeadPlan | None, ids: torch.Tensor) -> torch.Tensor:
    from headwise.models import load_dir

    model, tok = load_dir(path, torch.float32, "cpu")
    lm = LoadedModel("tiny", model, tok, ModelSpec.from_config(model.config), str(path))
    return Engine(lm, plan, chunk_size=16).logits(ids)


def _rank(rank: int, path: str, port: int, out: str, plan_dict: dict, ids: torch.Tensor) -> None:
    """One of two ranks: load the model twice (naive split, then balanced), run each plan on rank 0."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from headwise import tp

    group = tp.start(2, [])
    assert group is not None
    plan = HeadPlan.from_dict(plan_dict)
    results = {}
    try:
        for placement in ("naive", "balanced"):
            spec = ModelSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(path))
            order = None if placement == "naive" else balance(plan, spec, 2, 64)
            lm = tp.load_share("tiny", path, path, torch.float32, group, order)
            if rank == 0:
                group.driver = True
                for name, p in (("dense", None), ("mixed", plan)):
                    engine = Engine(lm, p, chunk_size=16)
                    results[f"{placement}/{name}"] = engine.logits(ids)
                    cache = engine.new_cache(1)
                    engine.prefill(ids, cache)
                    results[f"{placement}/{name}/kv_bytes"] = engine.kv_bytes(cache)
                    results[f"{placement}/{name}/rank0_kv_bytes"] = cache.kv_bytes()
                results[f"{placement}/order"] = group.order
                group.stop()
            else:
                tp.serve_ranks(Engine(lm), group)
    finally:
        group.close()
    if rank == 0:
        torch.save(results, out)


def test_two_ranks_over_gloo_give_the_logits_of_one_process(model_dir, tmp_path):
    spec = ModelSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(model_dir))
    plan = mixed_plan(spec)
    ids = torch.randint(0, 1000, (1, 41), generator=torch.Generator().manual_seed(3))
    out = tmp_path / "tp.pt"
    mp.spawn(_rank, args=(str(model_dir), _free_port(), str(out), plan.to_dict(), ids), nprocs=2)
    res = torch.load(out)
    assert not is_identity(res["balanced/order"])  # the balanced run did re-index heads
    for name, p in (("dense", None), ("mixed", plan)):
        ref = _one_process(model_dir, p, ids)
        for placement in ("naive", "balanced"):
            torch.testing.assert_close(res[f"{placement}/{name}"], ref, rtol=0, atol=ATOL)
            # KV bytes count both ranks; rank 0 holds its own heads only
            total = res[f"{placement}/{name}/kv_bytes"]
            assert res[f"{placement}/{name}/rank0_kv_bytes"] < total
    # the naive split puts both full heads of every layer on rank 0; the balanced one gives each rank one
    half = res["balanced/mixed/kv_bytes"] / 2
    assert res["naive/mixed/rank0_kv_bytes"] > 1.5 * half
    assert abs(res["balanced/mixed/rank0_kv_bytes"] - half) <= 0.05 * half
    assert res["naive/dense/kv_bytes"] == res["balanced/dense/kv_bytes"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _greedy_texts(path: Path, plan: HeadPlan, prompts: list[str], n: int) -> list[str]:
    from headwise.models import load_dir
    from headwise.sequence import SamplingParams

    model, tok = load_dir(path, torch.float32, "cpu")
    engine = Engine(LoadedModel("tiny", model, tok, ModelSpec.from_config(model.config), str(path)), plan,
                    chunk_size=8)
    return ["".join(ev.text for ev in engine.generate(p, SamplingParams(max_new_tokens=n))) for p in prompts]


PROMPTS = ["The pass key is 71432. Remember it. The pass key is", "Once upon a time", "A B C D E F G H I J K L M"]


def test_generate_with_tp_2_spawns_a_rank_and_gives_the_tokens_of_one_process(model_dir, tmp_path):
    spec = ModelSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(model_dir))
    plan = mixed_plan(spec)
    cmd = [sys.executable, "-m", "headwise.cli", "generate", str(model_dir),
           "--plan", str(plan.save(tmp_path / "p.json")), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--chunk-size", "8", "--tp", "2"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "per-rank KV" in run.stderr  # rank 0 said how it placed the heads
    assert run.stdout == _greedy_texts(model_dir, plan, PROMPTS[:1], 12)[0] + "\n"


@pytest.mark.slow
def test_server_on_rank_0_drives_the_other_rank(model_dir, tmp_path):
    """Concurrent requests (packed into shared forwards) to ``serve --tp 2`` get one process's greedy tokens; SIGTERM
    ends both ranks."""
    import json
    import signal
    import threading
    import time
    import urllib.request

    spec = ModelSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(model_dir))
    plan = mixed_plan(spec)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "headwise.cli", "serve", str(model_dir), "--port", str(port),
                             "--plan", str(plan.save(tmp_path / "p.json")), "--chunk-size", "8", "--tp", "2"],
                            env=_env(), stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                time.sleep(1)
        texts: dict[int, str] = {}

        def ask(i: int) -> None:
            body = json.dumps({"model": str(model_dir), "prompt": PROMPTS[i], "max_tokens": 8, "temperature": 0})
            req = urllib.request.Request(url, body.encode(), {"content-type": "application/json"})
            texts[i] = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [texts[i] for i in range(len(PROMPTS))] == _greedy_texts(model_dir, plan, PROMPTS, 8)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0


@pytest.mark.slow
def test_tp_decode_bench_runs_at_tiny_shapes_over_two_ranks(tmp_path):
    """bench/tp_decode.py's CPU dry run (the GPU command at tiny shapes, gloo): every layout fits and is timed."""
    import json

    script = Path(__file__).resolve().parents[1] / "bench" / "tp_decode.py"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           "--tiny", "--weights", str(tmp_path / "w"), "--out", str(tmp_path), "--steps", "2", "--warmup", "1"]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(run.stdout.strip().splitlines()[-1])
    runs = doc["results"]["runs"]
    assert doc["results"]["tp"] == 2 and all(runs[k]["fits"] for k in ("dense/naive", "25/naive", "25/balanced"))
    naive, placed = runs["25/naive"]["rank_kv_bytes"], runs["25/balanced"]["rank_kv_bytes"]
    assert max(placed) - min(placed) < max(naive) - min(naive)  # the stores the ranks really hold evened out


def test_tp_that_does_not_split_the_heads_is_a_one_line_error(model_dir, capsys):
    """--tp 3 over 4 KV heads: the command says why and exits 2 before it starts any other rank."""
    from headwise.cli import main

    assert main(["generate", str(model_dir), "--prompt", "hi", "--tp", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("headwise: error: tensor parallelism over 3 ranks splits whole heads")
    assert "WORLD_SIZE" not in os.environ  # nothing was started


def test_kv_memory_with_tp_is_a_one_line_error_before_any_rank_starts(model_dir, capsys):
    from headwise.cli import main

    assert main(["bench", "serve", "--model", str(model_dir), "--tp", "2", "--kv-memory", "1", "--requests", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "headwise: error: a page pool (--kv-memory) is not supported with --tp yet; leave out --kv-memory"
    assert "WORLD_SIZE" not in os.environ


@pytest.mark.slow
def test_eval_with_tp_2_matches_one_process(model_dir, tmp_path):
    """``headwise eval --tp 2``: the same fidelity to dense and the same measured KV bytes (summed over the ranks)."""
    import json

    from headwise.cli import main

    spec = ModelSpec.from_config(__import__("transformers").AutoConfig.from_pretrained(model_dir))
    plan = str(mixed_plan(spec).save(tmp_path / "mixed.json"))
    common = ["eval", str(model_dir), "--plans", f"dense,{plan}", "--tasks", "fidelity", "--lengths", "128",
              "--samples", "1", "--no-progress"]
    cmd = [sys.executable, "-m", "headwise.cli", *common, "--tp", "2", "--out", str(tmp_path / "two")]
    run = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    two, one = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("two", "one"))
    for a, b in zip(two["fidelity"], one["fidelity"], strict=True):
        assert a["plan"] == b["plan"] and abs(a["overall"]["kl"] - b["overall"]["kl"]) < 1e-4
    kv = lambda res: sorted((r["plan"], r["kv_bytes_tensors"]) for r in res["performance"])  # noqa: E731
    assert kv(two) == kv(one) and all(b for _, b in kv(one))
