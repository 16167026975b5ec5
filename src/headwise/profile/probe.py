"""An exact attention function that lets the profiler look at (and edit) every head's attention.

Registered in transformers' ``AttentionInterface`` as ``"headwise-probe"``; nothing of the model classes is
patched. The profiler runs the model inside ``probing(model)`` and passes a ``Probe`` as the keyword
``headwise_probe=...`` of the model's forward (transformers hands unknown keywords through to attention
functions). The probe decides what to look at:

* ``observe(layer, weights, q_pos, k_pos)`` receives exact softmax weights ``[B, Hq, Lq, S]`` of the query rows
  it asked for (``rows(layer, L)``), with absolute query and key positions; query heads are in model order
  (GQA: the ``group_size`` query heads of KV head 0 first).
* ``observe_values(layer, weights, values, q_pos, k_pos, module, keys, rescore)`` (only if ``wants_values``) also
  gets the values ``[B, Hq, S, D]`` (expanded to the query heads), the attention module (for ``o_proj``), the keys
  ``[B, Hkv, S, D]`` and ``rescore(k, sel)``: the weights of the same rows (``sel``: a boolean mask over them)
  over other keys ``k: [B, Hkv, S, D]``, with the layer's scale, mask and soft-cap (what quantized keys change);
* ``capture(layer, query, key, scale, window)`` sees the rotated queries and keys (pattern search);
* ``edit(layer, out)`` may change the attention output ``[B, Hq, L, D]`` before ``o_proj`` (head masking).

Attention itself is computed from absolute positions: causal, plus the layer's own sliding window
(Gemma 3), so no mask function is registered for this name (transformers then builds none). The caller
sets ``probe.q_start``, the absolute position of the forward's first query; with transformers' own cache
the ``S`` keys handed to a layer are always the last ``S`` positions up to the last query (a sliding layer's
cache is trimmed from the left), so key positions follow from it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from headwise.attention import attention_implementation

PROBE_NAME = "headwise-probe"
Rescore = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``rescore(k, sel)``: softmax weights ``[B, Hq, sel.sum(), S]`` of the selected query rows over keys ``k``."""
_ROW_BLOCK = 512  # query rows whose weights are materialised at once (memory: Hq * 512 * S floats)


