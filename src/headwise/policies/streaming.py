"""``streaming``: attention sinks + a recent window, constant memory.

StreamingLLM (Xiao et al., 2023, https://arxiv.org/abs/2309.17453) and the streaming heads of
DuoAttention (Xiao et al., 2024, https://arxiv.org/abs/2410.10819): a query at position ``p`` attends to
key ``j <= p`` iff ``j < sink`` or ``p - j < window``. During chunked prefill this is DuoAttention's A-shape
for streaming heads, exactly, token by token.

``compensation=True`` adds RazorAttention's compensation token (Tang et al., 2024,
https://arxiv.org/abs/2407.15891): one extra slot per head holding the mean key and mean value of every token
the head has dropped, visible to every later query. The paper builds it once after prefill; here it is
updated as tokens leave the window, so it also serves chunked prefill and long generations.

A Gemma 3 sliding-window layer is ``streaming(sink=0, window=512)`` exactly (transformers' sliding mask keeps
``p - j < window``).

A prompt chunk runs, with kernels on (CUDA, or the CPU under TRITON_INTERPRET=1) and no compensation slot, on
``kernels/sink_window.py`` (the ring and the chunk read in place, only the keys each query tile may see); otherwise
under one mask over the ring and the chunk, or in bands of ``BAND_ROWS`` queries when that does less work
(``sink_window_banded``, the reference's long-chunk form).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.common import INTERPRET
from headwise.policies.base import (
    AttendContext,
    PagedLayout,
    Policy,
    check_positive,
    kernel_decode,
    masked_attention,
)
from headwise.policies.stores import SinkWindowStore


@dataclass(frozen=True)
class Streaming(Policy):
    name: ClassVar[str] = "streaming"
    paper: ClassVar[str] = "https://arxiv.org/abs/2309.17453"
    graph_decode: ClassVar[bool] = True  # without compensation: ``graph_blocker``

    sink: int = 64
    """Initial tokens always kept (attention sinks). DuoAttention uses 64 with a 256-token window."""
    window: int = 256
    """Recent tokens kept, the query's own included (``p - j < window``)."""
    compensation: bool = False
    """RazorAttention compensation token: keep the mean of dropped keys/values as one extra slot."""

    def validate(self) -> None:
        check_positive(self, sink=self.sink, window=self.window)
        if self.window < 1:
            raise PlanError("policy 'streaming': 'window' must be at least 1 (the query itself)")
        if not isinstance(self.compensation, bool):
            raise PlanError(f"policy 'streaming': 'compensation' must be true or false, got {self.compensation!r}")

    def kv_tokens(self, seq_len: int) -> int:
        return min(seq_len, self.sink + self.window) + (1 if self.compensation and seq_len > self.sink + self.window else 0)

    def short(self) -> str:
        return f"stream{self.sink}+{self.window}" + ("+c" if self.compensation else "")

    def make_store(self, batch, heads, head_dim, device, dtype) -> SinkWindowStore:
        return SinkWindowStore(batch, heads, head_dim, device, dtype, self.sink, self.window, self.compensation)

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """The pattern as a mask_mod: ``[L, 1]`` query and ``[1, S]`` key positions -> bool ``[L, S]``."""
        return (k_pos >= 0) & (k_pos <= q_pos) & ((k_pos < self.sink) | (q_pos - k_pos < self.window))

    def paged_layout(self) -> PagedLayout | None:
        return None if self.compensation else PagedLayout(self.sink, self.window)  # compensation: a slot off the ring

    def graph_blocker(self) -> str | None:
        if self.compensation:
            return (f"streaming ({self.short()}) with compensation: the dropped tokens' running mean is counted on "
                    "the host")
        return None

    @property
    def position_span(self) -> int | None:
        """Without sinks (a native sliding window), no key further than ``window``; sinks (and the compensation
        slot, a mean of keys at their own positions) are as far as the context is long."""
        return self.window if self.sink == 0 and not self.compensation else None

    def attend(self, q, k, v, store: SinkWindowStore, ctx: AttendContext) -> torch.Tensor:
        L = q.shape[2]
        if ctx.position is not None:  # a decode step for a CUDA graph: the ring slot and length on the device
            store.append_at(k, v, ctx.position)
            return kernel_decode(q, store.keys, store.values, store.capacity, ctx.scale, position=ctx.position)
        if L == 1 and ctx.use_kernels and not self.compensation:
            return self._decode_kernel(q, k, v, store, ctx)
        old_k, old_v, old_pos = store.view()
        if ctx.use_kernels and not self.compensation and (q.is_cuda or INTERPRET) and q.shape[-1] <= 256:
            # Triton: the ring and the chunk read where they lie, only the keys a query tile may see
            from headwise.kernels.sink_window import sink_window_attention

            out = sink_window_attention(q, k, v, old_k, old_v, old_pos, ctx.start, self.sink, self.window, ctx.scale)
            store.append(k, v)
            return out
        new_pos = torch.arange(ctx.start, ctx.start + L, device=q.device)
        keys = torch.cat([old_k, k], dim=2)
        values = torch.cat([old_v, v], dim=2)
        k_pos = torch.cat([old_pos, new_pos])
        comp = store.compensation_kv()
        if comp is None and banded_pays(L, keys.shape[2], self.sink, self.window):
            out = sink_window_banded(q, keys, values, k_pos, ctx.start, self.sink, self.window, ctx.scale)
        else:
            mask = self.allowed(new_pos[:, None], k_pos[None, :])
            if comp is not None:
                keys = torch.cat([comp[0], keys], dim=2)
                values = torch.cat([comp[1], values], dim=2)
                mask = torch.cat([torch.ones(L, 1, dtype=torch.bool, device=q.device), mask], dim=1)
            out = masked_attention(q, keys, values, mask, ctx.scale)
        store.append(k, v)
        return out

    def _decode_kernel(self, q, k, v, store: SinkWindowStore, ctx: AttendContext) -> torch.Tensor:
        """One decode token on the decode kernel: once the token is written, the store holds exactly what it
        may see (the sinks and the last ``window`` positions, itself included), in slots ``0 .. n-1`` whatever
        the ring's rotation, and attention does not care about order; one kernel over the ring, no copy, no
        mask. (With ``compensation`` the extra slot lives outside the ring: the reference path serves it.)"""
        store.append(k, v)
        return kernel_decode(q, store.keys, store.values, min(store.seen, self.sink + self.window), ctx.scale)


