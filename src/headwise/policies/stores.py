"""Per-head KV storage.

A store holds the keys and values of one *group* of KV heads of one layer (the heads of that layer that
share a policy) for a batch of sequences: ``keys: [batch, heads, slots, head_dim]``. Unlike transformers'
stock cache layers, different groups of one layer hold different numbers of tokens, so memory that a
policy does not need is never allocated.

Two layouts cover every policy:
- ``DenseStore``: every token, in position order; grows (or is reserved up front for a known length).
- ``SinkWindowStore``: the first ``sink`` tokens plus a ring buffer of the last ``window`` tokens, with the
  position of every slot; optionally one compensation slot holding the mean of dropped keys and values.
"""

from __future__ import annotations

import torch

_EMPTY = -(2**62)  # position of an empty ring slot: masked out for every query
E4M3_MAX = 448.0  # largest finite float8 e4m3 value


def quantize_bounds(bounds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Page bounds ``[..., 2, D]`` (min row, max row) -> float8 e4m3 codes of the same shape and fp32 scales
    ``[..., 2]``, one per row (its absmax / 448, with a little headroom), rounded *outward*: the min row down
    and the max row up, to the next e4m3 value, so ``codes * scale`` still bounds every key of the page and
    Quest's score stays an upper bound of ``q . k``, only a looser one. Half the bytes of bf16 bounds."""
    x = bounds.float()
    amax = x.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax * ((1 + 2**-10) / E4M3_MAX), torch.ones_like(amax))
    codes = (x / scale[..., None]).to(torch.float8_e4m3fn)  # round to nearest, |x / scale| < 448
    val = codes.float()
    u = codes.view(torch.uint8).to(torch.int16)
    deq = val * scale[..., None]
    down = torch.where(val > 0, u - 1, torch.where(val == 0, 0x81, u + 1))  # next e4m3 value below
    up = torch.where(val < 0, u - 1, torch.where(val == 0, 0x01, u + 1))  # next e4m3 value above
    u = torch.stack([torch.where(deq[..., 0, :] > x[..., 0, :], down[..., 0, :], u[..., 0, :]),
                     torch.where(deq[..., 1, :] < x[..., 1, :], up[..., 1, :], u[..., 1, :])], dim=-2)
    return u.to(torch.uint8).view(torch.float8_e4m3fn), scale


def dequantize_bounds(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``quantize_bounds``'s inverse, in fp32: ``[..., 2, D]``."""
    return codes.float() * scales[..., None]


class DenseStore:
    """Keys/values of every token so far, ``[batch, heads, capacity, head_dim]``, first ``length`` valid."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype = device, dtype
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    @property
    def tokens(self) -> int:
        return self.length

    def rewind(self, tokens: int) -> None:
        self.length = tokens

    def reserve(self, total: int) -> None:
        """Make room for ``total`` tokens in all (exact size: no over-allocation when the length is known)."""
        if total <= self.capacity:
            return
        shape = (self.batch, self.heads, total, self.head_dim)
        keys = torch.empty(shape, device=self.device, dtype=self.dtype)
        values = torch.empty(shape, device=self.device, dtype=self.dtype)
        if self.keys is not None and self.values is not None and self.length:
            keys[:, :, : self.length] = self.keys[:, :, : self.length]
            values[:, :, : self.length] = self.values[:, :, : self.length]
        self.keys, self.values = keys, values

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [batch, heads, n, head_dim]``; grows by doubling when no room was reserved."""
        n = k.shape[2]
        need = self.length + n
        if need > self.capacity:
            self.reserve(max(need, 2 * self.capacity))
        assert self.keys is not None and self.values is not None
        self.keys[:, :, self.length : need] = k
        self.values[:, :, self.length : need] = v
        self.length = need

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Append one token ``k, v: [batch, heads, 1, head_dim]`` at the slot a device tensor names (``position``:
        one long element, the token's position, equal to ``length``): no host value enters the copy, so a CUDA
        graph can replay it step after step. The room must be reserved (a graph cannot grow the buffers)."""
        if self.keys is None or self.values is None or self.length >= self.capacity:
            raise RuntimeError("DenseStore.append_at needs reserved room (HeadwiseCache.reserve)")
        self.keys.index_copy_(2, position, k)
        self.values.index_copy_(2, position, v)
        self.length += 1

    def advance(self, n: int) -> None:
        """Count ``n`` tokens that a replayed CUDA graph wrote."""
        self.length += n

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid keys and values, ``[batch, heads, length, head_dim]`` (views, no copy)."""
        if self.keys is None or self.values is None:
            empty = torch.empty(self.batch, self.heads, 0, self.head_dim, device=self.device, dtype=self.dtype)
            return empty, empty
        return self.keys[:, :, : self.length], self.values[:, :, : self.length]

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.keys, self.values) if t is not None]


