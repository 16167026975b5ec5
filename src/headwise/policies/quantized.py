"""``quantized``: every token kept, the old ones as 8- or 4-bit codes (KIVI), the recent ones in full precision.

KIVI (Liu et al., 2024, https://arxiv.org/abs/2402.02750): keys quantized per channel, values per token, with a
full-precision residual of the most recent tokens; the codes, fp16 scales and zero points are in
``kernels/kv_quant.py``. A ``quantized`` head attends exactly like ``full`` over the dequantized cache, so no
token becomes unreachable, at about ``0.5 + scales`` (8-bit) or ``0.25 + scales`` (4-bit) of a 16-bit dense
head's bytes: with the default ``group=32``, 0.5625 and 0.3125 at long lengths (``kv_bytes``).

How this differs from KIVI:
- *When tokens leave the residual.* The store keeps positions ``0 .. Q-1`` quantized with
  ``Q = floor(max(0, n - residual) / group) * group``, so the residual holds the last ``residual`` to
  ``residual + group - 1`` tokens; keys *and* values leave it together, a whole group at a time (KIVI streams
  values out token by token and keeps up to ``residual`` keys). One boundary serves both, and the kernel walks
  one run of quantized tokens then one run of residual tokens.
- *The residual is held at its exact size*, reallocated when it changes (a copy of at most
  ``residual + group`` tokens per step, like the ``streaming`` reference path's), rather than as a fixed buffer of
  ``residual + group - 1`` slots: with a fixed buffer the first quantized groups would sit next to a full-size
  residual, and for lengths just past ``residual + group`` the head would hold more bytes than dense.
- *Prefill* attends over the stored (quantized) past plus the chunk in full precision, then commits the chunk
  (KIVI's prefill is full precision too); so results depend on the chunk size only through which tokens are
  already quantized when a later chunk attends.

Paths: plain PyTorch reference (dequantize, then exact causal attention: ``causal_attention``) for prefill and
decode everywhere; a decode step with kernels runs the Triton kernel ``kernels.quant_decode.quant_decode``
(dequantization in registers, flash-decoding, the residual in the same launch). No CUDA-graph decode
(``graph_decode`` is False): the store's counters and the residual's size are host-side.

On a native sliding-window layer (Gemma 3) ``quantized`` keeps, and attends, the whole context, which the
model's own window would hide: the solver offers it on global layers only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.kv_quant import (
    SCALE_DTYPE,
    QuantizedKV,
    packed_dim,
    quantize_keys,
    quantize_values,
)
from headwise.policies.base import AttendContext, Policy, causal_attention


@dataclass(frozen=True)
class Quantized(Policy):
    name: ClassVar[str] = "quantized"
    paper: ClassVar[str] = "https://arxiv.org/abs/2402.02750"
    # A step's residual is reallocated at its new size and groups leave it by host-side counts, so a CUDA graph
    # cannot replay it (``engine.GraphDecoder`` runs such plans eagerly); old tokens are codes, not their keys.
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

    def validate(self) -> None:
        for key in ("bits", "group", "residual"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PlanError(f"policy 'quantized': parameter '{key}' must be an integer, got {value!r}")
        if self.bits not in (4, 8):
            raise PlanError(f"policy 'quantized': 'bits' must be 8 or 4, got {self.bits}")
        if self.group < 8:
            raise PlanError(f"policy 'quantized': 'group' must be at least 8 (scales cost 4 bytes per group), "
                            f"got {self.group}")
        if self.residual < 1:
            raise PlanError(f"policy 'quantized': 'residual' must be at least 1 (the decoded token), got {self.residual}")

    def quantized_length(self, seq_len: int) -> int:
        """Tokens held as codes after ``seq_len`` tokens: whole groups older than the residual."""
        return max(0, seq_len - self.residual) // self.group * self.group

    def kv_tokens(self, seq_len: int) -> int:
        """Every token is kept (and reachable); the memory they take is ``kv_bytes``."""
        return seq_len

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Bytes of the store after ``seq_len`` tokens (what ``QuantizedStore.tensors`` holds when reserved for that
        length): K and V codes, key params per group of tokens, value params per token, the residual in the KV
        dtype."""
        nq = self.quantized_length(seq_len)
        codes = 2 * nq * packed_dim(head_dim, self.bits)
        params = 2 * SCALE_DTYPE.itemsize * (nq // self.group * head_dim + nq * -(-head_dim // self.group))
        return codes + params + 2 * (seq_len - nq) * head_dim * dtype_bytes

    def short(self) -> str:
        return f"int{self.bits}g{self.group}r{self.residual}"

    def make_store(self, batch, heads, head_dim, device, dtype) -> QuantizedStore:
        return QuantizedStore(batch, heads, head_dim, device, dtype, self)

    def attend(self, q, k, v, store: QuantizedStore, ctx: AttendContext) -> torch.Tensor:
        if q.shape[2] == 1 and ctx.use_kernels:
            # A decode step on the kernel: the token goes to the residual (``residual >= 1``), then one launch over
            # the codes (dequantized in registers) and the residual.
            from headwise.kernels.quant_decode import quant_decode

            store.append(k, v)
            return quant_decode(q[:, :, 0], store.quantized(), store.res_k, store.res_v, store.res_k.shape[2],
                                ctx.scale).unsqueeze(2)
        keys, values = store.view()
        out = causal_attention(q, torch.cat([keys, k], dim=2), torch.cat([values, v], dim=2), ctx.start, ctx.scale)
        store.append(k, v)
        return out


class QuantizedStore:
    """A ``quantized`` head group's cache: codes and params of the oldest tokens, the newest in full precision.

    ``k_codes, v_codes: [batch, heads, capacity, packed_dim]`` uint8, ``k_scale, k_zero: [batch, heads,
    capacity / group, head_dim]`` and ``v_scale, v_zero: [batch, heads, capacity, ceil(head_dim / group)]``
    fp16, first ``n_quant`` tokens valid; ``res_k, res_v: [batch, heads, length - n_quant, head_dim]`` in the KV
    dtype, exactly sized. ``reserve`` allocates the codes for a known total length (the residual is never
    reserved: its size changes as groups leave it)."""

    def __init__(self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype,
                 policy: Quantized):
        self.batch, self.heads, self.head_dim = batch, heads, head_dim
        self.device, self.dtype, self.policy = device, dtype, policy
        self.bits, self.group = policy.bits, policy.group
        self.length = 0  # tokens held
        self.n_quant = 0  # of which quantized
        self.capacity = 0  # quantized tokens allocated
        self._alloc(0)
        self.res_k = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)
        self.res_v = torch.empty(batch, heads, 0, head_dim, device=device, dtype=dtype)

    def _alloc(self, tokens: int) -> None:
        """(Re)allocate the quantized buffers for ``tokens`` tokens (a multiple of ``group``), keeping what is held."""
        B, H, D, G = self.batch, self.heads, self.head_dim, self.group
        shapes = {"k_codes": ((tokens, packed_dim(D, self.bits)), torch.uint8),
                  "v_codes": ((tokens, packed_dim(D, self.bits)), torch.uint8),
                  "k_scale": ((tokens // G, D), SCALE_DTYPE), "k_zero": ((tokens // G, D), SCALE_DTYPE),
                  "v_scale": ((tokens, -(-D // G)), SCALE_DTYPE), "v_zero": ((tokens, -(-D // G)), SCALE_DTYPE)}
        n = self.n_quant
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

    def advance(self, n: int) -> None:
        """Never called: no CUDA graph writes this store (``Quantized.graph_decode`` is False)."""
        raise RuntimeError("a quantized store is not written by CUDA graphs (Quantized.graph_decode is False)")

    def rewind(self, tokens: int) -> None:
        """Only to the count it holds: a quantized store's decode never runs under a graph capture, and codes
        already written cannot be taken back."""
        if tokens != self.length:
            raise RuntimeError(f"a quantized store cannot rewind from {self.length} to {tokens} tokens")

    def reserve(self, total: int) -> None:
        """Allocate the codes ``total`` tokens will need (exact: no over-allocation when the length is known)."""
        need = self.policy.quantized_length(total)
        if need > self.capacity:
            self._alloc(need)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append ``k, v: [batch, heads, n, head_dim]``; whole groups older than the residual become codes."""
        n = k.shape[2]
        new_q = self.policy.quantized_length(self.length + n)
        flush = new_q - self.n_quant  # the oldest ``flush`` tokens of residual + chunk
        if flush:
            if new_q > self.capacity:  # grow by doubling when no room was reserved, as DenseStore does
                self._alloc(max(new_q, 2 * self.capacity // self.group * self.group))
            old = self.res_k.shape[2]
            fk = torch.cat([self.res_k, k[:, :, : max(0, flush - old)]], dim=2)[:, :, :flush]
            fv = torch.cat([self.res_v, v[:, :, : max(0, flush - old)]], dim=2)[:, :, :flush]
            a, b, G = self.n_quant, new_q, self.group
            self.k_codes[:, :, a:b], self.k_scale[:, :, a // G : b // G], self.k_zero[:, :, a // G : b // G] = (
                quantize_keys(fk, self.bits, G))
            self.v_codes[:, :, a:b], self.v_scale[:, :, a:b], self.v_zero[:, :, a:b] = quantize_values(fv, self.bits, G)
            # The residual keeps positions new_q .. length + n - 1: the old residual's from index ``flush`` on, the
            # chunk's from position new_q on.
            start = max(0, new_q - self.length)
            self.res_k = torch.cat([self.res_k[:, :, min(flush, old) :], k[:, :, start:]], dim=2)
            self.res_v = torch.cat([self.res_v[:, :, min(flush, old) :], v[:, :, start:]], dim=2)
            self.n_quant = new_q
        else:
            self.res_k = torch.cat([self.res_k, k], dim=2)
            self.res_v = torch.cat([self.res_v, v], dim=2)
        self.length += n

    def quantized(self) -> QuantizedKV:
        """The quantized part, for the kernel (views of the buffers, ``n_quant`` tokens valid)."""
        return QuantizedKV(self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero,
                           self.n_quant, self.bits, self.group)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every held token dequantized (a copy) followed by the residual: ``[batch, heads, length, head_dim]``."""
        keys, values = self.quantized().dequantize(self.head_dim, self.dtype)
        return torch.cat([keys, self.res_k], dim=2), torch.cat([values, self.res_v], dim=2)

    def tensors(self) -> list[torch.Tensor]:
        return [self.k_codes, self.k_scale, self.k_zero, self.v_codes, self.v_scale, self.v_zero, self.res_k, self.res_v]
