"""Engine decode steps on a GPU, end to end through transformers (eager, as ``Engine.generate`` runs them).

No model weights reach the GPU box, so this builds a random-weight Llama with Llama-3-8B's attention and MLP
shapes (32 query / 8 KV heads, head_dim 128, hidden 4096) and a few layers, prefills a long random prompt and
times single-token decode steps (median of CUDA-synchronised steps): the model's own SDPA path with a
``DynamicCache`` (left to choose its backend, and with flash named), headwise with the dense plan, and headwise
with a DuoAttention-style plan (KV heads 0-1 full, 2-7 streaming sink 64 + window 1024) and with Quest on every
head (``page_topk``, pages of 32, a 4096-token budget), each on the reference
path (SDPA), on the decode kernel (``use_kernels``), and on the kernel with steps replayed from a CUDA graph
(``GraphDecoder``); it checks that the paths give the same next-token logits, and times PyTorch's SDPA on one
layer's shapes with a fixed and with a growing cache length.

    PYTHONPATH=src python3 bench/gpu_engine_decode.py OUT.json [--context 32768] [--layers 4] [--steps 20]
    TRITON_INTERPRET=1 PYTHONPATH=src python3 bench/gpu_engine_decode.py /tmp/x.json --context 256 --hidden 256 --steps 2
        (a CPU dry run of the script itself)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from headwise.bench.record import result_doc, write_result
from headwise.bench.timing import Timer
from headwise.engine import Engine, GraphDecoder
from headwise.models import LoadedModel
from headwise.plan import HeadPlan
from headwise.policies import Full
from headwise.policies.page_topk import PageTopK
from headwise.policies.streaming import Streaming
from headwise.spec import ModelSpec


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=4096, help="smaller for a CPU dry run (with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 7 // 2,
                      num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=args.context + 1024,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(dev, torch.bfloat16 if dev == "cuda" else torch.float32).eval()
    lm = LoadedModel("llama3-8b-shapes-random", model, None, ModelSpec.from_config(cfg), "random")
    ids = torch.randint(0, cfg.vocab_size, (1, args.context + args.steps + 8), device=dev)
    prompt, nxt = ids[:, : args.context], ids[:, args.context :]
    res: dict[str, object] = {"context": args.context, "layers": args.layers, "steps": args.steps}

    # the model's own path: SDPA over a DynamicCache
    cache = DynamicCache()
    model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    i = [0]

    def hf_step() -> None:
        model(input_ids=nxt[:, i[0] % 8 : i[0] % 8 + 1], past_key_values=cache, use_cache=True)
        i[0] += 1

    res["hf_sdpa_ms"] = Timer.wall(hf_step, args.steps)
    if dev == "cuda":  # the same with SDPA's flash backend named (no re-planning at each new length)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            res["hf_sdpa_flash_ms"] = Timer.wall(hf_step, args.steps)
    cache = None  # free the DynamicCache

    plan_a = HeadPlan.from_policies(lm.spec, [[Full()] * 2 + [Streaming(sink=64, window=1024)] * 6
                                              for _ in range(args.layers)])
    quest = HeadPlan.from_policies(lm.spec, [[PageTopK(page_size=32, budget=4096)] * 8 for _ in range(args.layers)])
    logits = {}
    for name, plan, kernels in (("headwise_dense_reference", None, False), ("headwise_dense_kernel", None, True),
                                ("plan_a_reference", plan_a, False), ("plan_a_kernel", plan_a, True),
                                ("page_topk_reference", quest, False), ("page_topk_kernel", quest, True)):
        engine = Engine(lm, plan, chunk_size=4096, use_kernels=kernels)
        hw = engine.new_cache(1, reserve=args.context + args.steps + 8)
        engine.prefill(prompt, hw)
        logits[name] = engine.forward(nxt[:, :1], hw).float()
        j = [1]

        def step(engine=engine, hw=hw, j=j) -> None:
            engine.forward(nxt[:, j[0] : j[0] + 1], hw)
            j[0] += 1

        res[f"{name}_ms"] = Timer.wall(step, args.steps)
        res[f"{name}_kv_bytes"] = hw.kv_bytes()
        del hw
        if kernels and dev == "cuda":
            # The same decode steps replayed from one CUDA graph (GraphDecoder), and its logits against the
            # eager kernel step's over a few steps.
            hw, ref = engine.new_cache(1, reserve=args.context + 2 * args.steps + 16), engine.new_cache(
                1, reserve=args.context + 2 * args.steps + 16)
            engine.prefill(prompt, hw)
            engine.prefill(prompt, ref)
            decoder = GraphDecoder(engine, hw)
            diff = 0.0
            for t in range(4):
                tok = int(nxt[0, t])
                a = engine.forward(nxt[:, t : t + 1], ref).float()
                _sync()
                t0 = time.perf_counter()
                b = decoder.step(tok)
                _sync()
                if t == 0:  # the first step: run eagerly on the graph-ready path (compiling its kernels), captured
                    res[f"{name}_graph_first_step_with_compile_ms"] = 1e3 * (time.perf_counter() - t0)
                diff = max(diff, (b.float() - a).abs().max().item())
            # A second decoder's first step, the kernels compiled: one eager step + the capture.
            again = GraphDecoder(engine, ref)
            _sync()
            t0 = time.perf_counter()
            again.step(int(nxt[0, 4]))
            _sync()
            res[f"{name}_graph_first_step_ms"] = 1e3 * (time.perf_counter() - t0)
            del again
            res[f"{name}_graph_vs_eager_max_abs_logit_diff"] = diff
            g = [4]

            def graph_step(decoder=decoder, g=g) -> None:
                decoder.step(int(nxt[0, g[0] % 8]))
                g[0] += 1

            res[f"{name}_graph_ms"] = Timer.wall(graph_step, args.steps)
            del hw, ref, decoder
    res["plan_a_kernel_vs_reference_max_abs_logit_diff"] = (logits["plan_a_kernel"] - logits["plan_a_reference"]).abs().max().item()
    res["page_topk_kernel_vs_reference_max_abs_logit_diff"] = (
        logits["page_topk_kernel"] - logits["page_topk_reference"]).abs().max().item()
    res["dense_kernel_vs_reference_max_abs_logit_diff"] = (
        logits["headwise_dense_kernel"] - logits["headwise_dense_reference"]).abs().max().item()

    # PyTorch SDPA on one layer's decode shapes: the same cache length every call, or one more token each call
    # (as in decode), to see what a new length costs it.
    q = torch.randn(1, 32, 1, 128, device=dev, dtype=model.dtype)
    kv = torch.randn(2, 1, 8, args.context + 4 * args.steps, 128, device=dev, dtype=model.dtype)
    n = [args.context]

    def sdpa(grow: bool) -> None:
        torch.nn.functional.scaled_dot_product_attention(q, kv[0, :, :, : n[0]], kv[1, :, :, : n[0]], enable_gqa=True)
        n[0] += 1 if grow else 0

    sdpa(False)
    res["sdpa_one_layer_same_length_ms"] = Timer.wall(lambda: sdpa(False), args.steps)
    res["sdpa_one_layer_growing_length_ms"] = Timer.wall(lambda: sdpa(True), args.steps)
    print(json.dumps(res, indent=1))
    write_result(result_doc("PYTHONPATH=src python3 " + " ".join(sys.argv), res), args.out)


if __name__ == "__main__":
    main()
