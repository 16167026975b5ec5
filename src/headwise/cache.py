"""The heterogeneous KV cache: per layer, one store per group of KV heads that share a policy.

``HeadwiseCache`` is a transformers ``Cache`` (so ``model(..., past_key_values=cache)`` works and the model's
own bookkeeping, such as ``get_seq_length``, is right), but its layers do not concatenate keys in
``update``: they hold the chunk until headwise's attention function (``attention.py``) attends over the
stores plus the chunk and commits the chunk into each group's store. Every group stores only what its policy
needs: a ``full`` head grows with the sequence, a ``streaming`` head is a fixed ring buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from headwise.plan import HeadPlan, resolve
from headwise.policies import Policy
from headwise.policies.base import KVStore
from headwise.spec import ModelSpec

if TYPE_CHECKING:
    from headwise.pool import GroupPages, SequencePages


@dataclass
class HeadGroup:
    """KV heads of one layer sharing one policy (equal policies are grouped, so one kernel call each)."""

    policy: Policy
    kv_heads: list[int]
    q_index: torch.Tensor  # query heads of these KV heads, GQA order
    kv_index: torch.Tensor
    store: KVStore | None = None
    pages: GroupPages | None = None  # its pool pages, under an engine's page pool (``paged_cache.py``)
    kv_range: tuple[int, int] | None = None  # ``kv_heads`` as ``range(*kv_range)`` when consecutive

    def heads_of(self, x: torch.Tensor, per_kv: int = 1) -> torch.Tensor:
        """This group's heads of ``x: [B, H, ...]`` (``per_kv`` heads per KV head: the group size for queries): a
        view when they are consecutive (no copy), else a gather."""
        if self.kv_range is not None:
            a, b = self.kv_range
            return x[:, a * per_kv : b * per_kv]
        return x.index_select(1, self.q_index if per_kv > 1 else self.kv_index)

    def write_heads(self, out: torch.Tensor, res: torch.Tensor) -> None:
        """Put this group's query heads' output ``res`` into ``out: [B, Hq, ...]``."""
        if self.kv_range is not None:
            G = res.shape[1] // (self.kv_range[1] - self.kv_range[0])
            out[:, self.kv_range[0] * G : self.kv_range[1] * G] = res
        else:
            out.index_copy_(1, self.q_index, res)


class HeadwiseLayer(CacheLayerMixin):
    """One layer: its head groups, and the chunk waiting to be attended and committed."""

    is_sliding = False
    is_compileable = False

    def __init__(self, layer_idx: int, groups: list[HeadGroup], native_window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.groups = groups
        self.native_window = native_window
        self.seen = 0  # tokens committed

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        # The attention function commits; update only hands the chunk through.
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # get_max_length's name before transformers 5.14
        return -1

    def reset(self) -> None:
        for g in self.groups:
            g.store = None
        self.seen = 0


def as_range(values: list[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``values`` lists ``start, start + 1, ..., stop - 1``, else None."""
    if not values or values != list(range(values[0], values[0] + len(values))):
        return None
    return values[0], values[0] + len(values)


def group_heads(policies: list[Policy], group_size: int, device: torch.device) -> list[HeadGroup]:
    """Group the KV heads of one layer by equal policy."""
    groups: dict[Policy, list[int]] = {}
    for h, p in enumerate(policies):
        groups.setdefault(p, []).append(h)
    out = []
    for policy, heads in groups.items():
        q_idx = [h * group_size + j for h in heads for j in range(group_size)]
        out.append(
            HeadGroup(
                policy,
                heads,
                torch.tensor(q_idx, dtype=torch.long, device=device),
                torch.tensor(heads, dtype=torch.long, device=device),
                kv_range=as_range(heads),
            )
        )
    return out


