"""Prefill-pattern search for the heads that keep their full cache (MInference's offline search).

MInference 1.0 (Jiang et al., 2024, https://arxiv.org/abs/2407.02490, section 3.2): for each head, pick the
pattern (A-shape, Vertical-Slash, Block-Sparse) and budget that keeps the most attention mass at equal cost.
Here: Shakespeare of ``length`` tokens runs through the probe once; for every KV head that the budget
solver kept ``full`` on a global-attention layer, each candidate ``a_shape`` / ``vertical_slash`` /
``block_topk`` configuration is scored by attention recall (``headwise/metrics.py``, mean over the KV head's
query heads) and by its cost, the share of causal key blocks it computes (its density). The candidate with
the highest recall among those with density ``<= density`` wins; if none keeps ``min_recall`` of the mass
the head stays plain ``full``. Budgets scale with the input (MoA, https://arxiv.org/abs/2406.14909): A-shape's
local band, Vertical-Slash's column and diagonal counts and Block-Sparse's ``topk`` are fractions of the
profiled length's blocks, so the same density holds at that length.

Why only the full heads: a prefill pattern attends over the whole prefix, so its decode policy must keep every
token (``policies/sparse_prefill.py`` refuses anything else). The pattern saves prefill compute, not KV memory;
the heads that are not full under the KV budget are streaming heads, whose prefill is already A-shape and
whose spans the solver picks from the elastic-span search (``mass.py``, ``solver.py``).
Differences from MInference: candidates are a small grid (3 families x 3 budgets), the search runs at one
length on CPU, and the cost is measured block density rather than kernel latency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from headwise.kernels.prefill_index import indices_to_mask
from headwise.metrics import attention_recall
from headwise.models import LoadedModel
from headwise.policies import AShape, BlockTopK, Full, Policy, Seer, VerticalSlash
from headwise.policies.seer import SeerGates
from headwise.profile.probe import QKProbe, probing

BLOCK = 64


def candidates(length: int, seer: bool = False) -> list[Policy]:
    """The search grid at ``length`` tokens: budgets as fractions of the number of key blocks (``seer``: also
    SeerAttention's gate at the block-top-k budgets)."""
    n = max(1, length // BLOCK)
    out: list[Policy] = []
    for frac in (1 / 8, 1 / 4, 1 / 2):
        k = max(1, round(frac * n))
        out.append(AShape(sink=BLOCK, local=BLOCK * k, block_size=BLOCK))
        out.append(VerticalSlash(vertical_size=max(1, k * BLOCK // 2), slash_size=max(1, k * BLOCK // 2),
                                 block_size=BLOCK))
        out.append(BlockTopK(topk=k, block_size=BLOCK))
        if seer:
            out.append(Seer(topk=k, block_size=BLOCK))
    return out


def _density(mask: torch.Tensor) -> torch.Tensor:
    """mask bool [Bi, Hi, L, S] -> [Hi] share of causal entries kept."""
    L, S = mask.shape[-2:]
    causal = torch.arange(S)[None, :] <= torch.arange(S - L, S)[:, None]
    return (mask & causal).float().sum(dim=(0, 2, 3)) / causal.sum() / mask.shape[0]


@dataclass
class PatternChoice:
    policy: Policy
    recall: float
    density: float
    table: list[dict[str, Any]]


def search_patterns(lm: LoadedModel, heads: list[tuple[int, int]], length: int = 1024, density: float = 0.3,
                    min_recall: float = 0.9, progress: bool = True,
                    gates: SeerGates | None = None) -> dict[tuple[int, int], PatternChoice]:
    """heads: (layer, kv_head) pairs to search (global layers only). Returns the choice for each. With ``gates``
    (block size ``BLOCK``), SeerAttention's gate competes too."""
    from headwise.data import shakespeare

    spec = lm.spec
    heads = [h for h in heads if spec.layer_windows[h[0]] is None]
    if not heads:
        return {}
    probe = QKProbe({i for i, _ in heads}, to_host=True)
    ids = lm.tokenizer(shakespeare(length * 8), return_tensors="pt").input_ids[:, :length]
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), probing(lm.model):
        lm.model(input_ids=ids.to(device), headwise_probe=probe, use_cache=False, logits_to_keep=1)
    g = spec.group_size
    cands = candidates(ids.shape[1], seer=gates is not None)
    cpu_gates = gates.on("cpu") if gates is not None else None
    out: dict[tuple[int, int], PatternChoice] = {}
    for layer in tqdm(sorted(probe.qk), desc="pattern search", unit="layer", disable=not progress):
        q, k, scale = probe.qk[layer]
        rows = []
        for pol in cands:
            if isinstance(pol, Seer):
                gate = cpu_gates.layer(layer) if cpu_gates is not None else None
                if gate is None:
                    continue
                idx, count = pol.build_index(q, k, 0, scale, gate=gate)
                mask = indices_to_mask(idx, count, BLOCK, q.shape[2], k.shape[2], 0)
            else:
                mask = pol.mask(q, k, 0, scale)  # [Bi, Hi, L, S]
            if mask.shape[1] not in (1, q.shape[1]):
                mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
            dens = _density(mask).expand(q.shape[1]) if mask.shape[1] == 1 else _density(mask)
            rec = attention_recall(q, k, mask, scale, q_offset=0)  # [Hq]
            rows.append((pol, rec, dens))
        for lay, j in heads:
            if lay != layer:
                continue
            sl = slice(j * g, (j + 1) * g)
            table = [{"policy": p.to_spec(), "recall": round(float(r[sl].mean()), 4),
                      "density": round(float(d[sl].mean()), 4)} for p, r, d in rows]
            ok = [(float(r[sl].mean()), float(d[sl].mean()), p) for p, r, d in rows if float(d[sl].mean()) <= density]
            best = max(ok, key=lambda t: t[0], default=None)
            if best is None or best[0] < min_recall:
                out[(lay, j)] = PatternChoice(Full(), 1.0, 1.0, table)
            else:
                out[(lay, j)] = PatternChoice(best[2], best[0], best[1], table)
    return out
