"""headwise's attention function, registered with transformers' ``AttentionInterface``.

transformers' attention modules project, rotate and call ``past_key_values.update`` (ours hands the chunk
through untouched), then call the registered attention function with the chunk's queries, keys and values.
Here each group of KV heads of the layer attends with its own policy over its own store, and the outputs are
put back in query-head order.

No mask function is registered for "headwise" on purpose: transformers then skips building a mask (its
documented path for backends that mask themselves) and each policy applies causality and its own pattern
from absolute positions. The cache travels as the ``headwise_cache`` keyword (or, for several sequences packed
in one forward, ``headwise_batch``: a ``PackedBatch``, or the static buffers of a decode step at a padded batch
size, ``batch_graphs.PaddedBatch``), which transformers passes through to attention functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from headwise.batch_graphs import PaddedBatch
from headwise.cache import HeadwiseCache
from headwise.errors import HeadwiseError
from headwise.kernels.common import INTERPRET
from headwise.paged_cache import PagedDenseStore, PagedRingStore, PoolDecodeRow, PoolPrefillRow, PoolRows
from headwise.policies import AttendContext

ATTN_NAME = "headwise"


def headwise_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [B, Hq, L, D]; key, value: [B, Hkv, L, D] (this chunk only). Returns ([B, L, Hq, D], None)."""
    batch = kwargs.get("headwise_batch")
    if isinstance(batch, PaddedBatch):  # a decode step at a padded batch size (``batch_graphs.py``)
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        return batch.attend(module.layer_idx, query, key, value, scale).transpose(1, 2).contiguous(), None
    if batch is not None:
        return _attend_packed(module, query, key, value, scaling, batch)
    cache = kwargs.get("headwise_cache")
    if not isinstance(cache, HeadwiseCache):
        raise HeadwiseError(
            "attention implementation 'headwise' needs a HeadwiseCache passed as headwise_cache=...; "
            "run the model through headwise.Engine"
        )
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = PoolRows()
    out = _attend_cache(cache, module.layer_idx, query, key, value, scale, 0, rows)
    rows.attend(query, key, value, out, scale, cache.use_kernels)
    return out.transpose(1, 2).contiguous(), None


def _attend_cache(cache: HeadwiseCache, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  scale: float, token0: int, rows: PoolRows, out: torch.Tensor | None = None) -> torch.Tensor:
    """One cache's chunk, group by group: query [B, Hq, L, D]; key, value [B, Hkv, L, D]. Returns [B, Hq, L, D]:
    ``out`` when given (a view of a packed forward's output, written in place: a decode token whose groups are all in
    the pool then costs no copy here), else a new tensor.
    A one-token chunk of a group whose KV is in the page pool is left to ``decode_over_pool``, and with kernels on a
    prompt chunk of such a group whose policy prefills densely to ``prefill_over_pool`` (its keys and values written
    into its pages here): appended to ``rows`` (at token ``token0`` of the forward), their output heads filled in by
    ``rows.attend``."""
    layer = cache.layers[layer_idx]
    start = layer.seen
    L = query.shape[2]
    # The paged prefill kernel is Triton: CUDA tensors, or CPU ones under the interpreter (tests).
    prefill_kernel = L > 1 and cache.use_kernels and cache.paged_prefill and (query.is_cuda or INTERPRET)
    paged = [(L == 1 and isinstance(store, PagedDenseStore | PagedRingStore))
             or (prefill_kernel and isinstance(store, PagedDenseStore) and g.policy.dense_prefill)
             for g, store in ((g, cache._ensure_store(g)) for g in layer.groups)]
    if len(layer.groups) == 1 and not paged[0]:
        g = layer.groups[0]
        ctx = _ctx(cache, layer, start, scale, g.kv_heads)
        res = g.policy.attend(query, key, value, cache._ensure_store(g), ctx)
        if out is None:
            out = res
        else:
            out.copy_(res)
    else:
        if out is None:
            out = torch.empty_like(query)
        for g, pooled in zip(layer.groups, paged):
            store = cache._ensure_store(g)
            if pooled and L == 1:
                assert isinstance(store, PagedDenseStore | PagedRingStore) and query.shape[0] == 1
                rows.decode.append(PoolDecodeRow(store, tuple(g.kv_heads), token0))
                continue
            if pooled:
                assert isinstance(store, PagedDenseStore) and query.shape[0] == 1 and store.length == start
                store.append(g.heads_of(key), g.heads_of(value))
                rows.prefill.append(PoolPrefillRow(store, g.kv_heads, token0, L, start))
                continue
            ctx = _ctx(cache, layer, start, scale, g.kv_heads)
            G = query.shape[1] // key.shape[1]
            # consecutive heads are views (a profiled or split plan often groups them so), others gathered
            res = g.policy.attend(g.heads_of(query, G), g.heads_of(key), g.heads_of(value), store, ctx)
            g.write_heads(out, res)
    layer.seen = start + L
    return out