class HeadwiseCache(Cache):
    """Per-head KV cache of one batch of sequences that advance together (same length)."""

    def __init__(
        self,
        spec: ModelSpec,
        plan: HeadPlan,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        batch: int = 1,
        use_kernels: bool | None = None,
        pages: SequencePages | None = None,
        paged_prefill: bool = True,
    ):
        """``pages``: a batch-1 sequence's pages in an engine's page pool; the groups whose policy has a
        ``paged_layout`` keep their KV in them (``paged_cache.py``). ``paged_prefill``: with the kernels on, dense
        prompt chunks of those groups run on the paged prefill kernel; False: over a gathered copy
        (``Engine(dense_prefill="gather")``)."""
        plan.check_model(spec)
        device = torch.device(device)
        layers = []
        for i, row in enumerate(resolve(plan.policies(), spec)):
            groups = group_heads(row, spec.group_size, device)
            layers.append(HeadwiseLayer(i, groups, spec.layer_windows[i]))
        super().__init__(layers=layers)
        if pages is not None:
            assert batch == 1 and pages.pool.kv is not None, "pool pages hold one sequence, in an allocated pool"
            for layer, row in zip(layers, pages.groups, strict=True):
                for g, gp in zip(layer.groups, row, strict=True):
                    assert g.policy == gp.policy and len(g.kv_heads) == gp.heads, "pages follow the cache's groups"
                    g.pages = gp
        self.pages = pages
        self.spec, self.plan = spec, plan
        self.device, self.dtype, self.batch = device, dtype, batch
        self.use_kernels = (device.type == "cuda") if use_kernels is None else use_kernels
        self.paged_prefill = paged_prefill
        self.shared: dict[str, Any] = {}  # cross-layer state (TidalDecode positions)
        self.decode_step = 0
        self.reserved = 0
        # Set by the engine's CUDA-graph decode (``engine.GraphDecoder``): the decode token's position, on the
        # device, which graph-capable policies read instead of host-side lengths.
        self.position: torch.Tensor | None = None
        # SeerAttention gates of the plan (``policies/seer.py``), on this cache's device
        self.gates = None if plan.gates is None else plan.gates.on(device)
        self._rope: dict[int, torch.Tensor | None] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Hand the chunk through (the attention function commits it). Unlike ``Cache.update`` this never reads
        ``layer_idx``: compiled layers (``fusion.py``) then share one graph instead of one per layer."""
        return key_states, value_states

    def rope(self, layer_idx: int) -> torch.Tensor | None:
        """Layer ``layer_idx``'s RoPE inverse frequencies on the cache's device (fp32), or None where unknown."""
        if layer_idx not in self._rope:
            inv = self.spec.rope_inv_freq(layer_idx)
            self._rope[layer_idx] = None if inv is None else torch.tensor(inv, dtype=torch.float32, device=self.device)
        return self._rope[layer_idx]

    # ------------------------------------------------------------------ storage
    def reserve(self, total_tokens: int) -> None:
        """Pre-allocate growing stores for ``total_tokens`` (prompt + generation), so they hold exactly that."""
        self.reserved = total_tokens
        for layer in self.layers:
            for g in layer.groups:
                self._ensure_store(g).reserve(total_tokens)

    def _ensure_store(self, g: HeadGroup) -> KVStore:
        if g.store is None:
            if g.pages is not None and self.pages is not None:
                from headwise.paged_cache import paged_store

                g.store = paged_store(self.pages.pool, g.pages, self.device, self.dtype)
            if g.store is None:
                g.store = g.policy.make_store(self.batch, len(g.kv_heads), self.spec.head_dim, self.device, self.dtype)
        return g.store

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[layer_idx].seen if self.layers else 0

    # ------------------------------------------------------------------ CUDA-graph decode
    def graph_blockers(self) -> list[str]:
        """Why a decode step of this cache cannot be replayed from a CUDA graph (empty: it can): policies whose
        decode reads host-side state (``Policy.graph_decode``; ``Policy.graph_blocker_at``, for the reserved
        length), a batch above 1, or no kernels."""
        why = []
        if not self.use_kernels:
            why.append("the decode kernels are off (use_kernels)")
        if self.batch != 1:
            why.append(f"batch {self.batch} (graphs replay batch-1 decode)")
        if self.pages is not None:
            why.append("the KV lives in the engine's page pool (its decode steps replay the pool's graphs at padded "
                       "batch sizes: batch_graphs.py)")
        item = torch.empty((), dtype=self.dtype).element_size()
        blockers = sorted({b for layer in self.layers for g in layer.groups
                           if (b := g.policy.graph_blocker_at(self.reserved, self.spec.head_dim, item))})
        if blockers:
            why.append("policies without graph decode: " + "; ".join(blockers))
        return why

    def host_counters(self) -> list[tuple[int, list[int | None]]]:
        """The host-side token counters (each layer's ``seen``, each store's ``tokens``), to put back with
        ``restore_host_counters`` after running a step's host code without the step (a graph capture)."""
        return [(layer.seen, [None if g.store is None else g.store.tokens for g in layer.groups])
                for layer in self.layers]

    def restore_host_counters(self, saved: list[tuple[int, list[int | None]]]) -> None:
        for layer, (seen, stores) in zip(self.layers, saved):
            layer.seen = seen
            for g, tokens in zip(layer.groups, stores):
                if g.store is not None and tokens is not None:
                    g.store.rewind(tokens)

    def advance(self, n: int) -> None:
        """Count ``n`` decode tokens in the host-side counters (layers and stores) that a replayed CUDA graph
        wrote on the device."""
        for layer in self.layers:
            layer.seen += n
            for g in layer.groups:
                if g.store is not None:
                    g.store.advance(n)

    # ------------------------------------------------------------------ accounting
    def kv_bytes_by_head(self) -> torch.Tensor:
        """Bytes held by K/V tensors, ``[layers, kv_heads]`` (a group's bytes split evenly over its heads)."""
        out = torch.zeros(self.spec.num_layers, self.spec.num_kv_heads, dtype=torch.long)
        for i, layer in enumerate(self.layers):
            for g in layer.groups:
                if g.store is None:
                    continue
                nbytes = sum(t.numel() * t.element_size() for t in g.store.tensors())
                for h in g.kv_heads:
                    out[i, h] = nbytes // len(g.kv_heads)
        return out

    def kv_bytes(self) -> int:
        """Exact bytes held by every tensor of every store (keys, values, metadata)."""
        total = 0
        for layer in self.layers:
            for g in layer.groups:
                if g.store is not None:
                    total += sum(t.numel() * t.element_size() for t in g.store.tensors())
        return total

    def all_tensors(self) -> list[torch.Tensor]:
        return [t for layer in self.layers for g in layer.groups if g.store is not None for t in g.store.tensors()]
