"""The profiler on a GPU: DuoAttention gate training and a fast profile (spans, layer sensitivity, solver) on CUDA.

No model weights travel to the GPU box (no hub, no gguf there), so this uses a small random-weight Llama with the
bundled SmolLM2 tokenizer (saved with ``tokenizer.save_pretrained(DIR)``): it checks that the code runs on the
device and that the gates train, not what they learn.

    PYTHONPATH=src python bench/gpu_profile_smoke.py TOKENIZER_DIR OUT.json
"""
import json
import sys
import time

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from headwise.bench.record import result_doc, write_result
from headwise.models import LoadedModel
from headwise.profile.duo import train_gates
from headwise.profile.runner import Settings, profile_model
from headwise.spec import ModelSpec

tok = AutoTokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, attn_implementation="sdpa")
model = LlamaForCausalLM(cfg).eval().to("cuda")
lm = LoadedModel("tiny-llama-cuda", model, tok, ModelSpec.from_config(cfg), "random")
before = [p.detach().clone() for p in model.parameters()]
t = time.time()
duo = train_gates(lm, steps=8, seq_len=1024, progress=False)
duo_s = time.time() - t
frozen = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
t = time.time()
plan = profile_model(lm, 0.5, target_len=1024, settings=Settings.fast(), progress=False)
prof_s = time.time() - t
res = {"duo": {"steps": duo.steps, "seconds": round(duo_s, 2), "first_loss": duo.losses[0], "last_loss": duo.losses[-1],
               "alpha_min": float(duo.alpha.min()), "alpha_max": float(duo.alpha.max()), "weights_frozen": frozen,
               "gate_device": str(duo.alpha.device)},
       "profile": {"seconds": round(prof_s, 2), "solution": plan.meta["solution"], "layer_kl": plan.meta.get("layer_kl"),
                   "has_span_error": "span_error_kv" in plan.meta}}
print(json.dumps(res, indent=1))
write_result(result_doc("PYTHONPATH=src python bench/gpu_profile_smoke.py " + " ".join(sys.argv[1:]), res), sys.argv[2])
