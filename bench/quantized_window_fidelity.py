"""What KIVI codes on Gemma 3 270M's sliding-window layers do to its predictions, and the bytes they hold (CPU).

``quantized`` on a native sliding-window layer keeps exactly the model's 512-token window (``plan.resolve``). Plans
against dense, on one Shakespeare text of 1,200 tokens (past the window, so groups have left it) prefilled in chunks
(512 unless named): KL (mean and median over positions) and top-1 agreement over the last 200 positions, greedy
continuations of 16 tokens, the KV bytes the real cache holds after the prompt (fp32 model: ratios against 4-byte
dense) and what the plan counts for 16-bit KV.

Plans: ``int8-all`` / ``int4-all`` (every head, group 32, residual 128); ``int8-sliding`` (8-bit on the 15 sliding
layers, ``full`` on the 3 global ones); ``int4-sliding-rR-cC`` (4-bit there, residual R, prefill chunk C): which
groups are codes when a query attends depends on both, and one token with a large key or value spoils its group's
scales, so this sweep shows how much 4-bit results move with them.

Run: PYTHONPATH=src python bench/quantized_window_fidelity.py   (last stdout line: the JSON document; also written to
bench/results/quantized_window_fidelity_<date>.json, never over an earlier result)
"""

import json

import torch

from headwise.bench.record import result_doc, result_path, write_result
from headwise.data import shakespeare
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan

N, LAST, NEW, CHUNK = 1200, 200, 16, 512

lm = load_model("gemma3-270m", device="cpu")
ids = lm.tokenizer(shakespeare(20_000), return_tensors="pt").input_ids[:, :N]
positions = torch.arange(N - LAST, N)
dense = Engine(lm, chunk_size=CHUNK)
ref = dense.logits(ids, positions=positions)[0].float()
ref_greedy = [e.token_id for e in dense.generate(ids[0], max_new_tokens=NEW, stop_token_ids=[]) if e.stats is None]


def quantized(bits: int, residual: int = 128) -> dict:
    return {"policy": "quantized", "params": {"bits": bits, "residual": residual}}


def sliding(head: dict) -> list[list[dict]]:
    return [[{"policy": "full"} if lm.spec.native_window(i) is None else head] for i in range(18)]


plans = {
    "int8-all": ([[quantized(8)] for _ in range(18)], CHUNK),
    "int4-all": ([[quantized(4)] for _ in range(18)], CHUNK),
    "int8-sliding": (sliding(quantized(8)), CHUNK),
}
for residual in (32, 64, 128):
    for chunk in (128, 512):
        plans[f"int4-sliding-r{residual}-c{chunk}"] = (sliding(quantized(4, residual)), chunk)
results = {}
for name, (layers, chunk) in plans.items():
    plan = HeadPlan(dict(lm.spec.fingerprint()), layers)
    eng = Engine(lm, plan, chunk_size=chunk)
    lg = eng.logits(ids, positions=positions)[0].float()
    kl = (ref.log_softmax(-1).exp() * (ref.log_softmax(-1) - lg.log_softmax(-1))).sum(-1)
    greedy = [e.token_id for e in eng.generate(ids[0], max_new_tokens=NEW, stop_token_ids=[]) if e.stats is None]
    cache = eng.new_cache(reserve=N)
    eng.prefill(ids, cache)
    same = next((i for i, (a, b) in enumerate(zip(greedy, ref_greedy)) if a != b), len(greedy))
    results[name] = {
        "prefill_chunk": chunk,
        "kl_dense_to_plan": round(kl.mean().item(), 6),
        "kl_median": round(kl.median().item(), 6),
        "top1_agreement": round((lg.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
        "max_logit_error": round((lg - ref).abs().max().item(), 4),
        "greedy_tokens_equal_to_dense": same,
        "kv_bytes": cache.kv_bytes(),
        "dense_kv_bytes": lm.spec.dense_kv_bytes(N, lm.dtype.itemsize),
        "planned_kv_fraction_16bit": round(plan.kv_fraction(lm.spec, N), 4),
    }
    print(name, results[name], flush=True)
doc = result_doc("PYTHONPATH=src python bench/quantized_window_fidelity.py",
                 {"prompt_tokens": N, "scored_positions": LAST, "plans": results})
write_result(doc, result_path("bench/results", "quantized_window_fidelity"))
print(json.dumps(doc))
