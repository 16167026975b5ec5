"""Shared fixtures. Real-model fixtures load the bundled weights once per session (converted cache reused)."""

from __future__ import annotations

import os

import pytest
import torch

# Triton kernels run in Triton's CPU interpreter when there is no GPU (set before any kernel is launched).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SLOW = os.environ.get("HEADWISE_SLOW") == "1"


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow check: set HEADWISE_SLOW=1 to run")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not SLOW:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def smollm2():
    from headwise.models import load_model

    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    from headwise.models import load_model

    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="session")
def shakespeare_ids(smollm2):
    from headwise.data import shakespeare

    return smollm2.tokenizer(shakespeare(60_000), return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def tiny_llama(smollm2):
    """A 2-layer random Llama (4 query / 2 KV heads) that reads SmolLM2's tokenizer: probes and prompts made
    for the real model run through it in a blink."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from headwise.models import LoadedModel
    from headwise.spec import ModelSpec

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2.tokenizer), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, attn_implementation="sdpa")
    return LoadedModel("tiny-llama", LlamaForCausalLM(cfg).eval(), smollm2.tokenizer, ModelSpec.from_config(cfg),
                       "random")


@pytest.fixture(scope="session")
def tiny_gemma(smollm2):
    """A 4-layer random Gemma 3 (layer 2 global, the others sliding-window 256; 2 KV heads) reading SmolLM2's
    tokenizer, so the held-in probes run through it."""
    import dataclasses

    from tiny import tiny_model

    lm = tiny_model("gemma3_text", vocab_size=len(smollm2.tokenizer), sliding_window=256)
    return dataclasses.replace(lm, tokenizer=smollm2.tokenizer)
