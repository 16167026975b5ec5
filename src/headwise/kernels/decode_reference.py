"""Plain-PyTorch references of the decode kernels (no Triton): what ``paged_decode`` and ``quest`` compute.

They are also the CPU paths of the policies: ``page_mask`` is the one builder of a selection's visible slots
(``policies/selection.py``), ``quest_page_scores_reference`` the one CPU Quest score (``policies/page_topk.py``).
"""

from __future__ import annotations

import torch


def page_mask(table: torch.Tensor, length: int, page_size: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """The slots a page table lets a query see: table ``[B, Hkv, n]`` of page indices (entries < 0, and with
    ``counts: [B, Hkv]`` entries at or past ``counts``, are padding) -> bool ``[B, Hkv, length]``."""
    B, H, n = table.shape
    n_pages = -(-length // page_size)
    listed = table.long()
    keep = listed >= 0
    if counts is not None:
        keep &= torch.arange(n, device=table.device) < counts[..., None].long()
    chosen = torch.zeros(B, H, n_pages + 1, dtype=torch.bool, device=table.device)
    chosen.scatter_(2, torch.where(keep, listed, n_pages), True)  # padding lands in a spare column
    slot_page = torch.arange(length, device=table.device) // page_size
    return chosen[:, :, slot_page]


def sparse_decode_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    page_table: torch.Tensor | None = None,
    counts: torch.Tensor | None = None,
    page_size: int = 16,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``sparse_decode``: a boolean mask of the listed pages' slots, then masked softmax.

    Products in the inputs' dtype, softmax in fp32, probabilities rounded to the dtype before ``@ V`` (as
    flash-attention's ``attention_ref``); pass fp32 tensors for an fp32 reference. Shapes as ``sparse_decode``:
    q ``[B, Hq, D]``, k, v ``[B, Hkv, S_cap, D]``; returns ``[B, Hq, D]``.
    """
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    scale = D**-0.5 if scale is None else scale
    keys, values = k[:, :, :length], v[:, :, :length]
    if page_table is None:
        visible = torch.ones(B, Hkv, length, dtype=torch.bool, device=q.device)
    else:
        visible = page_mask(page_table, length, page_size, counts)
    group = Hq // Hkv
    kx = keys.repeat_interleave(group, dim=1)
    vx = values.repeat_interleave(group, dim=1)
    logits = torch.einsum("bhd,bhsd->bhs", q, kx).float() * scale
    logits = logits.masked_fill(~visible.repeat_interleave(group, dim=1), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a head with no page: all -inf -> zero output
    return torch.einsum("bhs,bhsd->bhd", probs.to(v.dtype), vx)


def top_pages_reference(scores: torch.Tensor, budget_pages: int) -> torch.Tensor:
    """Plain PyTorch selection of ``topk_sparse_decode`` / ``select_pages(use_kernel=True)``: the top
    ``min(budget_pages, P)`` pages per row, ties to the lower index, in ascending page order (int64)."""
    n_keep = max(1, min(int(budget_pages), scores.shape[-1]))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :n_keep].sort(dim=-1).values


def quest_page_scores_reference(
    q: torch.Tensor, bounds: torch.Tensor, n_pages: int, keep_ends: bool = True, scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest page scores in fp32, summed over each KV head's query heads (plain PyTorch ``quest_page_scores``).

    q: [B, Hq, D]; bounds: [B, Hkv, page_cap, 2, D] (min, max key per page; 8-bit codes with ``scales``
    [B, Hkv, page_cap, 2]), first ``n_pages`` used. Returns [B, Hkv, n_pages]; with ``keep_ends`` the first and
    newest page score +inf. ``relu(q) . max + min(q, 0) . min`` equals ``sum_d max(q_d min_d, q_d max_d)``
    (min <= max), and summing over the group first makes it one matrix-vector product per KV head.
    """
    B, Hq, D = q.shape
    Hkv = bounds.shape[1]
    bounds = bounds[:, :, :n_pages].float()
    if scales is not None:
        bounds = bounds * scales[:, :, :n_pages, :, None]
    qg = q.float().view(B, Hkv, Hq // Hkv, D)
    scores = torch.einsum("bhpd,bhd->bhp", bounds[:, :, :, 1], qg.clamp(min=0).sum(dim=2))
    scores += torch.einsum("bhpd,bhd->bhp", bounds[:, :, :, 0], qg.clamp(max=0).sum(dim=2))
    if keep_ends:
        scores[:, :, 0] = float("inf")
        scores[:, :, n_pages - 1] = float("inf")
    return scores


def batch_decode_reference(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    table: torch.Tensor,
    lengths: torch.Tensor,
    page_size: int,
    *,
    ring: int = 0,
    selected: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Plain PyTorch ``batch_decode``, row by row: gather the row's attended slots from its pages, then softmax.

    Products in the inputs' dtype, softmax in fp32 (pass fp32 tensors for an fp32 reference). Shapes as
    ``batch_decode``; a row with nothing to attend gets zeros."""
    B, Hq, D = q.shape
    H = table.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.zeros_like(q)
    for b in range(B):
        n = int(lengths[b])
        if ring:
            n = min(n, ring)
        for h in range(H):
            pages = torch.arange(-(-n // page_size)) if selected is None else selected[b, h].long().cpu()
            pages = pages[(pages >= 0) & (pages * page_size < n)]
            slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
            slots = slots[slots < n].to(q.device)
            if slots.numel() == 0:
                continue
            phys, within = table[b, h].long()[slots // page_size], slots % page_size
            keys, values = k_pool[phys, within], v_pool[phys, within]  # [m, D]
            qh = q[b, h * (Hq // H) : (h + 1) * (Hq // H)]  # the group's query heads
            probs = torch.softmax((qh @ keys.T).float() * scale, dim=-1)
            out[b, h * (Hq // H) : (h + 1) * (Hq // H)] = (probs.to(values.dtype) @ values).to(q.dtype)
    return out
