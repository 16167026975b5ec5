"""Which approximate-nearest-neighbour library the ``retrieval_offload`` policy uses: faiss-cpu, hnswlib or usearch,
measured on real attention keys and queries (CPU).

SmolLM2-135M reads 8192 tokens of Shakespeare; the keys of KV heads of layers 5, 15 and 25 (rotated, as the cache
holds them) are indexed by maximum inner product, one index per KV head (8192 keys, head_dim 64); the queries of the
last 256 positions (each query head against its KV head's index) ask for their top 100 keys. Queries and keys come
from different distributions (RetrievalAttention's point), so recall is measured against the exact top-100 by
``q . k``, at several search widths (HNSW ``ef``). Per library: build seconds per 1,000 keys, microseconds per query
(one query at a time, as a decode step asks; one thread), recall@100. Each library's HNSW at M=32, ef_construction=128;
and faiss's inverted file (``IndexIVFFlat``, ``4 sqrt(n)`` lists from k-means, inner product), at several shares of
the lists scanned (``nprobe / nlist``), which builds in a fraction of HNSW's time.

Run: PYTHONPATH=src python bench/ann_choice.py   (needs faiss-cpu, hnswlib and usearch; last stdout line: the JSON
document, also written to bench/results/ann_choice_<date>.json)
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface

from headwise.bench.record import result_doc, result_path, write_result
from headwise.data import shakespeare
from headwise.models import load_model
from headwise.profile.probe import probe_attention

LAYERS, TOKENS, QUERIES, TOP, M, EF_BUILD = (5, 15, 25), 8192, 256, 100, 32, 128
EFS = (64, 128, 256, 512)
PROBES = (0.01, 0.02, 0.05, 0.1)  # faiss IVF: share of the lists scanned (nlist = 4 sqrt(n))
torch.set_num_threads(1)
captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def capture(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Any, **kw: Any):
    if module.layer_idx in LAYERS:
        captured[module.layer_idx] = (query[0].detach().clone(), key[0].detach().clone())
    # headwise's probe attention builds the layer's own mask: transformers builds none for a name it does not know
    return probe_attention(module, query, key, value, None, **kw)


def build(lib: str, keys: np.ndarray) -> Any:
    n, d = keys.shape
    if lib == "faiss-ivf":
        import faiss

        faiss.omp_set_num_threads(1)
        nlist = int(4 * n**0.5)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(keys)
        index.add(keys)
        return index
    if lib == "faiss":
        import faiss

        faiss.omp_set_num_threads(1)
        index = faiss.IndexHNSWFlat(d, M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = EF_BUILD
        index.add(keys)
        return index
    if lib == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=d)
        index.init_index(max_elements=n, M=M, ef_construction=EF_BUILD)
        index.add_items(keys, num_threads=1)
        return index
    from usearch.index import Index

    index = Index(ndim=d, metric="ip", dtype="f32", connectivity=M, expansion_add=EF_BUILD)
    index.add(np.arange(n), keys, threads=1)
    return index


def search(lib: str, index: Any, q: np.ndarray, ef: float) -> np.ndarray:
    if lib == "faiss-ivf":
        index.nprobe = max(1, round(ef * index.nlist))
        return index.search(q[None], TOP)[1][0]
    if lib == "faiss":
        index.hnsw.efSearch = ef
        return index.search(q[None], TOP)[1][0]
    if lib == "hnswlib":
        index.set_ef(ef)
        return index.knn_query(q[None], k=TOP, num_threads=1)[0][0]
    index.expansion_search = ef
    return index.search(q, TOP, threads=1).keys


def main() -> None:
    lm = load_model("smollm2-135m", device="cpu")
    ids = lm.tokenizer(shakespeare(60_000), return_tensors="pt").input_ids[:, :TOKENS]
    AttentionInterface.register("capture", capture)
    lm.model.config._attn_implementation = "capture"
    with torch.inference_mode():
        lm.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    group = lm.spec.group_size
    rows: dict[str, Any] = {}
    for lib in ("faiss", "hnswlib", "usearch", "faiss-ivf"):
        widths = PROBES if lib == "faiss-ivf" else EFS
        build_s, per_ef = 0.0, {ef: {"us": 0.0, "hits": 0, "n": 0} for ef in widths}
        for layer in LAYERS:
            q_all, k_all = captured[layer]
            for h in range(k_all.shape[0]):
                keys = np.ascontiguousarray(k_all[h].float().numpy())
                t0 = time.perf_counter()
                index = build(lib, keys)
                build_s += time.perf_counter() - t0
                qs = q_all[h * group : (h + 1) * group, -QUERIES:].reshape(-1, keys.shape[1]).float().numpy()
                exact = np.argsort(-(qs @ keys.T), axis=1)[:, :TOP]
                for ef in widths:
                    t0 = time.perf_counter()
                    got = [search(lib, index, np.ascontiguousarray(q), ef) for q in qs]
                    per_ef[ef]["us"] += (time.perf_counter() - t0) * 1e6
                    per_ef[ef]["hits"] += sum(len(set(map(int, g)) & set(map(int, e))) for g, e in zip(got, exact))
                    per_ef[ef]["n"] += len(qs)
        heads = len(LAYERS) * lm.spec.num_kv_heads
        rows[lib] = {
            "build_s_per_1k_keys": round(build_s / (heads * TOKENS / 1000), 5),
            "search": {str(ef): {"us_per_query": round(v["us"] / v["n"], 1),
                                 f"recall@{TOP}": round(v["hits"] / (v["n"] * TOP), 4)} for ef, v in per_ef.items()},
        }
        print(lib, json.dumps(rows[lib]), flush=True)
    import importlib.metadata as md

    setup = {"model": "smollm2-135m", "layers": list(LAYERS), "keys_per_index": TOKENS, "queries_per_head":
             QUERIES * group, "top": TOP, "M": M, "ef_construction": EF_BUILD, "threads": 1,
             "versions": {p: md.version(p) for p in ("faiss-cpu", "hnswlib", "usearch")}}
    doc = result_doc("PYTHONPATH=src python bench/ann_choice.py", {"setup": setup, "libraries": rows}, device="cpu")
    write_result(doc, result_path("bench/results", "ann_choice"))
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