class Probe:
    """Base probe: looks at nothing, changes nothing (exact attention through SDPA)."""

    q_start: int = 0
    wants_values: bool = False
    """If True, ``observe_values`` is called with the same weights as ``observe``."""

    def rows(self, layer: int, q_len: int) -> slice | None:
        """Which query rows (of this forward's ``q_len``) need weights; ``None``: none."""
        return None

    def observe(self, layer: int, weights: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> None:
        """weights: [B, Hq, Lq, S] (float32) for query positions ``q_pos: [Lq]`` and keys ``k_pos: [S]``."""

    def observe_values(self, layer: int, weights: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
                       k_pos: torch.Tensor, module: torch.nn.Module, keys: torch.Tensor | None = None,
                       rescore: Rescore | None = None) -> None:
        """weights as in ``observe``; values: [B, Hq, S, D] (float32); module: the layer's attention module; keys:
        [B, Hkv, S, D] (float32); ``rescore``: the weights of these rows over other keys (module docstring)."""

    def edit(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """out: [B, Hq, L, D] attention output of the layer's query heads; return the (edited) output."""
        return out

    def capture(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float,
                window: int | None) -> None:
        """Sees the layer's rotated query [B, Hq, L, D] and keys [B, Hkv, S, D] (pattern search)."""


class QKProbe(Probe):
    """Keeps every chosen layer's rotated queries and keys of one forward: as the model made them, or with
    ``to_host`` as fp32 tensors in host memory (the GPU's memory stays free while a search walks many layers)."""

    def __init__(self, layers: set[int], to_host: bool = False):
        self.layers = layers
        self.to_host = to_host
        self.qk: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def capture(self, layer: int, query: torch.Tensor, key: torch.Tensor, scale: float, window: int | None) -> None:
        if layer in self.layers:
            q, k = query.detach(), key.detach()
            self.qk[layer] = (q.float().cpu(), k.float().cpu(), scale) if self.to_host else (q, k, scale)


def allowed_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """bool [Lq, S]: causal, and inside the layer's native sliding window when it has one."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok &= (q_pos[:, None] - k_pos[None, :]) < window
    return ok


def probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query: [B, Hq, L, D]; key, value: [B, Hkv, S, D] (everything the layer's cache holds, this chunk
    included). Returns ([B, L, Hq, D], None)."""
    probe: Probe = kwargs.get("headwise_probe") or Probe()
    layer = int(module.layer_idx)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = kwargs.get("sliding_window")
    softcap = kwargs.get("softcap")
    L, S = query.shape[2], key.shape[2]
    q_pos = torch.arange(probe.q_start, probe.q_start + L, device=query.device)
    k_pos = torch.arange(probe.q_start + L - S, probe.q_start + L, device=query.device)
    mask = allowed_mask(q_pos, k_pos, window)
    group = query.shape[1] // key.shape[1]
    if softcap is None:
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=group > 1)
    else:  # Gemma 2 style logit soft-capping: only the explicit path can apply it
        out = _explicit(query, key, value, mask, scale, softcap)
    probe.capture(layer, query, key, scale, window)
    rows = probe.rows(layer, L)
    if rows is not None:
        k_full = key.repeat_interleave(group, dim=1).float()
        v_full = value.repeat_interleave(group, dim=1).float() if probe.wants_values else None
        k_kv = key.float() if probe.wants_values else None
        start, stop = rows.indices(L)[:2]
        for s in range(start, stop, _ROW_BLOCK):
            e = min(stop, s + _ROW_BLOCK)
            weights = _weights(query[:, :, s:e], k_full, mask[s:e], scale, softcap)
            probe.observe(layer, weights, q_pos[s:e], k_pos)
            if v_full is not None:
                probe.observe_values(layer, weights, v_full, q_pos[s:e], k_pos, module, k_kv,
                                     _rescorer(query[:, :, s:e], mask[s:e], scale, softcap, group))
    out = probe.edit(layer, out)
    return out.transpose(1, 2).contiguous(), None


def _weights(query: torch.Tensor, k_full: torch.Tensor, mask: torch.Tensor, scale: float,
             softcap: float | None) -> torch.Tensor:
    """Exact float32 softmax weights ``[B, Hq, l, S]`` of query rows ``[B, Hq, l, D]`` over keys expanded to the query
    heads ``k_full: [B, Hq, S, D]``, under ``mask: [l, S]`` (soft-capped first where the model does)."""
    scores = torch.matmul(query.float(), k_full.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def _rescorer(query: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None, group: int) -> Rescore:
    """``Rescore`` of query rows ``[B, Hq, l, D]`` under ``mask: [l, S]``: ``_weights`` over other keys."""

    def rescore(k: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
        return _weights(query[:, :, sel], k.repeat_interleave(group, dim=1), mask[sel], scale, softcap)

    return rescore


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
              softcap: float) -> torch.Tensor:
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.tanh(torch.matmul(q, k.transpose(-1, -2)) * scale / softcap) * softcap
    return torch.matmul(torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1), v)


AttentionInterface.register(PROBE_NAME, probe_attention)


@contextmanager
def probing(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model`` through the probe attention inside the block (restored in ``finally``)."""
    with attention_implementation(model, PROBE_NAME):
        yield


class HeadMask(Probe):
    """Zeroes the attention output of chosen query heads (the causal test of Wu et al., section 4).

    ``heads``: (layer, query head) pairs to silence.
    """

    def __init__(self, heads: list[tuple[int, int]] | set[tuple[int, int]]):
        self.by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            self.by_layer.setdefault(int(layer), []).append(int(head))

    def edit(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        heads = self.by_layer.get(layer)
        if not heads:
            return out
        out = out.clone()
        out[:, heads] = 0
        return out


@torch.inference_mode()
def greedy_generate(lm: Any, prompt_ids: torch.Tensor, max_new_tokens: int, probe: Probe | None = None,
                    chunk: int = 1024, stop_ids: set[int] | None = None,
                    on_step: Any = None) -> list[int]:
    """Greedy decoding through the probe attention with transformers' own cache.

    prompt_ids: [1, T]. ``on_step(token_id)`` is called after each generated token (the probe has just seen
    the query that produced it). Returns the generated ids (stop token excluded).
    """
    from transformers import DynamicCache

    probe = probe or Probe()
    model = lm.model
    device = next(model.parameters()).device
    ids = prompt_ids.to(device)
    cache = DynamicCache(config=model.config)
    out: list[int] = []
    with probing(model):
        logits = None
        T = ids.shape[1]
        for s in range(0, T, chunk):
            probe.q_start = s
            part = ids[:, s : s + chunk]
            pos = torch.arange(s, s + part.shape[1], device=device)[None]
            logits = model(input_ids=part, position_ids=pos, past_key_values=cache, use_cache=True,
                           headwise_probe=probe, logits_to_keep=1).logits[:, -1]
        assert logits is not None
        pos_now = T
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits[0]).item())
            if stop_ids and nxt in stop_ids:
                break
            out.append(nxt)
            if on_step is not None:
                on_step(nxt)
            if len(out) == max_new_tokens:
                break
            probe.q_start = pos_now
            logits = model(input_ids=torch.tensor([[nxt]], device=device),
                           position_ids=torch.tensor([[pos_now]], device=device), past_key_values=cache,
                           use_cache=True, headwise_probe=probe, logits_to_keep=1).logits[:, -1]
            pos_now += 1
    return out
