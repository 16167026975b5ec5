"""``full``: exact attention over the whole context, full KV cache (retrieval heads)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.policies.base import AttendContext, PagedLayout, Policy, causal_attention, kernel_decode
from headwise.policies.stores import DenseStore


@dataclass(frozen=True)
class Full(Policy):
    """Dense causal attention; the cache keeps every token of this head."""

    name: ClassVar[str] = "full"
    graph_decode: ClassVar[bool] = True
    keeps_every_token: ClassVar[bool] = True
    dense_prefill: ClassVar[bool] = True

    def kv_tokens(self, seq_len: int) -> int:
        return seq_len

    def paged_layout(self) -> PagedLayout | None:
        return PagedLayout()

    def make_store(self, batch, heads, head_dim, device, dtype) -> DenseStore:
        return DenseStore(batch, heads, head_dim, device, dtype)

    def attend(self, q, k, v, store: DenseStore, ctx: AttendContext) -> torch.Tensor:
        if ctx.position is not None:  # a decode step for a CUDA graph: every slot, the length on the device
            store.append_at(k, v, ctx.position)
            return kernel_decode(q, store.keys, store.values, store.capacity, ctx.scale, position=ctx.position)
        store.append(k, v)
        if q.shape[2] == 1 and ctx.use_kernels:
            # A decode step on the decode kernel: flash-decoding over every stored token, the length a runtime
            # argument. (Without kernels, causal_attention -> decode_sdpa names SDPA's flash backend: left to
            # choose, SDPA re-planned at every new cache length; docs/kernels.md, "Engine decode on a GPU".)
            assert store.keys is not None and store.values is not None
            return kernel_decode(q, store.keys, store.values, store.length, ctx.scale)
        keys, values = store.view()
        return causal_attention(q, keys, values, ctx.start, ctx.scale)
