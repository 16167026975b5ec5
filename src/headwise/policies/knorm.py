"""``knorm``: keep the keys of smallest L2 norm, plus a window of the newest tokens, in constant memory.

Devoto et al., 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"
(https://arxiv.org/abs/2406.11430), as kvpress's ``KnormPress`` runs it: a key's L2 norm alone ranks it (a low norm
goes with high attention), no query is needed, so the ranking costs one norm per token. On SmolLM2 at the shipped
plan's KV it keeps more 2K passkeys than dense and loses most needles (docs/quality-runs.md, run 14): a head-level choice
for the solver, not a whole-model one.

How it differs from the press. kvpress compresses each layer once, after a dense prefill of the whole prompt, and
keeps every generated token. Here a head holds ``tokens + window`` slots at most, whatever the length: the newest
``window`` tokens always, and the ``tokens`` tokens of smallest key norm among all older ones (a token leaving the
window competes with the kept ones, so the selection is the same whatever the chunking, up to ties). Within a prompt
chunk, attention is exact and causal over the kept tokens and the whole chunk, so a prompt that fits one chunk is
prefilled as the press prefills it (densely) and then compressed as it compresses (smallest norms), the window
aside; a longer prompt's later chunks see the earlier chunks' kept tokens only. The press cuts the cache before the
last prompt token is read (it prefills the context, then runs the last token over the cut cache); a chunk holding
the whole prompt gives that token the uncut prompt, so the first answer token is dense's (docs/quality-runs.md, "The
KNorm cell in fp32"). With ``window=0`` and a chunk that stops one token short of the prompt the cut comes first,
as in the press, but the generated tokens then compete by norm too (the press keeps them all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy, causal_attention, check_positive, gather_rows

DEFAULT_WINDOW = 64
"""The newest tokens a ``knorm`` head keeps by default (and the eval's baseline and the profiler's switched heads)."""


class KNormStore:
    """For a batch and ``heads`` KV heads: up to ``tokens`` kept tokens (keys, values, key norms, positions, per
    head) and a window of the newest ``window`` tokens (shared positions, in order)."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 tokens: int, window: int):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype = device, dtype
        self.max_kept, self.window = tokens, window
        shape = (batch, heads, 0, head_dim)
        self.kept_k = torch.empty(shape, device=device, dtype=dtype)
        self.kept_v = torch.empty(shape, device=device, dtype=dtype)
        self.kept_norm = torch.empty(batch, heads, 0, device=device, dtype=torch.float32)
        self.kept_pos = torch.empty(batch, heads, 0, device=device, dtype=torch.long)
        self.win_k = torch.empty(shape, device=device, dtype=dtype)
        self.win_v = torch.empty(shape, device=device, dtype=dtype)
        self.seen = 0

    @property
    def tokens(self) -> int:
        return self.seen

    def reserve(self, total: int) -> None:
        """Nothing to reserve: the store never holds more than ``tokens + window`` slots."""

    def advance(self, n: int) -> None:
        raise RuntimeError("knorm has no CUDA-graph decode (Policy.graph_decode is False)")

    def rewind(self, tokens: int) -> None:
        if tokens != self.seen:
            raise RuntimeError("knorm drops tokens as they arrive: its store cannot be rewound")

    def tensors(self) -> list[torch.Tensor]:
        return [self.kept_k, self.kept_v, self.win_k, self.win_v]

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[batch, heads, slots, head_dim]`` of every slot held (kept, then the window) and their
        positions ``[batch, heads, slots]``."""
        n_win = self.win_k.shape[2]
        win_pos = torch.arange(self.seen - n_win, self.seen, device=self.device)
        pos = torch.cat([self.kept_pos, win_pos.expand(self.batch, self.heads, n_win)], dim=2)
        return torch.cat([self.kept_k, self.win_k], dim=2), torch.cat([self.kept_v, self.win_v], dim=2), pos

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [batch, heads, n, head_dim]`` for positions ``seen .. seen+n-1``: the newest ``window``
        tokens stay in the window; the ones it lets go compete with the kept ones by key norm."""
        n = k.shape[2]
        keys, values = torch.cat([self.win_k, k], dim=2), torch.cat([self.win_v, v], dim=2)
        first = self.seen - self.win_k.shape[2]  # position of keys[:, :, 0]
        out = max(0, keys.shape[2] - self.window)  # tokens leaving the window
        # copies, not views: a view would keep the whole concatenation (a prompt chunk) alive, which the allocator
        # counts as KV held
        self.win_k, self.win_v = (keys[:, :, out:].clone(), values[:, :, out:].clone()) if out else (keys, values)
        self.seen += n
        if not out:
            return
        cand_k = torch.cat([self.kept_k, keys[:, :, :out]], dim=2)
        cand_v = torch.cat([self.kept_v, values[:, :, :out]], dim=2)
        cand_norm = torch.cat([self.kept_norm, keys[:, :, :out].float().norm(dim=-1)], dim=2)
        pos = torch.arange(first, first + out, device=self.device).expand(self.batch, self.heads, out)
        cand_pos = torch.cat([self.kept_pos, pos], dim=2)
        if cand_k.shape[2] > self.max_kept:
            # the smallest norms; among equal norms the older token (sorted by position, then stably by norm: exact ties
            # are common in bf16, and which one stays must not depend on the chunking)
            order = torch.argsort(cand_pos, dim=-1)  # positions are distinct
            idx = order.gather(2, torch.argsort(cand_norm.gather(2, order), dim=-1, stable=True)[..., : self.max_kept])
            cand_k, cand_v = gather_rows(cand_k, idx), gather_rows(cand_v, idx)
            cand_norm, cand_pos = cand_norm.gather(2, idx), cand_pos.gather(2, idx)
        self.kept_k, self.kept_v, self.kept_norm, self.kept_pos = cand_k, cand_v, cand_norm, cand_pos


@dataclass(frozen=True)
class KNorm(Policy):
    name: ClassVar[str] = "knorm"
    paper: ClassVar[str] = "https://arxiv.org/abs/2406.11430"

    tokens: int = 512
    """Older tokens kept: those of smallest key L2 norm."""
    window: int = DEFAULT_WINDOW
    """The newest tokens, always kept (the generated ones among them)."""

    def validate(self) -> None:
        check_positive(self, tokens=self.tokens, window=self.window)
        if self.tokens + self.window == 0:
            raise PlanError("policy 'knorm': 'tokens' + 'window' must be at least 1")

    def kv_tokens(self, seq_len: int) -> int:
        return min(seq_len, self.tokens + self.window)

    def short(self) -> str:
        return f"knorm{self.tokens}+{self.window}"

    def make_store(self, batch, heads, head_dim, device, dtype) -> KNormStore:
        return KNormStore(batch, heads, head_dim, device, dtype, self.tokens, self.window)

    def attend(self, q, k, v, store: KNormStore, ctx: AttendContext) -> torch.Tensor:
        """Exact causal attention over the slots held and the chunk (every slot held is older than the chunk, so
        in the order kept-then-window-then-chunk the pattern is plain causal), then the chunk is committed."""
        keys = torch.cat([store.kept_k, store.win_k, k], dim=2)  # one copy (``view`` + the chunk would be two)
        values = torch.cat([store.kept_v, store.win_v, v], dim=2)
        out = causal_attention(q, keys, values, keys.shape[2] - k.shape[2], ctx.scale)
        store.append(k, v)
        return out