BAND_ROWS = 256
"""Query rows per band of ``sink_window_banded``: each band's keys are the sinks and ``window - 1 + BAND_ROWS``
positions, so smaller bands waste fewer masked pairs and launch more (batched) problems."""


def banded_pays(rows: int, keys: int, sink: int, window: int) -> bool:
    """Whether a chunk of ``rows`` queries over ``keys`` keys does less work in bands than under one mask."""
    return rows > BAND_ROWS and 2 * (sink + window - 1 + BAND_ROWS) < keys


def sink_window_banded(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, k_pos: torch.Tensor, q_start: int, sink: int,
    window: int, scale: float, rows: int = BAND_ROWS,
) -> torch.Tensor:
    """A prompt chunk of a ``streaming`` head, token-exact as ``Streaming.allowed`` under one mask, in bands.

    Under one ``[L, S]`` mask a chunk of L queries computes all ``L * S`` scores, though each query sees at most
    ``sink + window`` keys (a chunk of 8192 queries after a ring of 320 keys: 8192 x 8512 scores for 8192 x 320
    needed). Here the queries go in bands of ``rows``; band ``b`` gathers its own keys (the sinks, and positions
    ``start_b - window + 1 .. start_b + rows - 1``) and the bands run as one batched masked attention: ``rows *
    (sink + window - 1 + rows)`` scores per band.

    q: ``[B, Hq, L, D]`` at positions ``q_start ..``; keys, values ``[B, Hkv, S, D]`` with positions ``k_pos [S]``
    (each position at most once; a ring's empty slots negative), the chunk's own keys among them. Every key a
    query may see must be there (a ``SinkWindowStore``'s view followed by the chunk is). Returns ``[B, Hq, L, D]``.
    """
    B, Hq, L, D = q.shape
    Hkv, S = keys.shape[1], keys.shape[2]
    dev = q.device
    end = q_start + L
    nb = -(-L // rows)
    # The column of each position below ``end`` (-1: not held); slot ``end`` takes the empty slots' writes.
    col_of = torch.full((end + 1,), -1, dtype=torch.long, device=dev)
    kp = k_pos.to(device=dev, dtype=torch.long)
    col_of.scatter_(0, torch.where((kp >= 0) & (kp < end), kp, end), torch.arange(S, device=dev))
    first = q_start + rows * torch.arange(nb, device=dev)  # each band's first query position
    band = first[:, None] - (window - 1) + torch.arange(window - 1 + rows, device=dev)
    pos = torch.cat([torch.arange(sink, device=dev).expand(nb, sink), band], dim=1)  # [nb, C]
    col = col_of[pos.clamp(0, end)]  # ``end`` reads -1 unless an empty slot wrote there: masked below anyway
    ok = (pos >= 0) & (pos < end) & (col >= 0)
    ok[:, sink:] &= band >= sink  # a sink inside the band is in the sinks' columns already
    q_pos = first[:, None] + torch.arange(rows, device=dev)  # [nb, rows]
    mask = ok[:, None, :] & Streaming(sink=sink, window=window).allowed(q_pos[:, :, None], pos[:, None, :])
    # Rows past the chunk (the last band's padding) see whatever their band holds, so that no row is empty.
    mask = torch.where((q_pos < end)[:, :, None], mask, ok[:, None, :])
    C = pos.shape[1]
    idx = col.clamp(min=0).reshape(-1)

    def gather(t: torch.Tensor) -> torch.Tensor:
        return t.index_select(2, idx).view(B, Hkv, nb, C, D).transpose(1, 2).reshape(B * nb, Hkv, C, D)

    qb = torch.nn.functional.pad(q, (0, 0, 0, nb * rows - L)).view(B, Hq, nb, rows, D)
    qb = qb.transpose(1, 2).reshape(B * nb, Hq, rows, D)
    m = mask[:, None].repeat(B, 1, 1, 1)  # [B * nb, 1, rows, C], batch-major as ``qb``
    out = masked_attention(qb, gather(keys), gather(values), m, scale)
    return out.view(B, nb, Hq, rows, D).transpose(1, 2).reshape(B, Hq, nb * rows, D)[:, :, :L]
