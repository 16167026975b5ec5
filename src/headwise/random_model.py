"""Models built from a config with random weights: ``random:PRESET[,layers=N]`` (no download, no tokenizer).

For speed measurements where no weights can reach the machine (the GPU boxes have no internet): the model has a
real model's shapes, so every matmul, KV byte and attention kernel costs what it would with trained weights, but
its outputs are noise. Built on the target device in the target dtype directly (``torch.device`` as the default
device while transformers initialises: weights normal with std ``initializer_range``, 0.02), so an 8B model never
exists in fp32 on the CPU. Prompts are token ids (``headwise bench serve``); there is no tokenizer.

    random:llama-3-8b            Llama-3-8B's shapes: 32 layers, hidden 4096, MLP 14336, 32 query / 8 KV heads, d=128
    random:llama-3-8b,layers=4   the same with 4 layers
    random:tiny-llama            2 layers, hidden 64, 8 query / 4 KV heads, d=16 (CPU tests)
"""

from __future__ import annotations

from typing import Any

import torch

from headwise.errors import ModelLoadError

PREFIX = "random:"

# Llama-3-8B's config.json (meta-llama/Meta-Llama-3-8B), except the context: 128K prompts plus their outputs must
# fit (Llama 3.1's 131072 would refuse a 131072-token prompt with 256 new tokens). RoPE without scaling: with
# random weights the positions' meaning does not matter, only the cost.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=131072 + 4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # 4 KV heads: a quarter of them is one head (``bench serve --plan duo25``).
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=8192),
}
OVERRIDES = {"layers": "num_hidden_layers"}


def is_random(name: str) -> bool:
    return name.startswith(PREFIX)


def config(name: str) -> Any:
    """The ``LlamaConfig`` that ``random:PRESET[,layers=N]`` names."""
    import transformers as tf

    preset, *extra = name.removeprefix(PREFIX).split(",")
    if preset not in PRESETS:
        raise ModelLoadError(f"unknown random model '{preset}'; presets: {', '.join(PRESETS)} "
                             f"(e.g. {PREFIX}llama-3-8b or {PREFIX}llama-3-8b,layers=4)")
    values = dict(PRESETS[preset])
    for item in extra:
        key, _, value = item.partition("=")
        if key not in OVERRIDES or not value.isdigit() or int(value) < 1:
            raise ModelLoadError(f"'{name}': expected {PREFIX}PRESET[,layers=N] with N >= 1, got '{item}'")
        values[OVERRIDES[key]] = int(value)
    return tf.LlamaConfig(**values)


def build(name: str, device: str, dtype: torch.dtype, seed: int = 0) -> Any:
    """A ``LlamaForCausalLM`` of ``config(name)`` with random weights, made on ``device`` in ``dtype`` (eval mode)."""
    import transformers as tf

    cfg = config(name)
    torch.manual_seed(seed)
    try:
        with torch.device(device):
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(f"{name} does not fit on {device} in {dtype}: {exc}") from None
    return model.eval()