@dataclass
class PackedBatch:
    """Chunks of several sequences packed along the token axis of one ``[1, T]`` forward (``Engine.step``).

    Segment ``i`` is tokens ``starts[i] .. starts[i] + lengths[i] - 1`` of the packed row and belongs to the
    sequence whose batch-1 cache is ``caches[i]``: a prompt chunk, or one decode token. Projections, MLPs and
    the LM head run once over the packed row; attention runs segment by segment, each over its own cache,
    because every sequence's cache holds its own per-head lengths, except for the groups whose KV is in the engine's
    page pool: the decode tokens of every segment are attended together (``decode_over_pool``), and so, with
    kernels on, are the prompt chunks of the groups that prefill densely (``prefill_over_pool``).
    """

    caches: list[HeadwiseCache]
    starts: list[int]
    lengths: list[int]


def _attend_packed(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    batch: PackedBatch,
) -> tuple[torch.Tensor, None]:
    """query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (the packed row). Returns ([1, T, Hq, D], None)."""
    if query.shape[0] != 1 or sum(batch.lengths) != query.shape[2]:
        raise HeadwiseError(f"a packed batch of {sum(batch.lengths)} tokens in {len(batch.caches)} segments does not "
                            f"match the forward's {query.shape[2]} tokens in {query.shape[0]} rows")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.empty_like(query)
    rows = PoolRows()
    for c, s, n in zip(batch.caches, batch.starts, batch.lengths):
        if n == 1 and _pool_decode(c, module.layer_idx, s, rows):
            continue
        _attend_cache(c, module.layer_idx, query[:, :, s : s + n], key[:, :, s : s + n], value[:, :, s : s + n],
                      scale, s, rows, out=out[:, :, s : s + n])
    rows.attend(query, key, value, out, scale, batch.caches[0].use_kernels)
    return out.transpose(1, 2).contiguous(), None


def _pool_decode(cache: HeadwiseCache, layer_idx: int, token: int, rows: PoolRows) -> bool:
    """A decode token (at ``token`` of the forward) of a cache whose groups of this layer all keep their KV in the page
    pool: its rows for ``decode_over_pool``, as ``_attend_cache`` adds them, without slicing the forward's tensors
    for it (four views per sequence in every layer, unused). False, and nothing done, for any other cache."""
    layer = cache.layers[layer_idx]
    stores = [cache._ensure_store(g) for g in layer.groups]
    paged = [store for store in stores if isinstance(store, PagedDenseStore | PagedRingStore)]
    if len(paged) < len(stores):
        return False
    rows.decode.extend(PoolDecodeRow(store, tuple(g.kv_heads), token) for g, store in zip(layer.groups, paged))
    layer.seen += 1
    return True


def _ctx(cache: HeadwiseCache, layer: Any, start: int, scale: float, kv_heads: list[int]) -> AttendContext:
    return AttendContext(
        start=start,
        scale=scale,
        layer_idx=layer.layer_idx,
        native_window=layer.native_window,
        shared=cache.shared,
        step=cache.decode_step,
        use_kernels=cache.use_kernels,
        kv_heads=tuple(kv_heads),
        position=cache.position,
        gate=None if cache.gates is None else cache.gates.layer(layer.layer_idx),
        rope=cache.rope(layer.layer_idx),
    )


AttentionInterface.register(ATTN_NAME, headwise_attention)


@contextmanager
def attention_implementation(model: torch.nn.Module, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` inside the block; restored in ``finally``."""
    configs = [m.config for m in model.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, s in zip(configs, saved):
            c._attn_implementation = s
