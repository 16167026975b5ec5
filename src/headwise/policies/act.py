"""``act``: full attention with ACT's calibration of hidden attention sinks (training-free).

ACT (Yu et al., ICML 2024, "Unveiling and Harnessing Hidden Attention Sinks", https://arxiv.org/abs/2406.15765;
code: github.com/GATECH-EIC/ACT, ``models/llama_modelling_aug.py``). In some heads, tokens after the first
(punctuation, delimiters) soak up attention without carrying meaning. For such a head, ACT finds the sink
tokens of the input on the fly and recalibrates the attention map:

1. a key ``j`` is a sink when the mean attention it receives from the queries that see it exceeds
   ``threshold`` (column sum of the map / number of queries at or after ``j``; the code's ``THRES=0.1``);
2. the first sink found (in practice token 0, the usual initial sink) is left alone;
3. the other sinks keep ``beta`` of their attention (``BETA=0.4``), and the ``(1 - beta)`` they lose is
   given to the non-sink keys of the row in proportion to their attention.

So a row's sink share ``S`` becomes ``beta * S`` and the output is ``beta*S * o_sink + (1 - beta*S) * o_rest``,
where ``o_sink``/``o_rest`` are attention renormalised over the sinks / the other keys. A row with (almost)
nothing outside the sinks is left unchanged (the code would divide by zero there). Which heads get it is
decided by measurement: the paper keeps the heads whose calibration raises accuracy on a calibration set;
``headwise profile --act`` keeps the heads whose calibration lowers the loss on held-in text, and all of them
only if together they lower the loss on held-out text (``profile/act.py``).

How this differs from the paper:

* Sinks are found per *KV head*: key ``j`` is a sink of the KV head if the mean over its query heads of the
  attention received passes the threshold, and all of those query heads are calibrated on that set (they
  share the head's policy and cache; the paper's Llama-2 is MHA, where the two coincide). The running column
  sums are one fp32 number per stored token (``kv_bytes`` counts them).
* The column sums are causal: a chunk is calibrated with the sums over every query so far, this chunk's
  included (one-shot prefill: exactly the paper's map); a decode step adds its own row first. So with chunked
  prefill the sink set of a chunk depends on the chunking, as ``vertical_slash``'s estimate does.
* No fast path: the map is materialised ``ROW_BLOCK`` query rows at a time (two passes: column sums, then the
  calibrated output), in fp32. ACT is an accuracy option, not a speed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy
from headwise.policies.stores import DenseStore

ROW_BLOCK = 512
"""Query rows whose attention map is materialised at once (memory: query heads x 512 x keys fp32)."""


class ReceivedStore(DenseStore):
    """Every token's key and value, plus per KV head the attention each token has received so far, summed over
    the head's query heads and over every query: ``received: [batch, heads, capacity]`` fp32."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        super().__init__(batch, heads, head_dim, device, dtype)
        self.received: torch.Tensor | None = None

    def reserve(self, total: int) -> None:
        super().reserve(total)
        if self.received is None or self.received.shape[2] < self.capacity:
            grown = torch.zeros(self.batch, self.heads, self.capacity, device=self.device, dtype=torch.float32)
            if self.received is not None:
                grown[:, :, : self.received.shape[2]] = self.received
            self.received = grown

    def tensors(self) -> list[torch.Tensor]:
        return super().tensors() + ([self.received] if self.received is not None else [])