class SinkWindowStore:
    """First ``sink`` tokens + ring of the last ``window`` tokens (+ optional compensation slot).

    ``positions()`` gives the absolute position of every slot, so attention can mask by position whatever
    the physical order of the ring; softmax does not care about order.
    """

    def __init__(
        self,
        batch: int,
        heads: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
        sink: int,
        window: int,
        compensation: bool = False,
    ):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype = device, dtype
        self.sink, self.window, self.compensation = sink, window, compensation
        self.seen = 0  # tokens written so far (the next token's position)
        # The ring is allocated as tokens arrive (or as ``reserve`` asks), never beyond ``sink + window`` slots:
        # a short prompt holds no more slots than it has tokens. Until the ring first wraps, position ``p`` lives
        # in slot ``p``, so growing the buffers keeps every slot where it is.
        self.max_slots = sink + window
        self.keys = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.values = torch.zeros(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.slot_pos = torch.full((0,), _EMPTY, dtype=torch.long, device=device)
        # Running sums of dropped keys/values (fp32 for accuracy) and how many were dropped; allocated at the
        # first drop.
        self.comp_keys: torch.Tensor | None = None
        self.comp_values: torch.Tensor | None = None
        self.dropped = 0

    @property
    def capacity(self) -> int:
        """Slots allocated: at most ``sink + window``."""
        return self.keys.shape[2]

    @property
    def tokens(self) -> int:
        return self.seen

    def rewind(self, tokens: int) -> None:
        self.seen = tokens

    def reserve(self, total: int) -> None:
        """Allocate the slots ``total`` tokens will use (``min(total, sink + window)``), so that decode steps
        (and a CUDA graph replaying them) never grow the buffers."""
        self._grow(min(total, self.max_slots))

    def _grow(self, slots: int) -> None:
        if slots <= self.capacity:
            return
        shape = (self.batch, self.heads, slots, self.head_dim)
        keys = torch.zeros(shape, device=self.device, dtype=self.dtype)
        values = torch.zeros(shape, device=self.device, dtype=self.dtype)
        slot_pos = torch.full((slots,), _EMPTY, dtype=torch.long, device=self.device)
        n = self.capacity
        if n:
            keys[:, :, :n] = self.keys
            values[:, :, :n] = self.values
            slot_pos[:n] = self.slot_pos
        self.keys, self.values, self.slot_pos = keys, values, slot_pos

    def view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values ``[batch, heads, slots, head_dim]`` and positions ``[slots]`` (empty slots hugely negative)."""
        return self.keys, self.values, self.slot_pos

    def compensation_kv(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Mean of dropped keys and values, ``[batch, heads, 1, head_dim]``, or None if nothing was dropped."""
        if not self.compensation or self.dropped == 0:
            return None
        assert self.comp_keys is not None and self.comp_values is not None
        return (
            (self.comp_keys / self.dropped).to(self.dtype),
            (self.comp_values / self.dropped).to(self.dtype),
        )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k, v: [batch, heads, n, head_dim]`` for positions ``seen .. seen+n-1``."""
        n = k.shape[2]
        start = self.seen
        need = min(start + n, self.max_slots)
        if need > self.capacity:  # grow as DenseStore does (doubling), never past sink + window
            self._grow(min(self.max_slots, max(need, 2 * self.capacity)))
        pos = torch.arange(start, start + n, device=self.device)
        # Sinks: positions below ``sink`` are kept forever.
        n_sink_new = max(0, min(n, self.sink - start))
        if n_sink_new:
            self.keys[:, :, start : start + n_sink_new] = k[:, :, :n_sink_new]
            self.values[:, :, start : start + n_sink_new] = v[:, :, :n_sink_new]
            self.slot_pos[start : start + n_sink_new] = pos[:n_sink_new]
        rest_k, rest_v, rest_pos = k[:, :, n_sink_new:], v[:, :, n_sink_new:], pos[n_sink_new:]
        if rest_pos.numel() and self.window > 0:
            # Tokens of this chunk that will not survive in the ring are dropped straight away.
            overflow = max(0, rest_pos.numel() - self.window)
            if overflow and self.compensation:
                self._drop(rest_k[:, :, :overflow], rest_v[:, :, :overflow])
            rest_k, rest_v, rest_pos = rest_k[:, :, overflow:], rest_v[:, :, overflow:], rest_pos[overflow:]
            slots = self.sink + (rest_pos - self.sink) % self.window
            if self.compensation:
                # The slots written now that already hold a token: before this chunk the ring held positions
                # max(sink, start - window) .. start - 1 (never overflow of their chunk), i.e. ``held``
                # consecutive residues from ``r0``. Counted on the host and weighted on the device: no device
                # sync per step.
                held = start - max(self.sink, start - self.window)
                if held > 0:
                    r0 = (start - held - self.sink) % self.window
                    m = rest_pos.numel()
                    s0 = (start + n - m - self.sink) % self.window  # residue of rest_pos[0]
                    n_old = sum(max(0, min(s0 + m, r0 + sh + held) - max(s0, r0 + sh))
                                for sh in (-self.window, 0, self.window))
                    if n_old:
                        old = (((rest_pos - self.sink) % self.window - r0) % self.window < held).to(torch.float32)
                        self._drop(self.keys[:, :, slots], self.values[:, :, slots], old, n_old)
            self.keys[:, :, slots] = rest_k
            self.values[:, :, slots] = rest_v
            self.slot_pos[slots] = rest_pos
        elif rest_pos.numel() and self.compensation:
            self._drop(rest_k, rest_v)
        self.seen += n

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Write one token ``k, v: [batch, heads, 1, head_dim]`` whose position is the device tensor ``position``
        (one long element, equal to ``seen``): its slot is computed on the device, so a CUDA graph can replay
        the write. Not with compensation (which needs the dropped token's host-side bookkeeping)."""
        assert not self.compensation and self.window > 0, "append_at: a ring without compensation slot"
        if self.capacity < min(self.seen + 1, self.max_slots):
            raise RuntimeError("SinkWindowStore.append_at needs reserved room (HeadwiseCache.reserve)")
        slot = torch.where(position < self.sink, position, self.sink + (position - self.sink) % self.window)
        self.keys.index_copy_(2, slot, k)
        self.values.index_copy_(2, slot, v)
        self.slot_pos.index_copy_(0, slot, position)
        self.seen += 1

    def advance(self, n: int) -> None:
        """Count ``n`` tokens that a replayed CUDA graph wrote."""
        self.seen += n

    def _drop(self, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor | None = None, count: int = 0) -> None:
        """Add dropped tokens ``k, v: [batch, heads, n, head_dim]`` to the running sums; with ``weight`` ([n], 1 for
        the tokens that count, 0 otherwise) only those, ``count`` of them."""
        if self.comp_keys is None or self.comp_values is None:
            zeros = (self.batch, self.heads, 1, self.head_dim)
            self.comp_keys = torch.zeros(zeros, device=self.device, dtype=torch.float32)
            self.comp_values = torch.zeros(zeros, device=self.device, dtype=torch.float32)
        if weight is None:
            self.comp_keys += k.float().sum(dim=2, keepdim=True)
            self.comp_values += v.float().sum(dim=2, keepdim=True)
            self.dropped += k.shape[2]
            return
        w = weight[None, None, :, None]
        self.comp_keys += (k.float() * w).sum(dim=2, keepdim=True)
        self.comp_values += (v.float() * w).sum(dim=2, keepdim=True)
        self.dropped += count

    def tensors(self) -> list[torch.Tensor]:
        out = [self.keys, self.values]
        if self.comp_keys is not None and self.comp_values is not None:
            out += [self.comp_keys, self.comp_values]
        return out


class PagedStore(DenseStore):
    """``DenseStore`` + the channel-wise min and max key of every page of ``page_size`` tokens (Quest).

    ``bounds: [batch, heads, page_capacity, 2, head_dim]``: ``[..., 0, :]`` is the page's min key,
    ``[..., 1, :]`` its max, over the tokens written so far (the newest page may be partial). With
    ``bound_format="exact"`` they are kept in the KV dtype: the min/max of stored keys are themselves stored
    values, so the Quest bound stays exact. With ``"e4m3"`` they are float8 codes rounded outward, with one fp32
    scale per page row in ``bound_scales: [batch, heads, page_capacity, 2]`` (``quantize_bounds``): still
    bounds, a little looser, half the bytes, which is half of what a Quest step reads to score the pages.
    The bounds are metadata bytes the cache really holds, so ``tensors()`` includes them (one page's bounds
    are ``2 * head_dim`` values: one token slot's worth per page, half of one in e4m3).
    """

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 page_size: int = 16, bound_format: str = "exact"):
        super().__init__(batch, heads, head_dim, device, dtype)
        assert bound_format in ("exact", "e4m3"), bound_format
        self.page_size = page_size
        self.bound_format = bound_format
        self.bounds: torch.Tensor | None = None
        self.bound_scales: torch.Tensor | None = None

    @property
    def num_pages(self) -> int:
        """Pages holding at least one token."""
        return -(-self.length // self.page_size)

    def reserve(self, total: int) -> None:
        super().reserve(total)
        pages = -(-self.capacity // self.page_size)
        have = 0 if self.bounds is None else self.bounds.shape[2]
        if pages <= have:
            return
        e4m3 = self.bound_format == "e4m3"
        self.bounds = self._grown(self.bounds, (pages, 2, self.head_dim), torch.float8_e4m3fn if e4m3 else self.dtype)
        if e4m3:
            self.bound_scales = self._grown(self.bound_scales, (pages, 2), torch.float32)

    def _grown(self, old: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new ``[batch, heads, *shape]`` per-page buffer holding ``old``'s pages at the front."""
        new = torch.empty(self.batch, self.heads, *shape, device=self.device, dtype=dtype)
        if old is not None and old.shape[2]:
            new[:, :, : old.shape[2]] = old
        return new

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [batch, heads, n, head_dim]`` and refresh the bounds of every page they touch."""
        old = self.length
        super().append(k, v)
        self._refresh_bounds(old, self.length)

    def _refresh_bounds(self, start: int, end: int) -> None:
        """Recompute the bounds of the pages holding tokens ``start .. end-1`` from the stored keys (a page
        already partly filled is reduced again over all its tokens: at most ``page_size`` reads)."""
        if end <= start:
            return
        assert self.keys is not None and self.bounds is not None
        P = self.page_size
        first = start // P
        seg = self.keys[:, :, first * P : end]  # [B, H, n, D], starts on a page boundary
        n_full = seg.shape[2] // P
        parts = []
        if n_full:
            pages = seg[:, :, : n_full * P].reshape(self.batch, self.heads, n_full, P, self.head_dim)
            parts.append(torch.stack([pages.amin(dim=3), pages.amax(dim=3)], dim=3))
        tail = seg[:, :, n_full * P :]
        if tail.shape[2]:
            parts.append(torch.stack([tail.amin(dim=2), tail.amax(dim=2)], dim=2)[:, :, None])
        exact = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
        last = first + exact.shape[2]
        for buf, rows in self._stored_bounds(exact):
            buf[:, :, first:last] = rows

    def _stored_bounds(self, exact: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What to write for pages whose exact bounds are ``exact: [B, H, n, 2, D]``, as (buffer, rows) pairs to
        write at those pages: the bounds, or (e4m3) their codes, both as bytes, and their scales."""
        assert self.bounds is not None
        if self.bound_format == "e4m3":
            assert self.bound_scales is not None
            codes, scales = quantize_bounds(exact)
            return [(self.bounds.view(torch.uint8), codes.view(torch.uint8)), (self.bound_scales, scales)]
        return [(self.bounds, exact)]

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """``DenseStore.append_at`` (one token at a device position) and the bounds of its page, recomputed on the
        device over the page's tokens up to ``position``: what ``append`` writes, with no host value in the copy."""
        super().append_at(k, v, position)
        assert self.keys is not None and self.bounds is not None
        P = self.page_size
        page = torch.div(position, P, rounding_mode="floor")
        slots = page * P + torch.arange(P, device=position.device)
        toks = self.keys.index_select(2, slots.clamp(max=self.capacity - 1))  # [B, H, P, D]
        past = (slots > position)[None, None, :, None]  # slots of the page not written yet
        exact = torch.stack([toks.masked_fill(past, float("inf")).amin(dim=2),
                             toks.masked_fill(past, float("-inf")).amax(dim=2)], dim=2)[:, :, None]  # [B, H, 1, 2, D]
        for buf, rows in self._stored_bounds(exact):
            buf.index_copy_(2, page, rows)

    def page_bounds(self) -> torch.Tensor:
        """Bounds of the pages in use, ``[batch, heads, num_pages, 2, head_dim]``: a view in the KV dtype, or
        (e4m3) the codes times their scales, in fp32."""
        assert self.bounds is not None
        if self.bound_format == "e4m3":
            assert self.bound_scales is not None
            return dequantize_bounds(self.bounds[:, :, : self.num_pages], self.bound_scales[:, :, : self.num_pages])
        return self.bounds[:, :, : self.num_pages]

    def tensors(self) -> list[torch.Tensor]:
        meta = [t for t in (self.bounds, self.bound_scales) if t is not None]
        return super().tensors() + meta
