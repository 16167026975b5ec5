"""What the sparse prefill patterns (``a_shape``, ``vertical_slash``, ``block_topk``) share.

A prefill pattern decides which key blocks each query block of a multi-token chunk attends; everything else
is its *decode policy*'s: the store, ``kv_tokens``, and one-token steps. Semantics are block-level and
absolute: a query at position ``p`` may attend key ``j <= p`` iff ``j``'s block (``j // block_size``) is in the
set the pattern gives ``p``'s block. Each pattern defines that set once, as block indices (``build_index``;
``a_shape`` also as a closed-form ``mask_mod``), and the same indices drive

- the reference (CPU, or ``use_kernels=False``): ``indices_to_mask`` -> boolean mask -> SDPA;
- the Triton kernel (CUDA with ``use_kernels``): ``kernels/block_sparse.py``, which reads the indices
  (a head_dim the kernel lacks falls back to the reference, with a logged warning);
- the FlexAttention ``BlockMask`` (``kernels/prefill_index.flex_block_mask``) and the pictures
  (``draw_mask``).

Storage rule: a pattern attends over the *whole* prefix during prefill, so its decode policy must keep
every token (``Policy.keeps_every_token``: ``full``, ``page_topk``, ``tidal``, ``recycled``). A streaming decode
policy would have to hold the full cache during prefill and drop it afterwards, defeating the memory
budget it is chosen for; such a plan is refused with ``PlanError`` (give streaming heads the
``streaming`` policy, whose prefill is already DuoAttention's A-shape).

A one-token chunk is a decode step whatever the phase (the decode policy attends it), so chunked prefill
equals one-shot prefill for ``a_shape`` as long as no chunk is a single token; ``vertical_slash`` and
``block_topk`` estimate their indices per chunk, so their choice depends on the chunking by design.

Layers with a native sliding window (Gemma 3's local layers) already run their own window; a pattern there
is refused at attention time.
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.prefill_index import indices_to_mask
from headwise.policies.base import AttendContext, PagedLayout, Policy, masked_attention
from headwise.policies.full import Full
from headwise.policies.stores import DenseStore

log = logging.getLogger(__name__)


def check_block_size(policy: Policy, block_size: Any) -> None:
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 16 or block_size & (block_size - 1):
        raise PlanError(
            f"policy '{policy.name}': 'block_size' must be a power of two of at least 16 (kernel tiles), got {block_size!r}"
        )


@dataclass(frozen=True)
class DecodeDelegate:
    """For a prefill-only policy with a ``decode`` policy: storage, memory, graph support and paging are the decode
    policy's (``PrefillPattern``, ``hyper.Hyper``)."""

    decode: Policy

    def kv_tokens(self, seq_len: int) -> int:
        return self.decode.kv_tokens(seq_len)

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        return self.decode.kv_bytes(seq_len, head_dim, dtype_bytes)

    def peak_kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        return self.decode.peak_kv_bytes(seq_len, head_dim, dtype_bytes)

    def make_store(self, batch, heads, head_dim, device, dtype) -> Any:
        return self.decode.make_store(batch, heads, head_dim, device, dtype)

    def graph_blocker(self) -> str | None:
        return self.decode.graph_blocker()

    def graph_blocker_at(self, total: int, head_dim: int, dtype_bytes: int) -> str | None:
        return self.decode.graph_blocker_at(total, head_dim, dtype_bytes)

    def paged_layout(self) -> PagedLayout | None:
        return self.decode.paged_layout()


