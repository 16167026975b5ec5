"""``hyper``: HyperAttention's approximate prefill (sortLSH blocks + sampled columns, causal by recursive halving).

HyperAttention (Han et al., 2023, https://arxiv.org/abs/2310.05869; code: github.com/insuhan/hyper-attn,
``models/attention/hyper_attn.py``). Without a causal mask (``hyper_unmasked``):

1. *sortLSH*: hash queries and keys with ``lsh_bits`` random hyperplanes (angular LSH), order the buckets so that
   neighbours differ in one bit (Gray-code order), sort queries and keys by bucket, cut both sorted sequences into
   the same number of blocks (``block_size`` keys each) and attend exactly inside each (query block i, key block
   i) pair: that finds the large entries of the attention matrix;
2. *sampling*: attend every query to ``sample_size`` keys drawn uniformly, excluding the keys of its own sorted
   block (already counted), and weigh them by ``keys / sample_size``: an unbiased estimate of the rest of each
   row's softmax sum and of its weighted values;
3. the two parts are merged through their log-sum-exps.

Causal attention (``hyper_causal``): split the sequence in halves; the two diagonal halves are causal problems
(recursively), the lower-left quarter is unmasked (step 1-3); a problem of at most ``min_seq_len`` queries is
computed exactly, and an unmasked one of fewer queries too (so prompts shorter than ``2 * min_seq_len`` tokens, 8192
with the default, are exact).

Chunked prefill: a chunk's queries attend the chunk causally (``hyper_causal``) and every earlier token without a
mask (``hyper_unmasked``), merged. Decode and storage are the ``decode`` policy's, which must keep every token
(``sparse_prefill.py`` explains why). Randomness (hyperplanes, samples) comes from a generator seeded with
``seed``, the layer and the chunk's start, so a run is reproducible.

How this differs from the authors' code: padded keys (sequence lengths that are not a multiple of the block) are
masked rather than attended as zero vectors; queries are padded to a whole number of blocks per key block (the
code assumes it divides); the duplicate-entry mask of step 2 is always applied (their CUDA path skips it); the
bucket order is the *position* in the Gray sequence (their code indexes the Gray sequence by the bucket id, which
is a different order); samples are drawn over key positions rather than over places in the sorted order (the same
distribution; ``draw_samples`` says why); GQA key heads are expanded to the query heads. Fast path (``use_kernels``):
the exact causal base problems, and the sortLSH blocks when no key is padded, run on PyTorch's flash attention
(``aten._scaled_dot_product_flash_attention``, which also returns the log-sum-exp; on the CPU its CPU twin); the
sampled part (and blocks with padded keys) are fp32 matrix products over a few heads at a time (our block-sparse
kernel takes block lists in position order and returns no log-sum-exp). Without ``use_kernels`` every piece is the
fp32 reference. The two paths hash identical inputs identically (the projections are fp32 on both), but the
hash is discontinuous: in a model, the fast path's bf16-rounded output of one layer moves a few queries and keys
of the next layers to other buckets, and the rows of the blocks they pass get another (equally good) approximation.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from headwise.errors import PlanError
from headwise.policies.base import AttendContext, Policy, check_positive, gather_rows
from headwise.policies.full import Full
from headwise.policies.sparse_prefill import DecodeDelegate, PrefillPattern
from headwise.policies.stores import DenseStore

log = logging.getLogger(__name__)
HEAD_CHUNK_ELEMENTS = 2**28
"""fp32 score elements materialised at once (1 GiB): the block and sample products run over a few heads at a time."""


# ---------------------------------------------------------------------------------------------- pieces
def exact_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool,
              key_ok: torch.Tensor | None = None, flash: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with its log-sum-exp: q [..., n, D], k, v [..., m, D] (same leading dims); ``causal`` aligns
    the last query with the last key; ``key_ok`` bool broadcastable to [..., n, m] masks entries. Returns out fp32
    [..., n, D] and lse fp32 [..., n] (-inf and zeros for rows with nothing to attend). With ``flash``, an unmasked
    fp16/bf16 problem runs on PyTorch's flash attention (CUDA; on the CPU, the CPU build's flash kernel, so that CPU
    tests run this path and its rounding too); otherwise (the reference) fp32 matrix products."""
    if (flash and q.device.type in ("cuda", "cpu") and key_ok is None and q.dtype in (torch.float16, torch.bfloat16)
            and q.dim() == 4 and q.shape[-1] <= 256 and (not causal or q.shape[-2] == k.shape[-2])):
        if q.is_cuda:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
        else:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out.float(), lse.float()
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        n, m = scores.shape[-2:]
        ok = torch.arange(m, device=q.device)[None, :] <= torch.arange(m - n, m, device=q.device)[:, None]
        key_ok = ok if key_ok is None else key_ok & ok
    if key_ok is not None:
        scores = scores.masked_fill(~key_ok, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].clamp(min=-1e30)).nan_to_num(0.0)
    return torch.matmul(probs, v.float()), lse


