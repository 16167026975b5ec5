"""Diagnostic: which of the tokens dense attends at the answer does RetrievalAttention's index return, per search.

Needle prompts (the answer teacher-forced) run dense through headwise's probe attention, which builds each layer's mask
(Gemma 3's sliding layers keep their window) and hands a probe every layer's rotated queries and keys. For each global
layer, query head and query predicting an answer token, the *host* keys are those ``retrieval_offload`` would hold in
host memory there (positions ``sink .. p - window``); the indexes are built as the policy builds them (the policy's own
index classes, keys added in prefill chunks of 512) and searched with the query for ``top_k``. Reported per search:

- *recall@k*: the share of the exact top-``k`` host keys (by ``q . k``) the search returns;
- *needle mass kept*: of the attention dense gives the needle sentence's host tokens, the share on returned tokens;
- *copies kept*: of the (layer, query head, answer query) triples that put more than ``COPY_MASS`` of dense's attention
  on the needle, the share whose returned set holds more than half of it; and the answer tokens whose every copying
  triple is kept;
- its cost on one thread: microseconds per query (a query head's answer queries searched together, as a decode step
  searches a group's) and build seconds per 1,000 keys (the QueryRouted prototype's are not timed).

    PYTHONPATH=src python bench/experiments/offload_recall.py OUT.json --model gemma3-270m --length 8192 --per-depth 1

A diagnostic of the search on prompts within the trained length (dense's attention is the reference), not an accuracy.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from typing import Any

import numpy as np
import torch

from headwise.bench.record import result_doc, write_result
from headwise.eval.tasks import make_sample
from headwise.models import load_model
from headwise.policies.retrieval_offload import ExactIndex, HnswIndex, IvfIndex
from headwise.profile.probe import QKProbe, probing

COPY_MASS = 0.3
PREFILL_CHUNK = 512


class QueryRouted:
    """A query-aware inverted file (a prototype, not a policy's index): lists made from the prefill's queries, as
    RetrievalAttention's index uses them to bridge queries and keys, which come from different distributions.
    k-means over the (normalised) prefill queries; list ``j`` holds the exact top-``m`` host keys of each query of
    cluster ``j``, and a key no query ranks so joins the list whose mean query scores it highest. A search routes
    the query to its nearest ``probe`` share of query centroids and scans their lists exactly. ``scanned``: the
    share of the host keys each search scored."""

    def __init__(self, keys: np.ndarray, queries: np.ndarray, probe: float, m: int):
        import faiss

        n, d = keys.shape
        self.keys, self.probe = keys, probe
        nlist = max(1, min(int(4 * n**0.5), len(queries) // 39))
        unit = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        km = faiss.Kmeans(d, nlist, niter=20, seed=0, spherical=True)
        km.train(np.ascontiguousarray(unit, dtype=np.float32))
        self.centroids = km.centroids
        assign = km.index.search(np.ascontiguousarray(unit, dtype=np.float32), 1)[1][:, 0]
        members: list[set[int]] = [set() for _ in range(nlist)]
        for a in range(0, len(queries), 2048):
            top = np.argpartition(-(queries[a : a + 2048] @ keys.T), m - 1, axis=1)[:, :m]
            for j, row in zip(assign[a : a + 2048], top):
                members[j].update(row.tolist())
        held = set().union(*members)
        mean = np.stack([queries[assign == j].mean(axis=0) if (assign == j).any() else np.zeros(d, np.float32)
                         for j in range(nlist)])
        rest = np.array(sorted(set(range(n)) - held), dtype=np.int64)
        if len(rest):
            for key, j in zip(rest, (keys[rest] @ mean.T).argmax(axis=1)):
                members[j].add(int(key))
        self.lists = [np.array(sorted(x), dtype=np.int64) for x in members]
        self.scanned: list[float] = []

    def search(self, q: np.ndarray, k: int) -> np.ndarray:
        nprobe = max(1, round(self.probe * len(self.lists)))
        route = np.argsort(-(q / np.linalg.norm(q, axis=1, keepdims=True)) @ self.centroids.T, axis=1)[:, :nprobe]
        out = np.full((len(q), k), -1, dtype=np.int64)
        for i, lists in enumerate(route):
            ids = np.unique(np.concatenate([self.lists[j] for j in lists]))
            self.scanned.append(len(ids) / len(self.keys))
            scores = self.keys[ids] @ q[i]
            top = ids[np.argsort(-scores)[:k]]
            out[i, : len(top)] = top
        return out


def searches(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, how to build it) for every search compared: the exact top-k, the inverted file at each probe share, HNSW
    at each width."""
    out: list[tuple[str, Any]] = [("exact", ExactIndex)]
    out += [(f"ivf{p:g}", lambda d, p=p: IvfIndex(d, p)) for p in (float(x) for x in args.probes.split(",") if x)]
    out += [(f"hnsw{e}", lambda d, e=e: HnswIndex(d, e)) for e in (int(x) for x in args.efs.split(",") if x)]
    return out


def query_routed(args: argparse.Namespace) -> list[str]:
    return [f"qivf{p:g}" for p in (float(x) for x in args.qr_probes.split(",") if x)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--per-depth", type=int, default=1)
    ap.add_argument("--sink", type=int, default=128)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=100)
    ap.add_argument("--probes", default="0.05,0.1,0.2,0.5", help="inverted-file shares of the lists scanned")
    ap.add_argument("--efs", default="256,1024", help="HNSW search widths")
    ap.add_argument("--qr-probes", default="", help="query-routed lists (QueryRouted): shares of the lists scanned")
    ap.add_argument("--qr-m", type=int, default=16, help="QueryRouted: host keys each prefill query puts in its list")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(1)  # searches and builds timed on one thread, as ann_choice.py times them
    lm = load_model(args.model, device="cpu", dtype=torch.float32)
    spec = lm.spec
    rec = QKProbe({i for i in range(spec.num_layers) if spec.native_window(i) is None})  # the global layers
    names = [n for n, _ in searches(args)] + query_routed(args)
    rows: list[dict[str, Any]] = []
    t0 = time.time()
    for depth in (float(d) for d in args.depths.split(",")):
        for seed in range(args.per_depth):
            sample = make_sample("needle", lm.tokenizer, args.length, depth, seed)
            full = sample.prompt + ": " + sample.answers[0]
            enc = lm.tokenizer(full, return_tensors="pt", return_offsets_mapping=True)
            ids = enc.input_ids
            first = next(i for i, (a, b) in enumerate(enc.offset_mapping[0].tolist())
                         if b > a and a >= len(full) - len(sample.answers[0]))
            answer_q = torch.arange(first - 1, ids.shape[1] - 1)  # the queries predicting the answer's tokens
            n0, n1 = sample.meta["needle_token_span"]
            host_end = int(answer_q[0]) - args.window + 1  # host tokens at the first answer query (sink .. host_end - 1)
            rec.qk.clear()
            with torch.no_grad(), probing(lm.model):
                lm.model(input_ids=ids, use_cache=False, headwise_probe=rec)
            stats = {n: {"recall": [], "mass": [], "copy": [], "build_s": 0.0, "keys": 0, "search_s": 0.0, "queries": 0}
                     for n in names}
            copying_steps = {n: torch.ones(len(answer_q), dtype=torch.bool) for n in names}
            triples = 0
            scanned: dict[str, list[float]] = {n: [] for n in query_routed(args)}
            for _layer, (q, k, scale) in sorted(rec.qk.items()):
                q, k = q[0].float(), k[0].float()
                G = q.shape[0] // k.shape[0]
                for kv in range(k.shape[0]):
                    host = k[kv, args.sink : host_end].numpy()
                    built = {}
                    for name, make in searches(args):
                        tb = time.perf_counter()
                        index = make(host.shape[1])
                        for a in range(0, len(host), PREFILL_CHUNK):
                            index.add(host[a : a + PREFILL_CHUNK])
                        stats[name]["build_s"] += time.perf_counter() - tb
                        stats[name]["keys"] += len(host)
                        built[name] = index
                    prefill_q = q[kv * G : (kv + 1) * G, : int(answer_q[0])].reshape(-1, q.shape[-1]).numpy()
                    for name in query_routed(args):
                        built[name] = QueryRouted(host, prefill_q, float(name[4:]), args.qr_m)
                    for h in range(kv * G, (kv + 1) * G):
                        qs = q[h, answer_q]  # [A, D]
                        logits = (qs @ k[kv, : ids.shape[1]].T) * scale
                        logits = logits.masked_fill(torch.arange(ids.shape[1])[None] > answer_q[:, None], -torch.inf)
                        probs = torch.softmax(logits, dim=-1)
                        needle = probs[:, n0:n1].sum(-1)  # dense attention on the needle (all host here)
                        copy = needle > COPY_MASS
                        triples += int(copy.sum())
                        for name, index in built.items():  # "exact" first: the others are measured against it
                            ts = time.perf_counter()
                            got = index.search(qs.numpy(), args.top_k)
                            stats[name]["search_s"] += time.perf_counter() - ts
                            stats[name]["queries"] += len(qs)
                            if name == "exact":
                                exact = got
                            for i in range(len(answer_q)):
                                ret = {int(t) for t in got[i] if t >= 0}
                                stats[name]["recall"].append(len(ret & {int(t) for t in exact[i]}) / args.top_k)
                                on = torch.zeros(ids.shape[1], dtype=torch.bool)
                                on[[args.sink + t for t in ret]] = True
                                kept = float(probs[i, n0:n1][on[n0:n1]].sum())
                                stats[name]["mass"].append((kept, float(needle[i])))
                                if copy[i]:
                                    held = kept > 0.5 * float(needle[i])
                                    stats[name]["copy"].append(held)
                                    copying_steps[name][i] &= held
                    for name in scanned:
                        scanned[name] += built[name].scanned
            row = {"depth": depth, "seed": seed, "tokens": ids.shape[1], "needle_span": [n0, n1],
                   "host_tokens": host_end - args.sink, "copying_triples": triples, "searches": {},
                   "scanned": {n: float(np.mean(v)) for n, v in scanned.items()}}
            for name, s in stats.items():
                row["searches"][name] = {
                    "recall": float(np.mean(s["recall"])),
                    "needle_mass_kept": sum(a for a, _ in s["mass"]) / max(1e-9, sum(b for _, b in s["mass"])),
                    "copies_kept": float(np.mean(s["copy"])) if s["copy"] else None,
                    "answer_tokens_kept": float(copying_steps[name].float().mean()),
                    "search_us_per_query": 1e6 * s["search_s"] / max(1, s["queries"]),
                    "build_s_per_1k_keys": 1e3 * s["build_s"] / s["keys"] if s["keys"] else None}
            rows.append(row)
            print(f"d{depth} s{seed} ({time.time() - t0:.0f} s): " + ", ".join(
                f"{n} r{r['recall']:.2f}/m{r['needle_mass_kept']:.2f}/a{r['answer_tokens_kept']:.2f}"
                for n, r in row["searches"].items()) + f"; scanned {row['scanned']}", flush=True)
    keys = ("recall", "needle_mass_kept", "copies_kept", "answer_tokens_kept", "search_us_per_query",
            "build_s_per_1k_keys")
    summary = {n: {key: float(np.mean(v)) if (v := [r["searches"][n][key] for r in rows
                                                     if r["searches"][n][key] is not None]) else None for key in keys}
               for n in names}
    for n in query_routed(args):
        summary[n]["scanned"] = float(np.mean([r["scanned"][n] for r in rows]))
    print(summary)
    note = (f"needle prompts of {args.length} tokens, sink {args.sink}, window {args.window}, top_k {args.top_k}: each "
            "global layer and query head at the queries predicting the answer's tokens (teacher-forced); host keys = "
            "positions sink .. (first answer query - window); indexes are retrieval_offload's own classes, keys added "
            f"in chunks of {PREFILL_CHUNK}; ivfP = inverted file scanning share P of its lists, hnswE = HNSW at search "
            f"width E; copies = (layer, head, answer query) with > {COPY_MASS} of dense attention on the needle")
    write_result(result_doc("python " + shlex.join(sys.argv), {"note": note, "summary": summary, "rows": rows},
                            torch.device("cpu")), args.out)


if __name__ == "__main__":
    main()
