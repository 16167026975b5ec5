"""Tiny random-weight models of each supported architecture (no weights to download)."""

from __future__ import annotations

import torch

from headwise.models import LoadedModel
from headwise.spec import ModelSpec

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3_text")


def tiny_config(arch: str, **over):
    import transformers as tf

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024)
    common.update(over)
    if arch == "llama":
        return tf.LlamaConfig(**common)
    if arch == "qwen2":
        return tf.Qwen2Config(**common)
    if arch == "qwen3":
        return tf.Qwen3Config(**common)
    if arch == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if arch == "gemma3_text":
        return tf.Gemma3TextConfig(**({"sliding_window": 16} | common),
                                   layer_types=["sliding_attention", "sliding_attention", "full_attention",
                                                "sliding_attention"][: common["num_hidden_layers"]])
    raise ValueError(arch)


def tiny_model(arch: str = "llama", seed: int = 0, **over) -> LoadedModel:
    import transformers as tf

    torch.manual_seed(seed)
    config = tiny_config(arch, **over)
    config._attn_implementation = "sdpa"
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    return LoadedModel(f"tiny-{arch}", model, None, ModelSpec.from_config(config), "random")
