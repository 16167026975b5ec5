"""headwise's attention function, registered with transformers' ``AttentionInterface``.

transformers' attention modules project, rotate and call ``past_key_values.update`` (ours hands the chunk
through untouched), then call the registered attention function with the chunk's queries, keys and values.
Here each group of KV heads of the layer attends with its own policy over its own store, and the outputs are
put back in query-head order.

No mask function is registered for "headwise" on purpose: transformers then skips building a mask (its
documented path for backends that mask themselves) and each policy applies causality and its own pattern
from absolute positions. The cache travels as the ``headwise_cache`` keyword (or, for several sequences packed
in one forward, ``headwise_batch``), which transformers passes through to attention functions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface

from headwise.cache import HeadwiseCache
from headwise.errors import HeadwiseError
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
    if batch is not None:
        return _attend_packed(module, query, key, value, scaling, batch)
    cache = kwargs.get("headwise_cache")
    if not isinstance(cache, HeadwiseCache):
        raise HeadwiseError(
            "attention implementation 'headwise' needs a HeadwiseCache passed as headwise_cache=...; "
            "run the model through headwise.Engine"
        )
    layer = cache.layers[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    start = layer.seen
    L = query.shape[2]
    if len(layer.groups) == 1:
        g = layer.groups[0]
        ctx = _ctx(cache, layer, start, scale, g.kv_heads)
        out = g.policy.attend(query, key, value, cache._ensure_store(g), ctx)
    else:
        out = torch.empty_like(query)
        for g in layer.groups:
            ctx = _ctx(cache, layer, start, scale, g.kv_heads)
            q = query.index_select(1, g.q_index)
            k = key.index_select(1, g.kv_index)
            v = value.index_select(1, g.kv_index)
            out.index_copy_(1, g.q_index, g.policy.attend(q, k, v, cache._ensure_store(g), ctx))
    layer.seen = start + L
    return out.transpose(1, 2).contiguous(), None


@dataclass
class PackedBatch:
    """Chunks of several sequences packed along the token axis of one ``[1, T]`` forward (``Engine.step``).

    Segment ``i`` is tokens ``starts[i] .. starts[i] + lengths[i] - 1`` of the packed row and belongs to the
    sequence whose batch-1 cache is ``caches[i]``: a prompt chunk, or one decode token. Projections, MLPs and
    the LM head run once over the packed row; attention runs segment by segment, each over its own cache,
    because every sequence's cache holds its own per-head lengths.
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
    outs = [
        headwise_attention(module, query[:, :, s : s + n], key[:, :, s : s + n], value[:, :, s : s + n], None,
                           scaling, headwise_cache=c)[0]
        for c, s, n in zip(batch.caches, batch.starts, batch.lengths)
    ]
    return torch.cat(outs, dim=1), None


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
