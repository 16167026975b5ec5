"""The contract every attention policy follows, and the reference attention they share.

A policy decides, for one group of KV heads of one layer, what the cache stores (``make_store``) and how the
group's query heads attend (``attend``). ``attend`` receives the chunk's queries and the chunk's new keys and
values, attends over what the store holds plus the chunk, then commits the chunk to the store. Policies know
nothing of models: only tensors, positions and their own parameters.

Shapes: ``q: [batch, q_heads, q_len, head_dim]`` (the group's query heads, GQA order: the ``r`` query heads
of KV head 0, then those of KV head 1, ...), ``k, v: [batch, kv_heads, q_len, head_dim]``.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from headwise.errors import PlanError


class KVStore(Protocol):
    """What the cache asks of every policy's store (``stores.py``: ``DenseStore``, ``SinkWindowStore``,
    ``PagedStore`` and their subclasses); a policy's ``attend`` knows its own store's full type."""

    @property
    def tokens(self) -> int:
        """Tokens written so far: the next token's position."""
        ...

    def reserve(self, total: int) -> None:
        """Allocate what ``total`` tokens will use, so decode steps (and a CUDA graph) never grow the buffers."""
        ...

    def advance(self, n: int) -> None:
        """Count ``n`` tokens that a replayed CUDA graph wrote."""
        ...

    def rewind(self, tokens: int) -> None:
        """Set the token count back to ``tokens`` (after a graph capture ran a step's host code, not the step)."""
        ...

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds (what KV bytes count)."""
        ...


@dataclass
class AttendContext:
    """What a policy may know about the call: where the chunk starts, the scale, the layer.

    ``shared`` is one dict per cache (per sequence batch), for policies whose state crosses layers
    (TidalDecode's persistent positions); ``step`` counts decode steps (Recycled Attention's refresh).
    ``kv_heads`` names the layer's KV heads this call's group holds, in the group's order (empty: unknown),
    so cross-layer state can follow a head index from layer to layer. ``position`` is set for a decode step that
    a CUDA graph will replay (``Policy.graph_decode``, ``Policy.graph_blocker``): a one-element long tensor on the device holding the
    decode token's position, which the policy must use instead of any host-side length (``start`` and the
    stores' counters are then only right at capture time). ``rope`` is the layer's RoPE inverse frequencies (fp32
    ``[rotary_dim / 2]`` on the device; None where the model's are unknown), for policies that move keys to other
    positions (``rope.rotate``). ``gate`` is the plan's learned state for this layer (SeerAttention's ``LayerGate``,
    ``policies/seer.py``), None when the plan has none.
    """

    start: int
    scale: float
    layer_idx: int = 0
    native_window: int | None = None
    shared: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    use_kernels: bool = False
    kv_heads: tuple[int, ...] = ()
    position: torch.Tensor | None = None
    gate: Any = None
    rope: torch.Tensor | None = None


@dataclass(frozen=True)
class PagedLayout:
    """Where a head's tokens sit in its pool pages (``Policy.paged_layout``): position ``p`` in slot ``p``, or, with a
    ``window``, the first ``sink`` positions in slots ``0 .. sink-1`` and the others around a ring of ``window``
    slots after them (``SinkWindowStore``'s layout). With ``select`` (Quest, ``page_topk``) every token is kept in
    slot order, each page's channel-wise min and max key are kept in *bound pages* beside its pages (in the same
    pool), and a decode step attends ``select`` pages chosen by their bounds; only a pool of ``page_size`` tokens
    per page can hold it (``pool.pool_layout``)."""

    sink: int = 0
    window: int = 0  # 0: every token, no ring
    select: int = 0  # pages attended per decode step (Quest's budget in pages); 0: every page
    page_size: int = 0  # the page size ``select`` counts in (0: any pool page size)

    @property
    def ring(self) -> int:
        """Slots a head holds at most (0: no bound)."""
        return self.sink + self.window if self.window else 0

    def slots(self, positions: torch.Tensor) -> torch.Tensor:
        """The slot of each token position (any integer tensor, computed on its device)."""
        if not self.window:
            return positions
        return torch.where(positions < self.sink, positions, self.sink + (positions - self.sink) % self.window)


@dataclass(frozen=True)
class Policy(ABC):
    """Base class: a frozen dataclass of parameters (each field documented) plus behaviour."""

    name: ClassVar[str] = "base"
    paper: ClassVar[str] = ""
    graph_decode: ClassVar[bool] = False
    """Declared once per class (as vLLM's attention backends declare CUDA-graph support): whether a decode step of
    this policy (on the kernels) can be captured in a CUDA graph and replayed. It then reads the token's position
    from ``AttendContext.position`` on the device, never a host value. A parameter that rules it out for one
    instance says why in ``graph_blocker``."""
    keeps_every_token: ClassVar[bool] = False
    """Declared once per class: whether the store holds every token's key and value as they came, in position order
    (a ``DenseStore``), so that a prefill pattern may attend the whole prefix through it (``sparse_prefill.py``)."""
    dense_prefill: ClassVar[bool] = False
    """Declared once per class: whether ``attend`` runs a chunk of several tokens as ``store.append`` of the chunk, then
    exact causal attention over every token of the store (``causal_attention`` over ``store.view()``). Under an
    engine's page pool with kernels on, such chunks of groups kept in the pool skip ``attend`` and run on the paged
    prefill kernel, which reads the pages in place (``paged_cache.prefill_over_pool``)."""

    def validate(self) -> None:  # noqa: B027 - optional hook: a policy with nothing to check keeps it
        """Raise ``PlanError`` on parameters that make no sense."""

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Policy):
                continue
            out[f.name] = value
        return out

    def to_spec(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"policy": self.name}
        params = self.params()
        if params:
            spec["params"] = params
        decode = getattr(self, "decode", None)
        if isinstance(decode, Policy):
            spec["decode"] = decode.to_spec()
        return spec

    @abstractmethod
    def kv_tokens(self, seq_len: int) -> int:
        """Token slots one KV head holds after ``seq_len`` tokens (each a key and a value in the KV dtype, for every
        policy that stores tokens densely; a policy that stores them otherwise says so in ``kv_bytes``)."""

    def kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """Bytes one KV head holds after ``seq_len`` tokens, what plans and the solver's budget count: by default
        ``kv_tokens`` slots of one key and one value of ``head_dim`` elements of ``dtype_bytes`` each."""
        return self.kv_tokens(seq_len) * 2 * head_dim * dtype_bytes

    def peak_kv_bytes(self, seq_len: int, head_dim: int, dtype_bytes: int = 2) -> int:
        """The most bytes one KV head holds at any moment while a request of ``seq_len`` tokens in all is prefilled
        and decoded in a cache reserved for it (as ``Engine.generate`` reserves), CUDA-graph decode included: what
        memory budgets must count. By default ``kv_bytes(seq_len)``: a policy whose count never falls as tokens
        arrive holds the most at the end. A policy whose bytes cycle says so (``quantized``: its full-precision
        residual shrinks each time a group becomes codes)."""
        return self.kv_bytes(seq_len, head_dim, dtype_bytes)

    @abstractmethod
    def make_store(
        self, batch: int, heads: int, head_dim: int, device: torch.device, dtype: torch.dtype
    ) -> KVStore:
        """An empty store for ``heads`` KV heads of a batch (the layout this policy needs, nothing more)."""

    @abstractmethod
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, store: Any, ctx: AttendContext
    ) -> torch.Tensor:
        """Attend the chunk's queries over ``store`` + the chunk, then commit the chunk to ``store``."""

    def short(self) -> str:
        """A few characters for tables and heatmap legends."""
        return self.name

    @property
    def position_span(self) -> int | None:
        """The largest query-key distance RoPE shows this head, whatever the context's length, or None where it
        grows with the context (every policy that attends keys at their own positions, sinks included). A plan whose
        global-attention heads all have a span within the model's trained length may run past it
        (``HeadPlan.max_context``)."""
        return None

    def paged_layout(self) -> PagedLayout | None:
        """How an engine over a page pool keeps this policy's KV (``paged_cache.py``): in the sequence's pool pages,
        laid out as the ``PagedLayout`` says, or (None, the default) in the policy's own store beside the pool. Decode
        steps of paged groups run batched, over all the step's sequences at once (``paged_cache.decode_over_pool``)."""
        return None

    def graph_blocker(self) -> str | None:
        """Why this policy's decode steps cannot be replayed from a CUDA graph (None: they can): by default its
        class's ``graph_decode``; a policy whose parameters can rule it out says which."""
        return None if self.graph_decode else f"{self.name} ({self.short()}) has no CUDA-graph decode"

    def graph_blocker_at(self, total: int, head_dim: int, dtype_bytes: int) -> str | None:
        """``graph_blocker`` for a single sequence's cache reserved for ``total`` tokens (``engine.GraphDecoder``);
        a policy whose graph decode depends on the reserved length (``quantized``) says so here."""
        return self.graph_blocker()


def check_positive(policy: Policy, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise PlanError(f"policy '{policy.name}': parameter '{key}' must be a non-negative integer, got {value!r}")


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, scale: float
) -> torch.Tensor:
    """Exact causal attention of a chunk over everything before it.

    q: [B, Hq, L, D] at positions ``q_start .. q_start+L-1``; k, v: [B, Hkv, S, D] at positions ``0 .. S-1``
    with ``S == q_start + L``. Returns [B, Hq, L, D].
    """
    L, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if L == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if L == 1:
        return decode_sdpa(q, k, v, scale)
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and L + q_start == S:
        # A prompt chunk after the first on a GPU. As a boolean mask, this causal pattern keeps SDPA off flash (no
        # masks) and, with GQA, off the efficient kernel (no GQA in torch 2.11): SDPA's math path, with [Hq, L, S]
        # score tensors written and read several times (transformers' sdpa_attention.use_gqa_in_sdpa avoids the
        # same fallback). As a CausalBias aligned to the bottom right, SDPA hands it to flash, GQA and all
        # (bench/dense_chunk_attention.py measures both on the device). fp32 keeps the mask (flash takes no fp32).
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(L, S), scale=scale, enable_gqa=gqa)
    q_pos = torch.arange(q_start, q_start + L, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def decode_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One decode query ``q: [B, Hq, 1, D]`` over every key of ``k, v: [B, Hkv, S, D]``, by PyTorch SDPA.

    On CUDA it asks for the flash backend by name. Left to choose, SDPA took 58 ms per call on an H100 (torch
    2.11) whenever the cache length changed from the previous call, as it does at every decode step, against
    0.1 ms at a fixed length; with the flash (or cuDNN) backend named, a new length costs nothing
    (bench/results/sdpa_backends_2026-11-23.json). Inputs flash cannot take (fp32, head_dim > 256) go to
    SDPA's own choice."""
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
        except RuntimeError:  # flash declined these inputs: SDPA chooses
            pass
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)


