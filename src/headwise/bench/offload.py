"""RetrievalAttention past GPU memory: decode over a Llama-3-8B-shaped attention stack whose KV lives on the host.

Regime: batch-1 decode at a context too long for the GPU's KV budget. Llama-3-8B's attention (32 query heads, 8 KV
heads, head_dim 128, bf16) holds 128 KiB of KV per token over its 32 layers: 128 GiB at 1M tokens, eight times a
16 GB budget. Under ``retrieval_offload`` the device keeps ``sink + window`` tokens per head (84 MB for 32 layers at
the defaults) and every other token is on the host behind the index.

What runs: ``layers`` attention layers of that shape (synthetic KV: keys ``mu + z A + 0.3 N(0, 1)`` with a per-head
shared direction ``mu`` and ``z`` of ``rank`` dimensions, since attention keys share a direction and have a low
intrinsic dimension; values ``N(0, 1)``) are filled with ``tokens`` tokens through the policy's own store (host copy +
index build, timed), then ``steps`` decode steps run through ``RetrievalOffload.attend`` (kernels on with CUDA), each
query head's query aimed at one random host key (``q = k_j - mu + 0.3 N(0, 1)``). Synthetic data: how an index
does on real keys and queries is ``bench/ann_choice.py``'s measurement. Per step, timed with device syncs: the stack's seconds; the 32-layer model's
tokens/s is extrapolated as ``1 / (32 * seconds per layer)`` (attention only: no MLP, no projections). Not timed,
per step and query head: recall of the retrieved set against the exact top-``top_k`` by ``q . k`` over the host
keys, and the share of dense attention's mass (softmax over every token) that the static set + retrieved tokens
hold. With ``dense=True`` the same steps by dense decode over the whole KV on the device, where it fits.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from headwise.policies.base import AttendContext, decode_sdpa
from headwise.policies.retrieval_offload import RetrievalOffload

LLAMA3_8B = {"layers_total": 32, "q_heads": 32, "kv_heads": 8, "head_dim": 128}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(tokens: int = 1 << 20, layers: int = 1, q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
        steps: int = 20, sink: int = 128, window: int = 512, top_k: int = 100, ef: int = 256, index: str = "ivf",
        device: str = "cuda", dtype: torch.dtype = torch.bfloat16, fill_chunk: int = 65536, dense: bool = True,
        layers_total: int = 32, rank: int = 16, probe: float = 0.05, seed: int = 0) -> dict[str, Any]:
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(seed)
    policy = RetrievalOffload(sink=sink, window=window, top_k=top_k, index=index, ef=ef, probe=probe)
    policy.validate()
    group, scale = q_heads // kv_heads, head_dim ** -0.5
    use_kernels = dev.type == "cuda"
    stores, mus, full_k, full_v = [], [], [], []
    t0 = time.perf_counter()
    for _ in range(layers):
        store = policy.make_store(1, kv_heads, head_dim, dev, dtype)
        store.reserve(tokens + steps)
        mu = 2.0 * torch.randn(1, kv_heads, 1, head_dim, device=dev, generator=g)
        basis = torch.randn(1, kv_heads, rank, head_dim, device=dev, generator=g) / rank**0.5
        ks, vs = [], []
        for a in range(0, tokens, fill_chunk):
            n = min(fill_chunk, tokens - a)
            z = torch.randn(1, kv_heads, n, rank, device=dev, generator=g)
            k = (mu + z @ basis + 0.3 * torch.randn(1, kv_heads, n, head_dim, device=dev, generator=g)).to(dtype)
            v = torch.randn(1, kv_heads, n, head_dim, device=dev, generator=g).to(dtype)
            store.append(k, v)
            if dense:
                ks.append(k)
                vs.append(v)
        stores.append(store)
        mus.append(mu)
        full_k.append(torch.cat(ks, dim=2) if dense else None)
        full_v.append(torch.cat(vs, dim=2) if dense else None)
    _sync(dev)
    fill_s = time.perf_counter() - t0

    step_s, dense_s, recalls, masses = [], [], [], []
    for _ in range(steps):
        inputs = []
        for i, store in enumerate(stores):
            n_host = store.host_length
            picks = store.host_k[0][torch.arange(kv_heads)[:, None], torch.randint(0, n_host, (kv_heads, group))]
            aim = picks.float().to(dev) - mus[i][0]  # [kv_heads, group, D]
            q = (aim.reshape(1, q_heads, 1, head_dim) + 0.3 * torch.randn(1, q_heads, 1, head_dim, device=dev, generator=g))
            k = (mus[i] + 0.3 * torch.randn(1, kv_heads, 1, head_dim, device=dev, generator=g)).to(dtype)
            v = torch.randn(1, kv_heads, 1, head_dim, device=dev, generator=g).to(dtype)
            inputs.append((q.to(dtype), k, v))
        _sync(dev)
        t0 = time.perf_counter()
        for store, (q, k, v) in zip(stores, inputs):
            ctx = AttendContext(start=store.tokens, scale=scale, use_kernels=use_kernels)
            policy.attend(q, k, v, store, ctx)
        _sync(dev)
        step_s.append(time.perf_counter() - t0)
        for i, (store, (q, k, v)) in enumerate(zip(stores, inputs)):
            if dense:
                full_k[i] = torch.cat([full_k[i], k], dim=2)
                full_v[i] = torch.cat([full_v[i], v], dim=2)
            recall, mass = _recall(policy, store, q, full_k[i], scale)
            recalls.append(recall)
            masses.append(mass)
        if dense:
            _sync(dev)
            t0 = time.perf_counter()
            for i, (q, _, _) in enumerate(inputs):
                decode_sdpa(q, full_k[i], full_v[i], scale)
            _sync(dev)
            dense_s.append(time.perf_counter() - t0)

    warm = step_s[1:] or step_s  # the first step compiles kernels
    per_layer = sum(warm) / len(warm) / layers
    device_bytes = sum(t.numel() * t.element_size() for t in stores[0].tensors())
    out: dict[str, Any] = {
        "setup": {"tokens": tokens, "layers_run": layers, "layers_total": layers_total, "q_heads": q_heads,
                  "kv_heads": kv_heads, "head_dim": head_dim, "dtype": str(dtype).removeprefix("torch."),
                  "policy": policy.to_spec(), "steps": steps, "device": str(dev)},
        "fill_s": round(fill_s, 2),
        "fill_us_per_key": round(1e6 * fill_s / (layers * kv_heads * tokens), 3),
        "decode_ms_per_layer": round(1e3 * per_layer, 3),
        "decode_tokens_per_s_model": round(1 / (layers_total * per_layer), 3),
        "recall_at_top_k": round(sum(recalls) / len(recalls), 4),
        "attention_mass_kept": round(sum(masses) / len(masses), 4),
        "device_kv_bytes_model": device_bytes * layers_total,
        "host_kv_bytes_model": stores[0].host_bytes() * layers_total,
        "dense_kv_bytes_model": 2 * layers_total * kv_heads * (tokens + steps) * head_dim * torch.finfo(dtype).bits // 8,
    }
    if dense_s:
        warm_d = dense_s[1:] or dense_s
        out["dense_decode_ms_per_layer"] = round(1e3 * sum(warm_d) / len(warm_d) / layers, 3)
    return out


def _recall(policy: RetrievalOffload, store: Any, q: torch.Tensor, keys: torch.Tensor | None,
            scale: float) -> tuple[float, float]:
    """One decode step's recall of the retrieved set against the exact top-k over the host keys, and the share of
    dense attention mass (softmax over every token) on the static set + retrieved tokens, both means over query
    heads. ``keys``: every key on the device in position order (None: the host keys are copied to the device)."""
    n_host, sink = store.host_length, policy.sink
    k = min(policy.top_k, n_host)
    got = store.search(q[:, :, 0].float().cpu(), k)[0]  # [Hq, k] host slots
    group = q.shape[1] // store.heads
    host = keys[0, :, sink : sink + n_host] if keys is not None else store.host_k[0, :, :n_host].to(q.device)
    ring, valid = store.ring.keys[0], store.ring.slot_pos >= 0
    hits, mass = 0, 0.0
    for h in range(q.shape[1]):
        qh = q[0, h, 0].float()
        host_logits = host[h // group].float() @ qh * scale
        static_logits = (ring[h // group][valid].float() @ qh) * scale
        exact = set(host_logits.topk(k).indices.tolist())
        ids = torch.tensor([i for i in got[h].tolist() if i >= 0], dtype=torch.long, device=q.device)
        hits += len(exact & set(ids.tolist()))
        total = torch.logsumexp(torch.cat([host_logits, static_logits]), dim=0)
        kept = torch.logsumexp(torch.cat([host_logits[ids], static_logits]), dim=0)
        mass += float(torch.exp(kept - total))
    return hits / (q.shape[1] * k), mass / q.shape[1]
