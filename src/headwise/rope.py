"""Rotary position embeddings as transformers applies them, for policies that move keys to other positions.

transformers' attention modules rotate queries and keys before the attention function sees them (``q * cos +
rotate_half(q) * sin``, with ``cos, sin = cos(p * inv_freq), sin(p * inv_freq)`` repeated over the two halves of
the head). Rotations compose: a vector rotated at position ``p`` and then by ``d`` is the vector rotated at
``p + d``, and ``(R(a) q) . (R(b) k)`` depends only on ``b - a``. So a policy that must show a head its keys at
positions other than their own (LongHeads) rotates what the cache already holds by the difference, with the
layer's inverse frequencies from ``ModelSpec.rope``; nothing needs the pre-rotation keys.
"""

from __future__ import annotations

from typing import Any

import torch

# RoPE types whose frequencies do not depend on the sequence length: a rotation by a position difference is then
# exact. ("dynamic" and "longrope" change the frequencies with the length the model has seen.)
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "proportional")


def _layer_params(config: Any, layer_type: str) -> tuple[dict[str, Any] | None, str | None]:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return None, None
    if isinstance(params.get(layer_type), dict):  # per layer type (Gemma 3)
        return params[layer_type], layer_type
    return params, None


def rope_inv_freq(config: Any, layer_type: str) -> tuple[float, ...] | None:
    """The inverse frequencies transformers rotates a layer's queries and keys with (``len == rotary_dim / 2``), or
    None where they are unknown or depend on the length (``STATIC_ROPE_TYPES``)."""
    params, typed = _layer_params(config, layer_type)
    if params is None or "rope_theta" not in params:
        return None
    rope_type = params.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        return None
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    if rope_type == "default":
        dim = int(head_dim * float(params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))))
        inv = 1.0 / (float(params["rope_theta"]) ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None, layer_type=typed)
    return tuple(float(x) for x in inv.to(torch.float32).tolist())


def rotate(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate ``x: [..., D]`` (already rotated, rotate_half layout) further by ``delta`` positions (a long tensor
    broadcasting against ``x.shape[:-1]``): the result is ``x`` as if rotated at its position plus ``delta``.
    ``inv_freq: [R / 2]`` (fp32); only the first ``R`` channels rotate (partial rotary). Angles in float64, so a
    shift by a large position difference loses nothing; the result in ``x.dtype``."""
    half = inv_freq.numel()
    r = 2 * half
    ang = delta.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    cos, sin = ang.cos().to(torch.float32), ang.sin().to(torch.float32)
    xf = x[..., :r].float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if r == x.shape[-1]:
        return out
    return torch.cat([out, x[..., r:].expand(*out.shape[:-1], x.shape[-1] - r)], dim=-1)
