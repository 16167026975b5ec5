"""Decode over a selected subset of a head's cache: shared by ``page_topk``, ``tidal`` and ``recycled``.

A selection is a table ``[batch, kv_heads, n]`` of page indices (pages of ``page_size`` slots; with
``page_size=1`` the entries are token positions) into a ``DenseStore``'s keys and values; entries < 0 are
padding. The reference path turns it into a boolean mask over the stored tokens and runs masked SDPA; the
kernel path (``ctx.use_kernels``) hands the table to ``kernels/paged_decode.py``, which reads only the listed
pages inside the kernel.
"""

from __future__ import annotations

import torch

from headwise.kernels.decode_reference import page_mask
from headwise.policies.base import AttendContext, kernel_decode, masked_attention
from headwise.policies.stores import DenseStore


def attend_selected(
    q: torch.Tensor, store: DenseStore, table: torch.Tensor, page_size: int, ctx: AttendContext
) -> torch.Tensor:
    """One decode query ``q: [B, Hq, 1, D]`` over the selected pages of ``store`` (the new token already
    committed). Returns ``[B, Hq, 1, D]``."""
    keys, values = store.view()
    if ctx.use_kernels:
        assert store.keys is not None and store.values is not None
        return kernel_decode(q, store.keys, store.values, store.length, ctx.scale, table, page_size)
    group = q.shape[1] // keys.shape[1]
    mask = page_mask(table, store.length, page_size).repeat_interleave(group, dim=1).unsqueeze(2)
    return masked_attention(q, keys, values, mask, ctx.scale)


def group_attention_mass(q: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention probabilities of one decode query, summed over the query heads of each KV head.

    q: [B, Hq, 1, D]; keys: [B, Hkv, S, D]. Returns fp32 [B, Hkv, S] (each row sums to the group size).
    Used to pick token positions per KV head (the cache, and the kernel's table, are per KV head).
    """
    B, Hq, _, D = q.shape
    Hkv = keys.shape[1]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    logits = torch.einsum("bhgd,bhsd->bhgs", qg, keys.float()) * scale
    return torch.softmax(logits, dim=-1).sum(dim=2)
