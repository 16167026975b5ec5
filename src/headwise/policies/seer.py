"""``seer``: block-sparse prefill whose key blocks a small learned gate picks (SeerAttention's AttnGate).

SeerAttention (Gao et al., 2024, https://arxiv.org/abs/2410.13276; code: github.com/microsoft/SeerAttention,
``seer_attn/attn_gate.py``, ``kernels/attn_pooling_kernel.py``). Per layer, a gate predicts each query head's
block-level attention map:

* queries are average-pooled over blocks of ``block_size`` tokens and projected per query head,
  ``wq: [q_heads, head_dim, hidden]``; keys are max-, min- and average-pooled over the same blocks, concatenated
  and projected per KV head, ``wk: [kv_heads, 3 * head_dim, hidden]``;
* the gate's score of (query block a, key block b) is their dot product over ``sqrt(hidden)``, causal at block
  level, softmax over the key blocks;
* it is trained by self-distillation (``profile/seer.py``): the target is the model's own attention map, max-pooled
  over (block x block) tiles and renormalised per row, the loss KL(target || gate), the model frozen.

At run time the gate's scores become a per-query-head block index for the block-sparse prefill kernel
(``kernels/block_sparse.py``): the ``topk`` best key blocks of each query block, or every block whose gate
probability passes ``threshold``; the first block (sinks) and the query's own block are always kept, as in the
other patterns (``sparse_prefill.py``: format, fallbacks, storage rule).

The gate's weights (``SeerGates``, one ``LayerGate`` per global layer) are saved beside the plan as safetensors
(``HeadPlan.save``: ``<plan>.gates.safetensors``, named in ``meta.seer_gates`` with its sha256) and reach the policy
through ``AttendContext.gate``.

How this differs from SeerAttention: the gate pools the queries and keys the attention function receives, which
transformers has already rotated (RoPE), and applies no second rotation at block positions (SeerAttention pools the
unrotated ones and rotates the pooled ones with block positions; headwise plugs in after the rotation). The query
projection is always there (SeerAttention drops it when the hidden size equals head_dim). The first and own blocks
are forced in.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.kernels.prefill_index import compact_rows, query_block_ids
from headwise.policies.base import AttendContext, Policy
from headwise.policies.block_topk import pool_blocks
from headwise.policies.full import Full
from headwise.policies.sparse_prefill import PrefillPattern

GATES_FORMAT = "headwise-seer-gates"


def pool_keys(keys: torch.Tensor, block_size: int) -> torch.Tensor:
    """Max, min and mean of ``keys: [B, H, S, D]`` (positions 0 ..) over blocks: fp32 ``[B, H, n_blocks, 3D]``; a
    partial last block pools the tokens present."""
    B, H, S, D = keys.shape
    pad = -S % block_size
    k = keys.float()
    hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).view(B, H, -1, block_size, D).amax(3)
    lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).view(B, H, -1, block_size, D).amin(3)
    return torch.cat([hi, lo, pool_blocks(keys, 0, block_size)], dim=-1)


@dataclass
class LayerGate:
    """One layer's gate: ``wq [q_heads, head_dim, hidden]``, ``wk [kv_heads, 3 * head_dim, hidden]``."""

    wq: torch.Tensor
    wk: torch.Tensor
    block_size: int

    def select(self, q_heads: list[int] | None, kv_heads: list[int] | None) -> LayerGate:
        """The rows of a group of heads (None: all)."""
        wq = self.wq if q_heads is None else self.wq[q_heads]
        wk = self.wk if kv_heads is None else self.wk[kv_heads]
        return LayerGate(wq, wk, self.block_size)

    def logits(self, q: torch.Tensor, keys: torch.Tensor, q_offset: int) -> torch.Tensor:
        """Gate scores of a chunk: q [B, Hq, L, D] at positions ``q_offset ..``, keys [B, Hkv, S, D]. Returns fp32
        ``[B, Hq, n_q_blocks, n_k_blocks]``, -inf where the key block is after the query block. Differentiable in the
        weights (training)."""
        Hq, Hkv = q.shape[1], keys.shape[1]
        if self.wq.shape[0] != Hq or self.wk.shape[0] != Hkv:
            raise PlanError(f"SeerAttention gate holds {self.wq.shape[0]} query / {self.wk.shape[0]} KV heads, the "
                            f"layer's group has {Hq} / {Hkv}")
        qg = torch.einsum("bhnd,hde->bhne", pool_blocks(q, q_offset, self.block_size), self.wq.float())
        kg = torch.einsum("bhnd,hde->bhne", pool_keys(keys, self.block_size), self.wk.float())
        kg = kg.repeat_interleave(Hq // Hkv, dim=1)
        scores = torch.matmul(qg, kg.transpose(-1, -2)) * self.wq.shape[-1] ** -0.5
        rows = query_block_ids(q.shape[2], q_offset, self.block_size, q.device)
        later = torch.arange(kg.shape[2], device=q.device)[None, :] > rows[:, None]
        return scores.masked_fill(later, float("-inf"))


@dataclass
class SeerGates:
    """Every global layer's gate of one model, and what it was trained for."""

    block_size: int
    layers: dict[int, LayerGate]
    info: dict[str, Any] = field(default_factory=dict)
    _on: dict[str, SeerGates] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def init(cls, layers: list[int], q_heads: int, kv_heads: int, head_dim: int, block_size: int = 64,
             hidden: int | None = None, seed: int = 0) -> SeerGates:
        """Random gates (the untrained starting point): weights ~ N(0, 1/fan_in)."""
        hidden = hidden or head_dim
        g = torch.Generator().manual_seed(seed)
        out = {}
        for i in layers:
            wq = torch.randn(q_heads, head_dim, hidden, generator=g) * head_dim**-0.5
            wk = torch.randn(kv_heads, 3 * head_dim, hidden, generator=g) * (3 * head_dim) ** -0.5
            out[i] = LayerGate(wq, wk, block_size)
        return cls(block_size, out)

    def layer(self, i: int) -> LayerGate | None:
        return self.layers.get(i)

    def for_heads(self, kv_heads: list[list[int]], group: int) -> SeerGates:
        """The rows of the KV heads ``kv_heads[layer]`` and their ``group`` query heads each, in that order: the
        gates of a plan whose heads were re-indexed or split over tensor-parallel ranks (``HeadPlan.permuted``,
        ``HeadPlan.shard``)."""
        out = {}
        for i, g in self.layers.items():
            kvs = list(kv_heads[i])
            out[i] = g.select([h * group + j for h in kvs for j in range(group)], kvs)
        return SeerGates(self.block_size, out, self.info)

    def on(self, device: torch.device | str) -> SeerGates:
        """These gates on ``device`` (copied once per device, then reused by every cache)."""
        key = str(torch.device(device))
        if not self.layers or key == str(next(iter(self.layers.values())).wq.device):
            return self
        if key not in self._on:
            moved = {i: LayerGate(g.wq.to(device), g.wk.to(device), g.block_size) for i, g in self.layers.items()}
            self._on[key] = SeerGates(self.block_size, moved, self.info)
        return self._on[key]

    # ------------------------------------------------------------------ files (safetensors: no pickle)
    def save(self, path: str | os.PathLike[str]) -> str:
        """Write atomically as safetensors; returns the file's sha256."""
        from safetensors.torch import save_file

        tensors = {}
        for i, g in self.layers.items():
            tensors[f"layers.{i}.wq"] = g.wq.detach().float().cpu().contiguous()
            tensors[f"layers.{i}.wk"] = g.wk.detach().float().cpu().contiguous()
        meta = {"format": GATES_FORMAT, "block_size": str(self.block_size), "info": json.dumps(self.info)}
        p = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, p)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file_sha256(p)

    @classmethod
    def load(cls, path: str | os.PathLike[str], sha256: str | None = None) -> SeerGates:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        p = Path(path)
        if not p.exists():
            raise PlanError(f"SeerAttention gates {p} do not exist; keep the .gates.safetensors file beside its plan "
                            "(or profile again with --train-gates)")
        if sha256 is not None and file_sha256(p) != sha256:
            raise PlanError(f"SeerAttention gates {p} are not the ones the plan was saved with (sha256 differs); "
                            "profile again with --train-gates")
        try:
            from safetensors import safe_open

            with safe_open(str(p), framework="pt") as fh:
                meta = fh.metadata() or {}
            tensors = load_file(str(p))
        except (SafetensorError, OSError) as exc:
            raise PlanError(f"cannot read SeerAttention gates {p}: {exc}") from None
        if meta.get("format") != GATES_FORMAT:
            raise PlanError(f"{p} is not a headwise SeerAttention gate file (format {meta.get('format')!r})")
        bs = int(meta["block_size"])
        layers = sorted({int(k.split(".")[1]) for k in tensors})
        gates = {i: LayerGate(tensors[f"layers.{i}.wq"], tensors[f"layers.{i}.wk"], bs) for i in layers}
        return cls(bs, gates, json.loads(meta.get("info", "{}")))


