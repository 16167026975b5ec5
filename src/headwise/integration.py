"""A head plan inside plain transformers code: ``with headwise.apply(model, plan) as cache: model.generate(...)``.

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen3-0.6B")
    with headwise.apply(model, HeadPlan.load("plan.json")) as cache:
        out = model.generate(**inputs, past_key_values=cache, max_new_tokens=64, do_sample=False)

Inside the block the model runs headwise's attention (``attention.py``) over a ``HeadwiseCache`` built for the
plan, so every KV head keeps only what its policy needs, as under ``Engine``. Nothing is patched: the block sets
the model's attention implementation through transformers' ``AttentionInterface`` name and adds one forward
pre-hook (a public PyTorch extension point) that hands the cache to the attention function; both are undone in
``finally``, also when the block raises.

Limits: a batch of rows of equal length (no padding: headwise masks by absolute position, not by attention
mask); a fresh cache per ``apply`` (one generation; enter the block again for the next prompt). Prefill runs
the prompt as one chunk; ``Engine`` chunks it (``chunk_size``) to bound memory on long prompts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from headwise import attention as _attention
from headwise.cache import HeadwiseCache
from headwise.errors import InputError
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec


@contextmanager
def apply(model: torch.nn.Module, plan: HeadPlan, batch: int = 1,
          use_kernels: bool | None = None) -> Iterator[HeadwiseCache]:
    """Run ``model`` (a transformers causal LM) with ``plan`` inside the block; yields the ``HeadwiseCache`` to
    pass as ``past_key_values``. ``batch``: rows per forward (all of one length); ``use_kernels``: the Triton
    kernels (default: on CUDA)."""
    spec = ModelSpec.from_config(model.config)
    param = next(model.parameters())
    cache = HeadwiseCache(spec, plan, param.device, param.dtype, batch, use_kernels)

    def hand_over_cache(module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        given = kwargs.get("past_key_values")
        if given is None:
            kwargs["past_key_values"] = cache
        elif given is not cache:
            raise InputError("inside headwise.apply, pass the cache it yields: model.generate(..., "
                             f"past_key_values=cache), not a {type(given).__name__}")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[0] != batch:
            raise InputError(f"headwise.apply was set up for batch {batch}, the model got {ids.shape[0]} rows; "
                             f"use headwise.apply(model, plan, batch={ids.shape[0]})")
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dtype in (torch.bool, torch.long, torch.int) and not bool(mask.all()):
            raise InputError("headwise.apply runs rows of equal length: the attention mask has padding")
        if ids is not None and ids.shape[1] == 1 and cache.get_seq_length() > 0:
            cache.decode_step += 1  # as Engine.generate counts decode steps (recycled and tidal read it)
        kwargs["headwise_cache"] = cache
        return args, kwargs

    handle = model.register_forward_pre_hook(hand_over_cache, with_kwargs=True)
    try:
        with _attention.attention_implementation(model, _attention.ATTN_NAME):
            yield cache
    finally:
        handle.remove()