def _scores(q: torch.Tensor, keys: torch.Tensor, q_start: int, scale: float) -> torch.Tensor:
    """Causal softmax attention of ``q: [B, Hq, l, D]`` (positions ``q_start ..``) over ``keys: [B, Hkv, S, D]``:
    fp32 ``[B, Hkv, r, l, S]`` (r = Hq // Hkv, GQA order)."""
    B, Hq, L, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    qf = q.float().view(B, Hkv, Hq // Hkv, L, D)
    scores = torch.matmul(qf, keys.float()[:, :, None].transpose(-1, -2)) * scale
    q_pos = torch.arange(q_start, q_start + L, device=q.device)
    causal = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


def hidden_sinks(received: torch.Tensor, queries: int, group: int, threshold: float) -> torch.Tensor:
    """Sink tokens after ``queries`` queries: ``received: [B, H, S]`` summed attention per key (over ``group`` query
    heads) -> bool ``[B, H, S]``. Key ``j`` was seen by ``queries - j`` queries of each query head; it is a sink when
    its mean attention passes ``threshold``; the first sink of each head is dropped (ACT keeps the initial sink)."""
    S = received.shape[-1]
    seen = (queries - torch.arange(S, device=received.device)).clamp(min=1) * group
    sink = received / seen > threshold
    first = sink.float().argmax(dim=-1, keepdim=True)  # first True (0 if none: clearing it changes nothing)
    return sink.scatter(-1, first, False)


def calibrate(probs: torch.Tensor, sink: torch.Tensor, beta: float) -> torch.Tensor:
    """ACT's recalibrated map: ``probs: [..., l, S]`` (rows sum to 1), ``sink`` bool broadcastable to ``[..., 1, S]``.
    Sinks keep ``beta`` of their weight; the rest goes to the non-sink keys in proportion to their weight."""
    s = (probs * sink).sum(-1, keepdim=True)  # sink share of each row
    rest = 1.0 - s
    gain = torch.where(rest > 1e-6, (1.0 - beta * s) / rest.clamp(min=1e-6), torch.ones_like(rest))
    factor = torch.where(sink, torch.full_like(gain, beta), gain)
    factor = torch.where(rest > 1e-6, factor, torch.ones_like(factor))  # nothing outside the sinks: unchanged
    return probs * factor


def act_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, received: torch.Tensor, q_start: int,
                  scale: float, beta: float, threshold: float) -> torch.Tensor:
    """ACT over a chunk (the reference; there is no other path). q: [B, Hq, L, D] at positions ``q_start ..``;
    keys, values: [B, Hkv, S, D] with ``S = q_start + L``; ``received: [B, Hkv, S]`` fp32, the column sums before
    this chunk, updated in place with the chunk's. Returns [B, Hq, L, D] in q's dtype."""
    B, Hq, L = q.shape[:3]
    Hkv, S = keys.shape[1], keys.shape[2]
    for r0 in range(0, L, ROW_BLOCK):  # pass 1: the chunk's column sums
        r1 = min(L, r0 + ROW_BLOCK)
        received += _scores(q[:, :, r0:r1], keys, q_start + r0, scale).sum(dim=(2, 3))
    sink = hidden_sinks(received, S, Hq // Hkv, threshold)[:, :, None, None, :]  # [B, Hkv, 1, 1, S]
    out = torch.empty(B, Hkv, Hq // Hkv, L, values.shape[-1], device=q.device, dtype=torch.float32)
    vf = values.float()[:, :, None]
    for r0 in range(0, L, ROW_BLOCK):  # pass 2: calibrated output
        r1 = min(L, r0 + ROW_BLOCK)
        probs = calibrate(_scores(q[:, :, r0:r1], keys, q_start + r0, scale), sink, beta)
        out[:, :, :, r0:r1] = torch.matmul(probs, vf)
    return out.view(B, Hq, L, -1).to(q.dtype)


@dataclass(frozen=True)
class ACT(Policy):
    """Full attention and full cache; hidden sinks recalibrated (module docstring)."""

    name: ClassVar[str] = "act"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.15765"
    keeps_every_token: ClassVar[bool] = False
    """Its store keeps every token, but the calibration needs the column sums of every query, which a prefill pattern
    attending in front of it would not add: it is no decode policy for patterns."""

    beta: float = 0.4
    """Share of a hidden sink's attention it keeps; the rest goes to the other keys (ACT's ``BETA``)."""
    threshold: float = 0.1
    """Mean attention a key must receive from the queries that see it to count as a sink (ACT's ``THRES``)."""

    def validate(self) -> None:
        for key in ("beta", "threshold"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise PlanError(f"policy 'act': '{key}' must be a number in [0, 1], got {value!r}")

    def short(self) -> str:
        return "ACT"

    def kv_tokens(self, seq_len: int) -> int:
        return seq_len

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Keys and values of every token, plus its fp32 column sum."""
        return seq_len * (2 * head_dim * dtype_bytes + 4)

    def make_store(self, batch, heads, head_dim, device, dtype) -> ReceivedStore:
        return ReceivedStore(batch, heads, head_dim, device, dtype)

    def attend(self, q, k, v, store: Any, ctx: AttendContext) -> torch.Tensor:
        if not isinstance(store, ReceivedStore):
            raise PlanError("policy 'act' needs its own store (ReceivedStore)")
        if ctx.native_window is not None:
            raise PlanError(
                f"policy 'act' on layer {ctx.layer_idx}: the layer has a native sliding window of {ctx.native_window} "
                "tokens; use act on global-attention layers only"
            )
        store.append(k, v)  # grows the column sums with the keys (ReceivedStore.reserve)
        keys, values = store.view()
        assert store.received is not None
        received = store.received[:, :, : store.length]
        return act_attention(q, keys, values, received, ctx.start, ctx.scale, float(self.beta), float(self.threshold))
