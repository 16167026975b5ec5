"""Attention recall: the share of a head's dense attention mass that a sparse pattern keeps.

For each query row, softmax attention over all causal keys (the dense head); recall is the probability mass
that falls on the keys the pattern allows, averaged over rows (and batch), one number per query head. 1.0
means the pattern loses nothing; MInference's offline pattern search maximises this at equal cost.
Processed ``chunk`` query rows at a time, so memory is ``O(chunk * S)`` per head rather than ``O(L * S)``.
"""

from __future__ import annotations

import torch

from headwise.kernels.prefill_index import expand_index_heads, indices_to_mask


def attention_recall(
    q: torch.Tensor,
    k: torch.Tensor,
    allowed: torch.Tensor | tuple[torch.Tensor, torch.Tensor, int],
    scale: float | None = None,
    q_offset: int | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """Share of dense causal attention mass on allowed keys, per query head: fp32 ``[Hq]``.

    q: [B, Hq, L, D] at positions ``q_offset .. q_offset+L-1`` (default: the last L of the keys); k: [B, Hkv, S, D].
    ``allowed`` is a bool mask ``[L, S]``, ``[Hi, L, S]`` or ``[Bi, Hi, L, S]`` (True = kept; Hi in {1, Hkv, Hq}),
    or a block index ``(block_idx, block_count, block_size)`` in the kernel's format. Causality is applied
    on top, so a mask need not be causal itself.
    """
    B, Hq, L, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = D**-0.5 if scale is None else scale
    q_offset = S - L if q_offset is None else q_offset
    if isinstance(allowed, torch.Tensor):
        mask = allowed
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        mask = expand_index_heads(mask, Hq, Hkv)
    kept = torch.zeros(Hq, dtype=torch.float64, device=q.device)
    kf = k.float().view(B, Hkv, 1, S, D)
    for r0 in range(0, L, chunk):
        r1 = min(L, r0 + chunk)
        if isinstance(allowed, torch.Tensor):
            m = mask[:, :, r0:r1]
        else:
            idx, count, bs = allowed
            first = (q_offset + r0) // bs - q_offset // bs
            last = (q_offset + r1 - 1) // bs - q_offset // bs
            m = indices_to_mask(idx[:, :, first : last + 1], count[:, :, first : last + 1], bs, r1 - r0, S, q_offset + r0)
            m = expand_index_heads(m, Hq, Hkv)
        qf = q[:, :, r0:r1].float().view(B, Hkv, Hq // Hkv, r1 - r0, D)
        scores = torch.matmul(qf, kf.transpose(-1, -2)).view(B, Hq, r1 - r0, S) * scale
        q_pos = torch.arange(q_offset + r0, q_offset + r1, device=q.device)
        causal = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        kept += (probs * m).sum(dim=(-1, -2)).sum(dim=0).double()
    return (kept / (B * L)).float()