def merge(o1: torch.Tensor, l1: torch.Tensor, o2: torch.Tensor, l2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from each one's output [..., n, D] and lse [..., n]."""
    lse = torch.logaddexp(l1, l2)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w1 = torch.exp(l1 - safe).nan_to_num(0.0)[..., None]
    w2 = torch.exp(l2 - safe).nan_to_num(0.0)[..., None]
    return w1 * o1 + w2 * o2, lse


def gray_rank(bits: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``rank[b]``: position of bucket ``b`` in the ``bits``-bit Gray sequence (neighbours differ in one bit)."""
    code = torch.arange(2**bits, device=device)
    gray = code ^ (code >> 1)
    return torch.argsort(gray)


def lsh_buckets(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """Angular LSH of ``x: [..., n, D]`` with hyperplanes ``planes: [D, bits]``: the bucket's Gray rank [..., n]."""
    bits = planes.shape[1]
    code = ((torch.matmul(x.float(), planes) > 0).long() << torch.arange(bits, device=x.device)).sum(-1)
    return gray_rank(bits, x.device)[code]


def draw_samples(k_order: torch.Tensor, sample_size: int, block_size: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2's uniform sample: ``sample_size`` key *positions* per (batch, head) and the sorted block of each
    (``block_size`` keys a block), from ``k_order: [B, H, m]`` (the sortLSH order). Returns two long [B, H, s].

    Drawn over key positions, not over places in the sorted order as the authors' code does (same distribution):
    then the sampled keys do not depend on the hash, and a key that rounding moves to another bucket changes the
    blocks it passes, not every row's sample (a one-ulp difference between the flash and fp32 paths did)."""
    B, H, m = k_order.shape
    samples = torch.randint(m, (B, H, sample_size), device=k_order.device, generator=gen)
    return samples, torch.argsort(k_order, dim=-1).gather(-1, samples) // block_size


def hyper_unmasked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg: Hyper,
                   planes: torch.Tensor, gen: torch.Generator, flash: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1-3 of the module docstring. q [B, H, n, D]; k, v [B, H, m, D] (heads matched). Returns out fp32
    [B, H, n, D], lse fp32 [B, H, n]; exact when ``n < min_seq_len``. ``flash``: ``exact_lse``'s fast path."""
    B, H, n, D = q.shape
    m = k.shape[2]
    if n < cfg.min_seq_len or m <= cfg.block_size:
        return exact_lse(q, k, v, scale, causal=False, flash=flash)
    q_order = torch.argsort(lsh_buckets(q, planes), dim=-1, stable=True)
    k_order = torch.argsort(lsh_buckets(k, planes), dim=-1, stable=True)
    nb = -(-m // cfg.block_size)
    kb = cfg.block_size
    qb = -(-n // nb)
    k_sorted = torch.nn.functional.pad(gather_rows(k, k_order), (0, 0, 0, nb * kb - m))
    v_sorted = torch.nn.functional.pad(gather_rows(v, k_order), (0, 0, 0, nb * kb - m))
    q_sorted = torch.nn.functional.pad(gather_rows(q, q_order), (0, 0, 0, nb * qb - n))
    key_ok = (torch.arange(nb * kb, device=q.device) < m).view(nb, 1, kb)  # padded keys masked
    samples, sample_block = draw_samples(k_order, cfg.sample_size, kb, gen)
    k_sub, v_sub = gather_rows(k, samples), gather_rows(v, samples)
    q_block = (torch.arange(nb * qb, device=q.device) // qb)[:, None]  # sorted block of each query row
    out = torch.empty(B, H, n, D, device=q.device, dtype=torch.float32)
    lse = torch.empty(B, H, n, device=q.device, dtype=torch.float32)
    step = max(1, HEAD_CHUNK_ELEMENTS // max(1, B * nb * qb * max(kb, cfg.sample_size)))
    for h0 in range(0, H, step):
        hs = slice(h0, min(H, h0 + step))
        qs = q_sorted[:, hs]
        if nb * kb == m:  # no padded key: (query block, key block) pairs as 4-D heads (flash attention on CUDA)
            ob, lb = exact_lse(qs.reshape(B, -1, qb, D), k_sorted[:, hs].reshape(B, -1, kb, D),
                               v_sorted[:, hs].reshape(B, -1, kb, D), scale, causal=False, flash=flash)
        else:
            ob, lb = exact_lse(qs.reshape(B, -1, nb, qb, D), k_sorted[:, hs].reshape(B, -1, nb, kb, D),
                               v_sorted[:, hs].reshape(B, -1, nb, kb, D), scale, causal=False, key_ok=key_ok)
        ob, lb = ob.reshape(B, -1, nb * qb, D), lb.reshape(B, -1, nb * qb)
        o, lsum = ob, lb
        if cfg.sample_size:
            not_dup = q_block != sample_block[:, hs, None, :]  # a sample of the own block is counted once
            os_, ls = exact_lse(qs, k_sub[:, hs], v_sub[:, hs], scale, causal=False, key_ok=not_dup)
            o, lsum = merge(ob, lb, os_, ls + math.log(m / cfg.sample_size))
        inv = torch.argsort(q_order[:, hs], dim=-1)  # back to the queries' own order
        out[:, hs] = gather_rows(o[:, :, :n], inv)
        lse[:, hs] = lsum[:, :, :n].gather(-1, inv)
    return out, lse


def hyper_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, cfg: Hyper,
                 planes: torch.Tensor, gen: torch.Generator, flash: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal HyperAttention of ``q, k, v: [B, H, n, D]`` (same positions) by recursive halving. Returns out fp32
    [B, H, n, D], lse fp32 [B, H, n]."""
    B, H, n, D = q.shape
    if n <= cfg.min_seq_len:
        return exact_lse(q, k, v, scale, causal=True, flash=flash)
    if n % 2:  # a zero row at the end: only the padded query (dropped) can see the padded key
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 1)) for x in (q, k, v))
    half = q.shape[2] // 2
    o_bd, l_bd = hyper_causal(*(x.reshape(B, 2 * H, half, D) for x in (q, k, v)), scale, cfg, planes, gen, flash)
    o_bd, l_bd = o_bd.reshape(B, H, 2 * half, D), l_bd.reshape(B, H, 2 * half)
    o_low, l_low = hyper_unmasked(q[:, :, half:], k[:, :, :half], v[:, :, :half], scale, cfg, planes, gen, flash)
    o_down, l_down = merge(o_bd[:, :, half:], l_bd[:, :, half:], o_low, l_low)
    out = torch.cat([o_bd[:, :, :half], o_down], dim=2)[:, :, :n]
    lse = torch.cat([l_bd[:, :, :half], l_down], dim=2)[:, :, :n]
    return out, lse


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``||approx - exact||_F / ||exact||_F`` per head over ``[B, H, n, D]`` outputs: fp32 [H]."""
    diff = (approx.float() - exact.float()).pow(2).sum(dim=(0, 2, 3))
    return (diff / exact.float().pow(2).sum(dim=(0, 2, 3)).clamp(min=1e-30)).sqrt()


# ---------------------------------------------------------------------------------------------- policy
@dataclass(frozen=True)
class Hyper(DecodeDelegate, Policy):
    """Approximate prefill by HyperAttention; decode and cache are the ``decode`` policy's."""

    name: ClassVar[str] = "hyper"
    paper: ClassVar[str] = "https://arxiv.org/abs/2310.05869"
    keeps_every_token: ClassVar[bool] = True  # ``validate`` holds the decode policy to it
    graph_decode: ClassVar[bool] = True  # a one-token step is the decode policy's: ``graph_blocker`` asks it

    block_size: int = 256
    """Keys per sortLSH block (the authors' default 256)."""
    sample_size: int = 256
    """Keys sampled uniformly per (batch, head) for the rest of each row (the authors' default 256)."""
    lsh_bits: int = 7
    """Hyperplanes of the angular LSH: 2^bits buckets (the authors' default 7)."""
    min_seq_len: int = 4096
    """Causal problems of at most this many queries (and unmasked ones of fewer) are exact (authors: 4096)."""
    seed: int = 0
    """Seed of the hyperplanes and the samples (with the layer and the chunk's start)."""
    decode: Policy = field(default_factory=Full)
    """Policy for one-token steps and the cache; must keep every token (``full``, ``page_topk``)."""

    def validate(self) -> None:
        check_positive(self, block_size=self.block_size, sample_size=self.sample_size, lsh_bits=self.lsh_bits,
                       min_seq_len=self.min_seq_len, seed=self.seed)
        if self.block_size < 1 or self.lsh_bits < 1 or self.lsh_bits > 16:
            raise PlanError("policy 'hyper': 'block_size' must be at least 1 and 'lsh_bits' in 1..16")
        if isinstance(self.decode, (PrefillPattern, Hyper)):
            raise PlanError("policy 'hyper': the decode policy cannot itself be a prefill pattern")
        if not isinstance(self.decode, Policy) or not self.decode.keeps_every_token:
            raise PlanError(f"policy 'hyper': decode policy {getattr(self.decode, 'name', self.decode)!r} must keep "
                            "the full cache (use 'full' or 'page_topk'): HyperAttention prefill reads every token")

    def short(self) -> str:
        return f"hyper{self.block_size}/{self.sample_size}" + ("" if isinstance(self.decode, Full)
                                                                 else f"|{self.decode.short()}")

    def planes(self, head_dim: int, layer: int, device: torch.device) -> torch.Tensor:
        """The LSH hyperplanes [head_dim, lsh_bits] of ``layer`` (drawn on the CPU: the same on every device)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer)
        return torch.randn(head_dim, self.lsh_bits, generator=g).to(device)

    def approximate(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int, scale: float,
                    layer: int = 0, flash: bool = True) -> torch.Tensor:
        """The chunk's attention: q [B, Hq, L, D] at positions ``start ..``; keys, values [B, Hkv, start + L, D].
        Returns [B, Hq, L, D] in q's dtype. ``flash``: exact pieces on PyTorch's flash attention where it applies."""
        r = q.shape[1] // keys.shape[1]
        k = keys.repeat_interleave(r, dim=1) if r > 1 else keys
        v = values.repeat_interleave(r, dim=1) if r > 1 else values
        planes = self.planes(q.shape[-1], layer, q.device)
        gen = torch.Generator(device=q.device).manual_seed(self.seed * 1_000_003 + layer * 65_537 + start)
        out, lse = hyper_causal(q, k[:, :, start:], v[:, :, start:], scale, self, planes, gen, flash)
        if start > 0:
            o_pre, l_pre = hyper_unmasked(q, k[:, :, :start], v[:, :, :start], scale, self, planes, gen, flash)
            out, lse = merge(out, lse, o_pre, l_pre)
        return out.to(q.dtype)

    def attend(self, q, k, v, store: Any, ctx: AttendContext) -> torch.Tensor:
        if q.shape[2] == 1:
            return self.decode.attend(q, k, v, store, ctx)
        if ctx.native_window is not None:
            raise PlanError(f"policy 'hyper' on layer {ctx.layer_idx}: the layer has a native sliding window of "
                            f"{ctx.native_window} tokens; use it on global-attention layers only")
        if not isinstance(store, DenseStore):
            raise PlanError("policy 'hyper': the decode policy's store must keep every token")
        store.append(k, v)
        keys, values = store.view()
        return self.approximate(q, keys, values, ctx.start, ctx.scale, ctx.layer_idx, flash=ctx.use_kernels)