def kernel_decode(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, length: int, scale: float,
    table: torch.Tensor | None = None, page_size: int = 64, position: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode query ``q: [B, Hq, 1, D]`` on the Triton paged decode kernel over a per-head cache
    ``keys, values: [B, Hkv, capacity, D]`` (slots ``< length`` valid): every slot, or the pages of ``table``
    (``kernels/paged_decode.py``). Returns ``[B, Hq, 1, D]``. With ``position`` (the decode token's position on
    the device, ``AttendContext.position``) the valid slots are ``min(position + 1, length)``, read by the kernel
    when it runs, so a CUDA graph can replay the call; ``length`` is then the limit the launch is sized for.
    Triton is imported only when kernels are asked for."""
    from headwise.kernels.common import DeviceLength
    from headwise.kernels.paged_decode import sparse_decode

    n: int | DeviceLength = length if position is None else DeviceLength(position, 1, length)
    return sparse_decode(q[:, :, 0], keys, values, n, table, None, page_size, scale).unsqueeze(2)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``x[..., idx[..., i], :]``: rows (the second-to-last dimension) of ``x: [..., S, D]`` chosen per leading index
    by ``idx: [..., n]``."""
    return x.gather(-2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Attention under an explicit boolean mask ``[L, S]`` or ``[B, Hq or 1, L, S]`` (True = attend; a size-1 ``L``
    broadcasts).

    Grouped-query inputs are folded, not repeated: the ``group`` query heads that share a KV head become
    ``group * L`` query rows of that KV head (``[B, Hkv, group * L, D]``, a view of a contiguous ``q``) and the mask
    is laid out to match, so SDPA sees one head per KV head and no GQA. SDPA's efficient and cuDNN kernels take a mask
    but not GQA (torch 2.11), and flash takes no mask; with both, SDPA ran its math path, writing and reading
    ``[Hq, L, S]`` fp32 score tensors several times. Repeating K and V to the query heads (what this did before)
    wrote ``(group - 1)`` x their bytes per call (a streaming head group's 8192-token chunk at Llama-3-8B shapes:
    ~0.15 ms per layer on an H200, `bench/results/prefill_step_breakdown_h200_run11_c8192_l32_2026-12-04.json`); the
    folded mask costs ``group`` x a boolean ``[L, S]``. Each output row is its own softmax either way."""
    B, Hq, L, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    if group == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    S = k.shape[2]
    if mask.dim() == 2:
        folded = mask.expand(L, S).repeat(group, 1)  # [group * L, S]: row g * L + l is query head g's row l
    else:
        Bm, Hm = mask.shape[0], mask.shape[1]
        if Hm == 1:
            folded = mask.expand(Bm, 1, L, S).repeat(1, 1, group, 1)
        else:
            folded = mask.expand(Bm, Hq, L, S).reshape(Bm, Hkv, group * L, S)
    out = F.scaled_dot_product_attention(q.reshape(B, Hkv, group * L, D), k, v, attn_mask=folded, scale=scale)
    return out.reshape(B, Hq, L, D)  # a copy only where SDPA returned a layout that does not split so