class PrefillPattern(DecodeDelegate, Policy):
    """Base of the sparse prefill patterns. Subclasses are frozen dataclasses with ``block_size`` and
    ``decode`` fields and implement ``build_index``."""

    block_size: int = 64
    decode: Policy = field(default_factory=Full)
    keeps_every_token: ClassVar[bool] = True  # ``validate`` holds the decode policy to it
    graph_decode: ClassVar[bool] = True  # a one-token step is the decode policy's: ``graph_blocker`` asks it

    def validate(self) -> None:
        check_block_size(self, self.block_size)
        if not isinstance(self.decode, Policy):
            raise PlanError(f"policy '{self.name}': 'decode' must be a policy, got {self.decode!r}")
        if isinstance(self.decode, PrefillPattern):
            raise PlanError(f"policy '{self.name}': the decode policy cannot itself be a prefill pattern")
        if not self.decode.keeps_every_token:
            raise PlanError(
                f"policy '{self.name}': decode policy '{self.decode.name}' does not keep the full cache, but a "
                f"prefill pattern attends over the whole prefix; use decode 'full' or 'page_topk' "
                f"(or the 'streaming' policy alone, whose prefill is already A-shape)"
            )

    def decode_suffix(self) -> str:
        return "" if isinstance(self.decode, Full) else f"|{self.decode.short()}"

    # ---------------------------------------------------------------- the pattern
    @abstractmethod
    def build_index(
        self, q: torch.Tensor, keys: torch.Tensor, q_offset: int, scale: float
    ) -> tuple[torch.Tensor, ...]:
        """Block index of a chunk (plan step): q [B, Hq, L, D] at positions ``q_offset ..``; keys [B, Hkv, S, D]
        (store + chunk, ``S = q_offset + L``). Returns block_idx int32 [Bi, Hi, n_q_blocks, M] and block_count
        int32 [Bi, Hi, n_q_blocks] (``kernels/block_sparse.py``: format; Bi in {1, B}, Hi in {1, Hkv, Hq}), and a
        pattern with token columns also col_idx and col_count in the same format (single keys, not blocks)."""

    def index(self, q: torch.Tensor, keys: torch.Tensor, ctx: AttendContext) -> tuple[torch.Tensor, ...]:
        """The index ``attend`` uses: ``build_index`` at the chunk's start (``seer`` also reads the context's gate):
        block_idx and block_count, then col_idx and col_count where the pattern has token columns
        (``vertical_slash``'s ``columns="tokens"``)."""
        return self.build_index(q, keys, ctx.start, ctx.scale)

    def mask(self, q: torch.Tensor, keys: torch.Tensor, q_offset: int, scale: float) -> torch.Tensor:
        """The pattern as a dense token mask bool [Bi, Hi, L, S] (reference and pictures)."""
        idx, count, *cols = self.build_index(q, keys, q_offset, scale)
        return indices_to_mask(idx, count, self.block_size, q.shape[2], keys.shape[2], q_offset, *cols)

    def attend(self, q, k, v, store: Any, ctx: AttendContext) -> torch.Tensor:
        if q.shape[2] == 1:
            return self.decode.attend(q, k, v, store, ctx)
        if ctx.native_window is not None:
            raise PlanError(
                f"policy '{self.name}' on layer {ctx.layer_idx}: the layer has a native sliding window of "
                f"{ctx.native_window} tokens; use prefill patterns on global-attention layers only"
            )
        if not isinstance(store, DenseStore):
            raise PlanError(f"policy '{self.name}': the decode policy's store must keep every token")
        store.append(k, v)  # the decode policy's store commits (Quest's page bounds included)
        keys, values = store.view()
        idx, count, *cols = self.index(q, keys, ctx)  # cols: a pattern's token columns, if it has them
        if ctx.use_kernels and q.is_cuda:
            from headwise.kernels.block_sparse import SUPPORTED_HEAD_DIMS, block_sparse_attention  # Triton

            if q.shape[-1] in SUPPORTED_HEAD_DIMS:
                return block_sparse_attention(q, keys, values, idx, count, self.block_size, ctx.start, ctx.scale,
                                              None, *cols)
            _warn_once(f"block-sparse kernel has no head_dim {q.shape[-1]} (has {SUPPORTED_HEAD_DIMS}); "
                       f"policy '{self.name}' uses the masked-SDPA reference")
        mask = indices_to_mask(idx, count, self.block_size, q.shape[2], keys.shape[2], ctx.start, *cols)
        if mask.shape[1] not in (1, q.shape[1]):  # per-KV-head index: one mask per query head
            mask = mask.repeat_interleave(q.shape[1] // mask.shape[1], dim=1)
        return masked_attention(q, keys, values, mask, ctx.scale)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def draw_mask(mask: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Save a picture of a token mask ``[L, S]`` (True = attended) as PNG; long masks are max-pooled to at
    most 512 x 512 pixels so isolated columns and diagonals stay visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = mask.float()[None, None]
    f = max(1, -(-max(m.shape[-2:]) // 512))
    if f > 1:
        m = torch.nn.functional.max_pool2d(m, f, ceil_mode=True)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(m[0, 0].numpy(), cmap="Greys", interpolation="nearest", aspect="auto")
    ax.set_xlabel("key position" + (f" (/{f})" if f > 1 else ""))
    ax.set_ylabel("query position" + (f" (/{f})" if f > 1 else ""))
    if title:
        ax.set_title(title)
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
