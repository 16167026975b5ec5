"""Sink and locality mass per query head, and how much attention mass elastic streaming spans keep.

Over real text (Shakespeare), for queries near several lengths ``N`` (the last ``BIN`` queries before ``N``):

* ``sink``: attention share on the first ``SINK_TOKENS`` tokens (StreamingLLM's attention sinks);
* ``local``: share on the recent ``LOCAL_WINDOW`` tokens (the query's own included; the first 64 tokens excluded);
* ``span_recall[option, bin]``: share kept by ``streaming(sink, window = a + b * N)`` for each elastic span
  option ``(a, b)`` of ``SPAN_OPTIONS`` (MoA's span = a + b*N, https://arxiv.org/abs/2406.14909).

The span recalls feed the pattern search (``patterns.py``); ``1 - recall`` of the default streaming span is the
``mass`` head score (what a head loses if it streams).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from headwise.models import LoadedModel
from headwise.profile.probe import Probe, probing

SINK_TOKENS = 4
"""StreamingLLM's 4 initial tokens."""
LOCAL_WINDOW = 256
"""Recent window for the locality score (DuoAttention's streaming window)."""
STREAM_SINK = 64
"""Sink kept by the streaming options searched (DuoAttention's 64)."""
SPAN_OPTIONS: tuple[tuple[int, float], ...] = tuple(
    (a, b) for a in (64, 128, 256, 512) for b in (0.0, 1 / 32, 1 / 16, 1 / 8, 1 / 4)
)
"""(a, b) of window = a + b*N: fixed windows (b = 0) and windows growing with the input length."""
BIN = 128
"""Queries per length bin (the ``BIN`` positions just before ``N``)."""


def span_window(option: tuple[int, float], n: int) -> int:
    a, b = option
    return round(a + b * n)


class MassProbe(Probe):
    """Accumulates, per layer and query head, the mass statistics for queries in each length bin."""

    def __init__(self, num_layers: int, num_q_heads: int, bins: Sequence[int]):
        self.bins = list(bins)
        self.sink = torch.zeros(num_layers, num_q_heads, len(self.bins))
        self.local = torch.zeros_like(self.sink)
        self.recall = torch.zeros(num_layers, num_q_heads, len(SPAN_OPTIONS), len(self.bins))
        self.count = torch.zeros(num_layers, len(self.bins))

    def rows(self, layer: int, q_len: int) -> slice | None:
        first = self.q_start
        lo = max(0, min(b - BIN for b in self.bins) - first)
        return slice(lo, q_len) if lo < q_len else None

    def observe(self, layer: int, weights: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        # weights: [B, Hq, Lq, S]; sums over batch and queries of each bin
        is_sink = k_pos < STREAM_SINK
        for i, n in enumerate(self.bins):
            sel = (q_pos >= n - BIN) & (q_pos < n)
            if not bool(sel.any()):
                continue
            w = weights[:, :, sel]  # [B, Hq, l, S]
            qp = q_pos[sel]
            self.sink[layer, :, i] += w[..., k_pos < SINK_TOKENS].sum(dim=(0, 2, 3)).cpu()
            # mass by distance d = q - k of the non-sink keys: by_dist[..., d]; then windows are prefix sums
            rest = w.masked_fill(is_sink, 0)
            dmax = int(qp.max() - k_pos[0]) + 1
            d = torch.arange(dmax, device=w.device)
            idx = (qp[:, None] - k_pos[0]) - d[None, :]  # [l, dmax] key index at distance d
            valid = idx >= 0
            by_dist = rest.gather(-1, idx.clamp(min=0).expand(*rest.shape[:2], -1, -1)) * valid
            cum = by_dist.sum(dim=(0, 2)).cumsum(-1)  # [Hq, dmax]
            sink_mass = w[..., is_sink].sum(dim=(0, 2, 3))
            self.local[layer, :, i] += cum[:, min(LOCAL_WINDOW, dmax) - 1].cpu()
            for o, option in enumerate(SPAN_OPTIONS):
                win = min(span_window(option, n), dmax)
                self.recall[layer, :, o, i] += (sink_mass + cum[:, win - 1]).cpu()
            self.count[layer, i] += float(w.shape[0] * w.shape[2])


@dataclass
class MassResult:
    bins: list[int]
    sink: torch.Tensor
    """[layers, q_heads] share of attention on the first SINK_TOKENS tokens (mean over bins)."""
    local: torch.Tensor
    """[layers, q_heads] share on the last LOCAL_WINDOW tokens (mean over bins)."""
    span_recall: torch.Tensor
    """[layers, q_heads, len(SPAN_OPTIONS), len(bins)] share kept by each elastic streaming span."""

    def streaming_loss(self, window: int = LOCAL_WINDOW) -> torch.Tensor:
        """[layers, q_heads] mass lost by ``streaming(STREAM_SINK, window)`` at the longest bin."""
        o = SPAN_OPTIONS.index((window, 0.0)) if (window, 0.0) in SPAN_OPTIONS else 0
        return 1 - self.span_recall[:, :, o, -1]


def mass_scores(lm: LoadedModel, length: int = 2048, bins: Sequence[int] | None = None, chunk: int = 1024,
                progress: bool = True) -> MassResult:
    """Run ``length`` tokens of Shakespeare through the probe and collect the mass statistics."""
    from headwise.data import shakespeare

    spec = lm.spec
    bins = sorted(bins or [length // 4, length // 2, length])
    ids = lm.tokenizer(shakespeare(length * 8), return_tensors="pt").input_ids[:, :length]
    probe = MassProbe(spec.num_layers, spec.num_q_heads, bins)
    from transformers import DynamicCache

    cache = DynamicCache(config=lm.model.config)
    device = next(lm.model.parameters()).device
    with torch.inference_mode(), probing(lm.model):
        for s in tqdm(range(0, length, chunk), desc="sink/locality mass", unit="chunk", disable=not progress):
            probe.q_start = s
            part = ids[:, s : s + chunk].to(device)
            pos = torch.arange(s, s + part.shape[1], device=device)[None]
            lm.model(input_ids=part, position_ids=pos, past_key_values=cache, use_cache=True,
                     headwise_probe=probe, logits_to_keep=1)
    count = probe.count.clamp(min=1)
    sink = (probe.sink / count[:, None]).mean(-1)
    local = (probe.local / count[:, None]).mean(-1)
    recall = probe.recall / count[:, None, None]
    return MassResult(bins, sink, local, recall)
