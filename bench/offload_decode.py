"""RetrievalAttention (``retrieval_offload``) at a 1M-token context on one GPU: decode tokens/s and recall.

See ``headwise.bench.offload`` for what runs and what each number means. On an H200 (16 cores, 128 GiB host memory)
the default run fills one Llama-3-8B-shaped layer with 1M tokens (4 GiB of host KV + about 6 GiB of HNSW index),
then decodes 20 steps; the 32-layer model's figures are extrapolated from the layer's.

Run: PYTHONPATH=src python bench/offload_decode.py [--tokens 1048576] [--layers 1] [--top-k 100] [--ef 256]
     [--device cuda] [--no-dense]
(last stdout line: the JSON document, also written to bench/results/offload_decode_<date>.json)
"""

from __future__ import annotations

import argparse
import json

import torch

from headwise.bench.offload import run
from headwise.bench.record import result_doc, result_path, write_result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1 << 20)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--ef", type=int, default=256)
    p.add_argument("--index", default="ivf", choices=["hnsw", "ivf", "exact"])
    p.add_argument("--probe", type=float, default=0.05)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-dense", action="store_true", help="skip the dense decode baseline (and its KV copy)")
    a = p.parse_args()
    res = run(tokens=a.tokens, layers=a.layers, steps=a.steps, top_k=a.top_k, ef=a.ef, index=a.index,
              probe=a.probe, device=a.device, dense=not a.no_dense)
    cmd = "PYTHONPATH=src python bench/offload_decode.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items() if k not in ("no_dense", "device")) + (
        " --no-dense" if a.no_dense else "")
    doc = result_doc(cmd, res, device=torch.device(a.device))
    write_result(doc, result_path("bench/results", "offload_decode"))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