def file_sha256(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def gates_path(plan_path: str | os.PathLike[str]) -> Path:
    """Where a plan's gates live: ``plan.json`` -> ``plan.gates.safetensors``, beside it."""
    p = Path(plan_path)
    return p.with_name(p.stem + ".gates.safetensors")


@dataclass(frozen=True)
class Seer(PrefillPattern):
    name: ClassVar[str] = "seer"
    paper: ClassVar[str] = "https://arxiv.org/abs/2410.13276"

    topk: int = 16
    """Key blocks kept per query block by the gate's score, besides the first and own blocks (0: use ``threshold``)."""
    threshold: float = 0.0
    """If ``topk`` is 0: keep every key block whose gate probability exceeds this (SeerAttention's threshold mode)."""
    block_size: int = 64
    """Gate pooling and kernel block size; must equal the gate's (SeerAttention: 64)."""
    decode: Policy = field(default_factory=Full)
    """Policy for one-token steps and the cache; must keep every token (``full``, ``page_topk``)."""

    def validate(self) -> None:
        super().validate()
        if isinstance(self.topk, bool) or not isinstance(self.topk, int) or self.topk < 0:
            raise PlanError(f"policy 'seer': 'topk' must be a non-negative integer, got {self.topk!r}")
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < 1:
            raise PlanError(f"policy 'seer': 'threshold' must be a number in [0, 1), got {t!r}")
        if (self.topk > 0) == (t > 0):
            raise PlanError("policy 'seer': give exactly one of 'topk' (> 0) and 'threshold' (> 0)")

    def short(self) -> str:
        return (f"seer{self.topk}" if self.topk else f"seer>{self.threshold:g}") + self.decode_suffix()

    def index(self, q: torch.Tensor, keys: torch.Tensor, ctx: AttendContext) -> tuple[torch.Tensor, torch.Tensor]:
        gate = ctx.gate
        if not isinstance(gate, LayerGate):
            raise PlanError(f"policy 'seer' on layer {ctx.layer_idx} needs the plan's SeerAttention gate (saved beside "
                            "the plan as <plan>.gates.safetensors by 'headwise profile --train-gates'); none is loaded")
        if ctx.kv_heads:
            r = q.shape[1] // keys.shape[1]
            gate = gate.select([h * r + j for h in ctx.kv_heads for j in range(r)], list(ctx.kv_heads))
        return self.build_index(q, keys, ctx.start, ctx.scale, gate=gate)

    def build_index(self, q, keys, q_offset, scale, gate: LayerGate | None = None):
        """Per query head: block_idx [B, Hq, n_q_blocks, M] from ``gate`` (the group's rows of the layer's gate)."""
        if gate is None:
            raise PlanError("policy 'seer' builds its index from a trained gate; none was given")
        if gate.block_size != self.block_size:
            raise PlanError(f"policy 'seer': block_size {self.block_size} differs from its gate's {gate.block_size}")
        logits = gate.logits(q, keys, q_offset)  # [B, Hq, n, nk]
        B, H, n, nk = logits.shape
        rows = query_block_ids(q.shape[2], q_offset, self.block_size, q.device)
        kb = torch.arange(nk, device=q.device)
        if self.topk:
            eligible = (kb[None, :] > 0) & (kb[None, :] < rows[:, None])
            top = logits.masked_fill(~eligible, float("-inf")).topk(min(self.topk, nk), dim=-1)
            chosen, ok = top.indices, top.values > float("-inf")
        else:
            probs = torch.softmax(logits, dim=-1)
            chosen = kb.expand(B, H, n, nk)
            ok = probs > self.threshold
        fixed = torch.stack([torch.zeros_like(rows), rows], dim=-1)[None, None].expand(B, H, n, 2)
        return compact_rows(torch.cat([chosen, fixed], -1),
                            torch.cat([ok, torch.ones_like(fixed, dtype=torch.bool)], -1))
