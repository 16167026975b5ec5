"""``quantized``: every token kept, the old ones as 8-, 4- or 2-bit codes (KIVI), the recent ones in full precision.

KIVI (Liu et al., 2024, https://arxiv.org/abs/2402.02750): keys quantized per channel, values per token, with a
full-precision residual of the most recent tokens; the codes, fp16 scales and zero points are in
``kernels/kv_quant.py``. A ``quantized`` head attends exactly like ``full`` over the dequantized cache, so no
token becomes unreachable, at about ``0.5 + scales`` (8-bit), ``0.25 + scales`` (4-bit) or ``0.125 + scales``
(2-bit, KIVI-2) of a 16-bit dense head's bytes: with the default ``group=32``, 0.5625, 0.3125 and 0.1875 at long
lengths (``kv_bytes``).

How this differs from KIVI:
- *When tokens leave the residual.* The store keeps positions ``0 .. Q-1`` quantized with
  ``Q = floor(max(0, n - residual) / group) * group``, so the residual holds the last ``residual`` to
  ``residual + group - 1`` tokens; keys *and* values leave it together, a whole group at a time (KIVI streams
  values out token by token and keeps up to ``residual`` keys). One boundary serves both, and the kernel walks
  one run of quantized tokens then one run of residual tokens.
- *The residual is held at its exact size* on eager steps, reallocated when it changes (a copy of at most
  ``residual + group`` tokens per step, like the ``streaming`` reference path's), rather than as a fixed buffer of
  ``residual + group - 1`` slots: with a fixed buffer the first quantized groups would sit next to a full-size
  residual, and for lengths just past ``residual + group`` the head would hold more bytes than dense. CUDA-graph
  decode (below) uses the fixed buffer, only where it cannot. For the same reason a store reserved for such a
  length (where graph decode is blocked) grows its codes as groups arrive instead of reserving them up front.

Memory: ``kv_bytes(n)`` is what the store holds after ``n`` tokens; it is least where ``n - residual`` is a multiple
of ``group`` (the residual at ``residual`` tokens) and up to ``group - 1`` slots more elsewhere. A request of ``n``
tokens passes through those lengths, and CUDA-graph decode holds the largest residual at every step, so budgets count
``peak_kv_bytes(n)``: the codes room and the largest residual (``graph_bytes`` where graph decode may run; else the
most ``kv_bytes`` up to ``n``). Never more than dense at ``n``.
- *Prefill* attends over the stored (quantized) past plus the chunk in full precision, then commits the chunk
  (KIVI's prefill is full precision too); so results depend on the chunk size only through which tokens are
  already quantized when a later chunk attends.

Paths: plain PyTorch reference (dequantize, then exact causal attention: ``causal_attention``, or with a window
``masked_attention`` under the sliding mask) for prefill and decode everywhere; a decode step with kernels runs the
Triton kernel ``kernels.quant_decode.quant_decode`` (dequantization in registers, flash-decoding, the residual in the
same launch; with a window, from the first visible token on).

CUDA-graph decode (``engine.GraphDecoder``, one sequence, a reserved cache): where the codes room for the reserved
length plus a fixed residual of ``residual + group - 1`` slots hold no more bytes than a dense head reserved for
that length (``Quantized.graph_blocker_at``; else the steps stay eager, and ``HeadwiseCache.graph_blockers`` says
why), the store switches to the fixed residual (``QuantizedStore.append_at``). A step then writes its token at
the residual row ``position - n_quant`` computed on the device, and the kernel reads the valid lengths (and a
window's first visible token) from the decode position and the store's ``bounds`` tensor, the launch sized for the
buffers. Groups leave the residual (and the window) on the host between replays: the graph decoder counts each
replayed token (``advance``), and the store, knowing the next position, quantizes the due group and shifts the
residual in place (``_settle``), the same codes and the same tokens an eager step quantizes (they are all older
than the token being written). Results are those of the eager kernel path up to the split order of the
flash-decoding sums. The pool's batched graphs do not run quantized heads (``graph_blocker``).

Sliding windows (``window``): on a native sliding-window layer (Gemma 3: 512 tokens) plan resolution
(``plan.resolve``, through ``for_native_window``) gives the head the layer's window, as it gives ``full`` one. A
query at position ``p`` then attends key ``j`` iff ``p - j < window`` (transformers' sliding mask, and what
``full`` computes on that layer), token for token, over the dequantized codes and the residual. A group of codes is
dropped once all of its ``group`` tokens are outside the window, so the head holds ``min(T, window)`` visible
tokens plus at most ``group - 1`` older ones at the start of the oldest kept group (never attended). Resolution
keeps such a head within the bytes of the window held densely at every length: if the store's codes room plus its
largest residual (``residual + group - 1`` tokens) could exceed ``window`` dense slots, the residual is shortened
to the longest that fits (KIVI's 128 fits Gemma 3's 512 at 4 and 8 bits), and where none does the head keeps the
window in full precision (``streaming(sink=0, window)``, what ``full`` resolves to). A 4-bit head on a 512-token
window holds ``(384 * 0.3125 + 128..159) / 512``, 0.48 to 0.55 of the window's dense bytes (head_dim 256, bf16).
A plan may also set ``window`` on a global layer: a quantized sliding window without sinks (resolution checks its
bytes the same way). Dropping a group moves the kept codes to the front of their buffers (at most ``window``
tokens' codes, once per ``group`` tokens), so the kernel reads the held codes from index 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.kv_quant import (
    BITS,
    SCALE_DTYPE,
    QuantizedKV,
    dequantize_keys,
    dequantize_values,
    packed_dim,
    quantize_into,
    quantize_keys,
    quantize_values,
)
from headwise.policies.base import AttendContext, Policy, causal_attention, masked_attention
from headwise.policies.streaming import Streaming


@dataclass(frozen=True)
class Quantized(Policy):
    name: ClassVar[str] = "quantized"
    paper: ClassVar[str] = "https://arxiv.org/abs/2402.02750"
    # Not in general: a single sequence's reserved cache replays its decode steps from a CUDA graph when a fixed
    # residual fits (``graph_blocker_at``); the pool's batched graphs do not (``graph_blocker``). Old tokens are
    # codes, not their keys.
    graph_decode: ClassVar[bool] = False
    keeps_every_token: ClassVar[bool] = False

    bits: int = 8
    """Bits per code: 8 (about half of a 16-bit cache's bytes) or 4 (about a quarter; two codes per byte)."""
    group: int = 32
    """KIVI's group size G: keys share a scale and zero point per channel over ``group`` consecutive tokens,
    values per token over ``group`` consecutive channels. KIVI uses 32. At least 8, so that a quantized token
    always takes fewer bytes than a 16-bit one."""
    residual: int = 128
    """KIVI's residual length R: the most recent tokens kept in full precision (at least this many once the
    sequence is longer, fewer than ``residual + group``). KIVI uses 128. At least 1 (the decoded token itself)."""
    window: int = 0
    """0: every token is kept and attended. ``W``: only the last ``W`` positions, the query's own included
    (``p - j < W``), as a native sliding-window layer attends; filled in by plan resolution on such layers (module
    docstring). At least ``residual + group``, so that the residual never reaches outside the window."""
    key_bits: int = 0
    """Bits per key code, where keys need more than values: 0 (``bits`` for both), or e.g. 8 over 4-bit values or 4
    over 2-bit ones.
    KIVI finds keys the harder half to quantize (outlier channels); a head that tells similar keys apart (the
    multi-key needle's distractors) may need 8-bit keys where 4-bit values suffice. 8-bit keys and 4-bit values
    take about 0.44 of a 16-bit cache's bytes, between 4 bits (0.31) and 8 (0.56)."""


    def validate(self) -> None:
        for key in ("bits", "group", "residual"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"policy 'quantized': parameter '{key}' must be an integer, got {value!r}")
        if self.bits not in BITS:
            raise PlanError(f"policy 'quantized': 'bits' must be 8, 4 or 2, got {self.bits}")
        if self.key_bits not in (0, *BITS) or isinstance(self.key_bits, bool):
            raise PlanError(f"policy 'quantized': 'key_bits' must be 0 (as 'bits'), 2, 4 or 8, got {self.key_bits!r}")
        if self.group < 8:
            raise PlanError(f"policy 'quantized': 'group' must be at least 8 (scales cost 4 bytes per group), "
                            f"got {self.group}")
        if self.residual < 1:
            raise PlanError(f"policy 'quantized': 'residual' must be at least 1 (the decoded token), got {self.residual}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise PlanError(f"policy 'quantized': 'window' must be a non-negative integer (0: no window), "
                            f"got {self.window!r}")
        if self.window and self.window < self.residual + self.group:
            raise PlanError(f"policy 'quantized': 'window' ({self.window}) must be at least residual + group "
                            f"({self.residual} + {self.group}), or 0 for no window; lower 'residual'")

    def params(self) -> dict[str, Any]:
        """Without a window, the parameters plans wrote before windows existed (so their digests stay the same)."""
        out = super().params()
        if not self.window:
            del out["window"]
        if not self.key_bits:
            del out["key_bits"]
        return out

    @property
    def k_bits(self) -> int:
        """Bits per key code (``key_bits``, or ``bits`` when 0)."""
        return self.key_bits or self.bits

    @property
    def bits_label(self) -> str:
        """``int2``, ``int4``, ``int8``, or ``k8v4`` / ``k4v2`` where keys and values differ."""
        return f"int{self.bits}" if self.k_bits == self.bits else f"k{self.k_bits}v{self.bits}"

    def quantized_length(self, seq_len: int) -> int:
        """Tokens held as codes after ``seq_len`` tokens: whole groups older than the residual."""
        return max(0, seq_len - self.residual) // self.group * self.group

    def dropped_length(self, seq_len: int) -> int:
        """Tokens whose codes are no longer stored after ``seq_len`` tokens: the whole groups entirely outside the
        window (0 without a window). Never more than ``quantized_length`` (``window >= residual + group``)."""
        if not self.window:
            return 0
        return min(self.quantized_length(seq_len), max(0, seq_len - self.window) // self.group * self.group)

    def codes_room(self, seq_len: int) -> int:
        """Tokens of codes a store needs room for to reach ``seq_len`` tokens: the most it holds at any length up
        to ``seq_len`` (just ``quantized_length`` without a window; with one, held codes rise until the window is
        full, then repeat with period ``group``, so the last ``group`` lengths give the maximum)."""
        if not self.window or seq_len <= self.window:
            return self.quantized_length(seq_len)
        return max(self.quantized_length(n) - self.dropped_length(n)
                   for n in range(max(self.window, seq_len - self.group + 1), seq_len + 1))

    def kv_tokens(self, seq_len: int) -> int:
        """Every token is kept (and reachable), or, with a window, the last ``window``; the memory they take is
        ``kv_bytes``."""
        return min(seq_len, self.window) if self.window else seq_len

    def codes_bytes(self, tokens: int, head_dim: int) -> int:
        """Bytes of ``tokens`` quantized tokens (a multiple of ``group``): K and V codes, key params per group of
        tokens, value params per token."""
        codes = tokens * (packed_dim(head_dim, self.k_bits) + packed_dim(head_dim, self.bits))
        return codes + 2 * SCALE_DTYPE.itemsize * (tokens // self.group * head_dim + tokens * -(-head_dim // self.group))

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Bytes of the store after ``seq_len`` tokens (what ``QuantizedStore.tensors`` holds when reserved for that
        length and filled to it): the codes room (``codes_room``) and the residual in the KV dtype."""
        residual = seq_len - self.quantized_length(seq_len)
        return self.codes_bytes(self.codes_room(seq_len), head_dim) + 2 * residual * head_dim * dtype_bytes

    def peak_kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """The most the store holds while a request reaches ``seq_len`` tokens in a cache reserved for them
        (``Policy.peak_kv_bytes``). Where CUDA-graph decode may run at that length (``graph_blocker_at``), the
        codes room is reserved up front and the residual reaches its largest, ``graph_residual`` rows (a graph holds
        them at every step, eager steps once per group): ``graph_bytes``. Elsewhere (short lengths) the codes grow
        as groups arrive (``QuantizedStore.reserve``): the most ``kv_bytes(n)`` over ``n <= seq_len``, found in the
        last ``group`` lengths (the residual cycles with period ``group``, the codes never shrink). Either way
        ``kv_bytes(seq_len)`` can be up to ``group - 1`` residual slots less: it is the least where ``seq_len -
        residual`` is a multiple of ``group``."""
        if self.graph_blocker_at(seq_len, head_dim, dtype_bytes) is None:
            return self.graph_bytes(seq_len, head_dim, dtype_bytes)
        return max(self.kv_bytes(n, head_dim, dtype_bytes) for n in range(max(1, seq_len - self.group + 1), seq_len + 1))

    def codes_attended(self, prompt_len: int, total: int, chunk: int, kernels: bool) -> list[int]:
        """Per query position ``0 .. total - 1`` of a prompt of ``prompt_len`` tokens prefilled in chunks of ``chunk``
        followed by decode steps: how many leading positions the query attends as codes (the rest exactly). A prompt
        chunk starting at ``s`` attends over the store as it was before the chunk (``quantized_length(s)``); a
        one-token step on the decode kernel appends its token first (``quantized_length(p + 1)``), on the reference
        path after attending (``quantized_length(p)``): ``attend``. For measuring the rounding without the store
        (``fake_quantize``, ``profile/select.py``)."""
        out = []
        for s in range(0, prompt_len, chunk):
            e = min(s + chunk, prompt_len)
            seen = self.quantized_length(s + 1 if kernels and e - s == 1 else s)
            out += [seen] * (e - s)
        return out + [self.quantized_length(p + 1 if kernels else p) for p in range(prompt_len, total)]

    def for_native_window(self, window: int, head_dim: int) -> Policy:
        """This head on a layer whose native sliding window is ``window`` (``plan.resolve``): the window (or its
        own, if shorter), with the residual shortened where needed so that the head never holds more than the
        window's dense bytes (module docstring); ``streaming(sink=0, window)`` where no residual fits."""
        return _in_window(self, min(self.window, window) if self.window else window, head_dim)

    @property
    def position_span(self) -> int | None:
        return self.window or None

    def graph_blocker(self) -> str | None:
        return (f"quantized ({self.short()}) decodes from a CUDA graph only in a single sequence's reserved cache "
                "(engine.GraphDecoder), not in the pool's batched graphs")

    def graph_residual(self) -> int:
        """Slots of the fixed residual of CUDA-graph decode: the most the residual ever holds."""
        return self.residual + self.group - 1

    def graph_bytes(self, total: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Bytes of a store reserved for ``total`` tokens once it decodes from a CUDA graph: the codes room and a
        fixed residual of ``graph_residual`` slots (``QuantizedStore.append_at``), at every length up to ``total``."""
        return self.codes_bytes(self.codes_room(total), head_dim) + 2 * self.graph_residual() * head_dim * dtype_bytes

    def graph_blocker_at(self, total: int, head_dim: int, dtype_bytes: int) -> str | None:
        """A cache reserved for ``total`` tokens decodes from a CUDA graph when the fixed residual keeps the head
        within the bytes a dense head (``full``, or the window held densely) holds when reserved for ``total``
        (module docstring); else the steps stay eager, with the exact-size residual."""
        dense = 2 * self.kv_tokens(total) * head_dim * dtype_bytes
        if self.graph_bytes(total, head_dim, dtype_bytes) <= dense:
            return None
        return (f"quantized ({self.short()}) reserved for {total} tokens: a fixed residual of "
                f"{self.graph_residual()} slots would hold more bytes than dense (a longer reservation allows it)")

    def short(self) -> str:
        return f"{self.bits_label}g{self.group}r{self.residual}" + (f"w{self.window}" if self.window else "")

    def make_store(self, batch, heads, head_dim, device, dtype) -> QuantizedStore:
        return QuantizedStore(batch, heads, head_dim, device, dtype, self)

    def attend(self, q, k, v, store: QuantizedStore, ctx: AttendContext) -> torch.Tensor:
        if q.shape[2] == 1 and ctx.use_kernels:
            # A decode step on the kernel: the token goes to the residual (``residual >= 1``), then one launch over
            # the codes (dequantized in registers) and the residual.
            from headwise.kernels.quant_decode import quant_decode

            if ctx.position is not None:  # for a CUDA graph: the slot and the lengths on the device
                store.append_at(k, v, ctx.position)
                return quant_decode(q[:, :, 0], store.quantized(room=True), store.res_k, store.res_v,
                                    store.res_k.shape[2], ctx.scale, position=ctx.position, bounds=store.bounds,
                                    window=self.window).unsqueeze(2)
            store.append(k, v)
            # Index 0 of the store is position ``store.first``; the window starts ``length - window`` positions in.
            first = max(0, store.length - self.window - store.first) if self.window else 0
            return quant_decode(q[:, :, 0], store.quantized(), store.res_k, store.res_v, store.n_res,
                                ctx.scale, first=first).unsqueeze(2)
        keys, values = store.view(k, v)  # what it holds, then the chunk: one concatenation each
        if self.window:
            q_pos = torch.arange(ctx.start, ctx.start + q.shape[2], device=q.device)
            k_pos = torch.arange(store.first, ctx.start + q.shape[2], device=q.device)
            diff = q_pos[:, None] - k_pos[None, :]
            out = masked_attention(q, keys, values, (diff >= 0) & (diff < self.window), ctx.scale)
        else:
            out = causal_attention(q, keys, values, ctx.start, ctx.scale)
        store.append(k, v)
        return out


def fake_quantize(k: torch.Tensor, v: torch.Tensor, policy: Quantized) -> tuple[torch.Tensor, torch.Tensor]:
    """``k, v: [batch, heads, n, head_dim]`` (``n`` a multiple of ``policy.group``) as a store holding them as codes
    gives them back (``QuantizedStore.view``): quantized with the store's functions (keys per channel over runs of
    ``group`` tokens, values per token over runs of ``group`` channels; groups aligned at position 0, as the
    store's are), then dequantized in the input dtype. The same shapes. A group's codes depend on its own tokens
    only, so the first ``m`` tokens of the result are those of any longer call's."""
    D, kb, vb, G = k.shape[-1], policy.k_bits, policy.bits, policy.group
    kc, ks, kz = quantize_keys(k, kb, G)
    vc, vs, vz = quantize_values(v, vb, G)
    return (dequantize_keys(kc, ks, kz, kb, G, D, k.dtype), dequantize_values(vc, vs, vz, vb, G, D, v.dtype))


@lru_cache(maxsize=256)
def _in_window(policy: Quantized, window: int, head_dim: int) -> Policy:
    """``Quantized.for_native_window``: the longest residual (up to the policy's) for which the codes room plus the
    largest residual (``residual + group - 1`` tokens) stays within ``window`` dense slots. Checked for 16-bit KV:
    a wider KV dtype makes dense slots dearer against the same codes, so what fits at 2 bytes fits there too."""
    slot = 2 * head_dim * 2
    for residual in range(min(policy.residual, window - policy.group), 0, -1):
        cand = replace(policy, residual=residual, window=window)
        worst = cand.codes_bytes(cand.codes_room(window + policy.group - 1), head_dim) + (residual + policy.group - 1) * slot
        if worst <= window * slot:
            return cand
    return Streaming(sink=0, window=window)


class QuantizedStore:
    """A ``quantized`` head group's cache: codes and params of the oldest tokens, the newest in full precision.

    ``k_codes, v_codes: [batch, heads, capacity, packed_dim]`` uint8, ``k_scale, k_zero: [batch, heads,
    capacity / group, head_dim]`` and ``v_scale, v_zero: [batch, heads, capacity, ceil(head_dim / group)]``
    fp16, the first ``n_quant - first`` tokens valid (positions ``first .. n_quant - 1``: ``first`` is 0 without a
    window, else the start of the oldest group with a token in it); ``res_k, res_v: [batch, heads, R, head_dim]``
    in the KV dtype, the first ``n_res = length - n_quant`` rows valid (positions ``n_quant .. length - 1``).
    Eager steps hold the residual at its exact size (``R = n_res``). ``reserve`` allocates the codes for a known
    total length. A group leaving the window is dropped by moving the codes after it to the front (at most
    ``window`` tokens' codes copied once per ``group`` tokens), so the kernel reads the held codes from index 0.

    CUDA-graph decode (``append_at``, one token at a device position) holds the residual in a fixed buffer of
    ``R = residual + group - 1`` rows (``Quantized.graph_residual``, only where ``Quantized.graph_blocker_at``
    allows it for the reserved length) and ``bounds``, a device tensor ``[first, n_quant]`` the kernel reads. A
    group leaves the residual (``_settle``: the same codes, drops and shifts an eager step makes) on the host,
    between steps: before ``append_at`` writes when it runs eagerly, and, for replays, after each replayed token
    is counted (``advance``, or ``rewind`` after the capture), so a replayed step only writes its row and attends. An eager
    ``append`` (a prefill chunk, an eager step) goes back to the exact-size residual first."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 policy: Quantized):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype, self.policy = device, dtype, policy
        self.bits, self.k_bits, self.group = policy.bits, policy.k_bits, policy.group
        self.length = 0  # tokens held
        self.n_quant = 0  # positions below this are quantized (or dropped)
        self.first = 0  # positions below this are dropped (whole groups outside the window)
        self.capacity = 0  # quantized tokens allocated
        self.reserved = 0  # the total length ``reserve`` was asked for
        self.fixed = False  # the residual is the fixed buffer of CUDA-graph decode
        self.bounds: torch.Tensor | None = None  # [first, n_quant] on the device, while ``fixed``
        self._captured = False  # a graph capture ran ``append_at``'s host code, not the write
        self._alloc(0)
        self.res_k = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.res_v = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)

    def _alloc(self, tokens: int) -> None:
        """(Re)allocate the quantized buffers for ``tokens`` tokens (a multiple of ``group``), keeping what is held."""
        B, H, D, G = self.batch, self.heads, self.head_dim, self.group
        shapes = {"k_codes": ((tokens, packed_dim(D, self.k_bits)), torch.uint8),
                  "v_codes": ((tokens, packed_dim(D, self.bits)), torch.uint8),
                  "k_scale": ((tokens // G, D), SCALE_DTYPE), "k_zero": ((tokens // G, D), SCALE_DTYPE),
                  "v_scale": ((tokens, -(-D // G)), SCALE_DTYPE), "v_zero": ((tokens, -(-D // G)), SCALE_DTYPE)}
        n = self.n_quant - self.first
        for name, (shape, dtype) in shapes.items():
            new = torch.empty(B, H, *shape, device=self.device, dtype=dtype)
            old = getattr(self, name, None)
            if old is not None and n:
                rows = n // G if name in ("k_scale", "k_zero") else n
                new[:, :, :rows] = old[:, :, :rows]
            setattr(self, name, new)
        self.capacity = tokens

    @property
    def tokens(self) -> int:
        """Tokens written so far: the next token's position."""
        return self.length

    @property
    def n_res(self) -> int:
        """Residual tokens held (the valid rows of ``res_k, res_v``)."""
        return self.length - self.n_quant

    # ``advance`` and ``rewind`` settle the fixed residual in place on the host, between steps: under inference mode,
    # as the forward that made the residual (``_fix``, ``append`` in ``Engine.forward``) ran, whoever calls them.
    @torch.inference_mode()
    def advance(self, n: int) -> None:
        """Count the token a replayed CUDA graph wrote (``append_at``), then ready the store for the next one, if
        one fits the reservation: readying a full store for a token past it would quantize a group the codes have
        no room for (the last step of a generation that runs to its length limit, on 1 of every ``group`` lengths)."""
        if not self.fixed or n != 1:
            raise RuntimeError("a quantized store counts one graph-written token at a time, after append_at")
        self.length += 1
        if self.length < self.reserved:
            self._settle(self.length + 1)

    @torch.inference_mode()
    def rewind(self, tokens: int) -> None:
        """Only to the count it holds, or back over the one token a graph capture counted (``append_at`` under a
        capture writes nothing and readies nothing): codes already written cannot be taken back."""
        if tokens == self.length - 1 and self._captured:
            self.length, self._captured = tokens, False
            self._settle(self.length + 1)  # ready for the first replay, as ``advance`` readies the later ones
        elif tokens != self.length:
            raise RuntimeError(f"a quantized store cannot rewind from {self.length} to {tokens} tokens")

    def reserve(self, total: int) -> None:
        """Allocate the codes ``total`` tokens will need (exact: no over-allocation when the length is known), where
        CUDA-graph decode may run at that length (``Quantized.graph_blocker_at``: the codes room and the largest
        residual fit in dense's bytes). Where it may not (short lengths: a 4-bit head reserved for 160 tokens would
        hold 32 tokens of codes beside a residual of 159 at position 158, more than 160 dense slots), the codes grow
        as groups arrive, exactly, so the head holds ``kv_bytes(n)`` after ``n`` tokens, never more than dense."""
        self.reserved = max(self.reserved, total)
        need = self.policy.codes_room(total)
        if need > self.capacity and self.policy.graph_blocker_at(total, self.head_dim, self.res_k.element_size()) is None:
            self._alloc(need)

    def _drop(self, new_first: int) -> None:
        """Drop the groups below ``new_first`` (they left the window): the kept codes move to the front. Positions
        ``n_quant .. new_first - 1`` (if any) are dropped unquantized."""
        G, old_q = self.group, self.n_quant
        keep_from = min(new_first, old_q) - self.first
        kept = old_q - self.first - keep_from
        if kept and keep_from:
            for name in ("k_codes", "v_codes", "v_scale", "v_zero"):
                buf = getattr(self, name)
                buf[:, :, :kept] = buf[:, :, keep_from : keep_from + kept].clone()
            for name in ("k_scale", "k_zero"):
                buf = getattr(self, name)
                buf[:, :, : kept // G] = buf[:, :, keep_from // G : (keep_from + kept) // G].clone()
        self.first = new_first
        self.n_quant = max(old_q, new_first)

    def _quantize(self, fk: torch.Tensor, fv: torch.Tensor, new_q: int) -> None:
        """Write ``fk, fv`` (positions ``n_quant .. new_q - 1``) as codes."""
        G = self.group
        need = new_q - self.first
        if need > self.capacity:
            if self.fixed:
                raise RuntimeError("a quantized store decoding from a CUDA graph needs its codes reserved")
            # Exactly within a reservation that left the codes to grow (``reserve``), else by doubling, as DenseStore.
            exact = need <= self.policy.codes_room(self.reserved)
            self._alloc(need if exact else max(need, 2 * self.capacity // G * G))
        i, j = self.n_quant - self.first, new_q - self.first  # buffer rows (index 0 is position ``first``)
        quantize_into(self.k_codes[:, :, i:j], self.k_scale[:, :, i // G : j // G], self.k_zero[:, :, i // G : j // G],
                      fk, self.k_bits, G, per_channel=True)  # on a GPU, one launch each
        quantize_into(self.v_codes[:, :, i:j], self.v_scale[:, :, i:j], self.v_zero[:, :, i:j], fv, self.bits, G,
                      per_channel=False)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [batch, heads, n, head_dim]``; whole groups older than the residual become codes, whole
        groups outside the window (if any) are dropped (those already outside it are never quantized)."""
        if self.fixed:
            self._exact()
        end = self.length + k.shape[2]
        new_q, new_first = self.policy.quantized_length(end), self.policy.dropped_length(end)
        old_q = self.n_quant
        if new_first > self.first:
            self._drop(new_first)
        if new_q == old_q:
            self.res_k = torch.cat([self.res_k, k], dim=2)
            self.res_v = torch.cat([self.res_v, v], dim=2)
            self.length = end
            return
        pend_k = torch.cat([self.res_k, k], dim=2)  # residual + chunk: positions old_q .. end - 1
        pend_v = torch.cat([self.res_v, v], dim=2)
        a = self.n_quant  # the first position to quantize now
        self._quantize(pend_k[:, :, a - old_q : new_q - old_q], pend_v[:, :, a - old_q : new_q - old_q], new_q)
        # Copies, exactly sized: a view would keep the whole of residual + chunk allocated.
        self.res_k, self.res_v = pend_k[:, :, new_q - old_q :].clone(), pend_v[:, :, new_q - old_q :].clone()
        self.n_quant, self.length = new_q, end

    # ------------------------------------------------------------------ CUDA-graph decode
    def _exact(self) -> None:
        """Back to the exact-size residual of eager steps."""
        n = self.n_res
        self.res_k, self.res_v = self.res_k[:, :, :n].clone(), self.res_v[:, :, :n].clone()
        self.fixed, self.bounds = False, None

    def _fix(self) -> None:
        """To the fixed residual of CUDA-graph decode (``Quantized.graph_blocker_at`` must allow it)."""
        why = self.policy.graph_blocker_at(self.reserved, self.head_dim, self.res_k.element_size())
        if why:
            raise RuntimeError(f"QuantizedStore.append_at: {why}")
        n, rows = self.n_res, self.policy.graph_residual()
        res_k = torch.empty(self.batch, self.heads, rows, self.head_dim, device=self.device, dtype=self.dtype)
        res_v = torch.empty_like(res_k)
        res_k[:, :, :n], res_v[:, :, :n] = self.res_k, self.res_v
        self.res_k, self.res_v, self.fixed = res_k, res_v, True
        self.bounds = torch.tensor([self.first, self.n_quant], dtype=torch.long, device=self.device)

    def _settle(self, end: int) -> None:
        """Make the fixed residual ready for a length of ``end`` tokens (the next token at ``end - 1``): drop the
        groups outside the window, quantize the groups that leave the residual and shift the rest to the front,
        as an eager ``append`` reaching ``end`` does (the tokens quantized are all older than ``end - 1``)."""
        new_q, new_first = self.policy.quantized_length(end), self.policy.dropped_length(end)
        if new_q == self.n_quant and new_first == self.first:
            return
        old_q, n = self.n_quant, self.n_res  # residual row r is position old_q + r
        if new_first > self.first:
            self._drop(new_first)
        a, gone = self.n_quant, new_q - old_q
        if new_q > a:
            self._quantize(self.res_k[:, :, a - old_q : gone], self.res_v[:, :, a - old_q : gone], new_q)
        if gone:
            self.res_k[:, :, : n - gone] = self.res_k[:, :, gone:n].clone()
            self.res_v[:, :, : n - gone] = self.res_v[:, :, gone:n].clone()
        self.n_quant = new_q
        assert self.bounds is not None
        self.bounds.copy_(torch.tensor([self.first, self.n_quant], dtype=torch.long))

    def append_at(self, k: torch.Tensor, v: torch.Tensor, position: torch.Tensor) -> None:
        """Append one token ``k, v: [batch, heads, 1, head_dim]`` at the residual row a device tensor names
        (``position``: one long element, the token's position, equal to ``length``), so a CUDA graph can replay
        the write. Outside a capture the store is first readied for the position (``_settle``); a replay finds it
        readied by ``advance`` (or, after the capture, by ``rewind``). The codes' room must be reserved and the
        fixed residual allowed for it (``Quantized.graph_blocker_at``)."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not self.fixed:
            if capturing:
                raise RuntimeError("QuantizedStore.append_at: the first graph-ready step must run eagerly")
            self._fix()
        if not capturing:
            self._settle(self.length + 1)
        assert self.bounds is not None
        row = position - self.bounds[1:]
        self.res_k.index_copy_(2, row, k)
        self.res_v.index_copy_(2, row, v)
        self.length += 1
        self._captured = capturing

    def quantized(self, room: bool = False) -> QuantizedKV:
        """The quantized part, for the kernel (views of the buffers, ``n_quant - first`` tokens valid; with
        ``room``, the whole capacity, for a launch that reads the valid count from ``bounds``)."""
        return QuantizedKV(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
                           self.capacity if room else self.n_quant - self.first, self.bits, self.group,
                           self.k_bits)

    def view(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token dequantized (a copy) followed by the residual: ``[batch, heads, length - first,
        head_dim]``, positions ``first .. length - 1``; with ``k, v``, those after them (a prompt chunk not yet
        appended), in the same copy."""
        nq, n = self.n_quant - self.first, self.n_res
        extra = k.shape[2] if k is not None and v is not None else 0
        keys = torch.empty(self.batch, self.heads, nq + n + extra, self.head_dim, device=self.device, dtype=self.dtype)
        values = torch.empty_like(keys)
        self.quantized().dequantize_into(keys[:, :, :nq], values[:, :, :nq])  # on a GPU, one launch each
        keys[:, :, nq : nq + n], values[:, :, nq : nq + n] = self.res_k[:, :, :n], self.res_v[:, :, :n]
        if extra:
            keys[:, :, nq + n :], values[:, :, nq + n :] = k, v
        return keys, values

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.res_k, self.res_v]
