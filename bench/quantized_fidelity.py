"""What KIVI quantization of every KV head does to SmolLM2-135M's predictions, and the bytes it holds (CPU is fine).

Every head ``quantized`` (8 and 4 bits, group 32, residual 128) against the dense plan, on one Shakespeare text of
400 tokens prefilled in chunks of 128 (so most of it is quantized before later chunks attend): the largest logit
error and the KL / top-1 agreement over positions 200..399, greedy continuations of 32 tokens from the first 300,
and the KV bytes the real cache holds after the 400 tokens (fp32 model: ratios against 4-byte dense).

Run: PYTHONPATH=src python bench/quantized_fidelity.py   (last stdout line: the JSON document; also written to
bench/results/quantized_fidelity_<date>.json, never over an earlier result)
"""

import json

import torch

from headwise.bench.record import result_doc, result_path, write_result
from headwise.data import shakespeare
from headwise.engine import Engine
from headwise.models import load_model
from headwise.plan import HeadPlan

lm = load_model("smollm2-135m", device="cpu")
ids = lm.tokenizer(shakespeare(3000), return_tensors="pt").input_ids[:, :400]
dense = Engine(lm)
ref = dense.logits(ids)[0, 200:]
ref_greedy = [e.token_id for e in dense.generate(ids[0, :300], max_new_tokens=32, stop_token_ids=[]) if e.stats is None]
results = {}
for bits in (8, 4):
    plan = HeadPlan.uniform(lm.spec, {"policy": "quantized", "params": {"bits": bits}})
    eng = Engine(lm, plan, chunk_size=128)
    lg = eng.logits(ids)[0, 200:]
    greedy = [e.token_id for e in eng.generate(ids[0, :300], max_new_tokens=32, stop_token_ids=[]) if e.stats is None]
    cache = eng.new_cache(reserve=400)
    eng.prefill(ids, cache)
    same = next((i for i, (a, b) in enumerate(zip(greedy, ref_greedy)) if a != b), len(greedy))
    results[f"int{bits}"] = {
        "max_logit_error": round((lg - ref).abs().max().item(), 4),
        "dense_max_abs_logit": round(ref.abs().max().item(), 4),
        "kl_dense_to_plan": float(torch.nn.functional.kl_div(lg.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                                             reduction="batchmean")),
        "top1_agreement": round((lg.argmax(-1) == ref.argmax(-1)).float().mean().item(), 4),
        "greedy_tokens_equal_to_dense": same,
        "kv_bytes": cache.kv_bytes(),
        "dense_kv_bytes": lm.spec.dense_kv_bytes(400, lm.dtype.itemsize),
        "planned_kv_bytes": plan.kv_bytes(lm.spec, 400, lm.dtype.itemsize),
    }
    print(bits, results[f"int{bits}"], flush=True)
doc = result_doc("PYTHONPATH=src python bench/quantized_fidelity.py", results)
write_result(doc, result_path("bench/results", "quantized_fidelity"))
print(json.dumps(doc))
