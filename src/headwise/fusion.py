"""Opt-in compilation of a model's layers around attention (``Engine(compile_layers=True)``).

A prompt chunk's step spends a third of its GPU time outside the GEMMs and attention (docs/serving.md, "What 3x in
the mix needs"): transformers' RMS norm is six elementwise kernels over fp32 copies of the hidden states, a SwiGLU
MLP writes ``act(gate)`` before multiplying it by ``up``, an attention module rotates its queries and keys
(``rotate_half``: a negation, a concatenation, two products and a sum each) and transposes them before it calls the
attention function, and each residual add is a kernel of its own. ``torch.compile`` (Inductor) fuses them.

headwise compiles each decoder layer in place (``nn.Module.compile``, ``dynamic=True``: chunks and batches of any
size reuse one graph), and, outside the decoder layers, the MLP, RMS-norm and attention modules (the final norm;
any architecture whose layers are not named ``*DecoderLayer``). The graphs stop at headwise's attention function
(registered ``torch.compiler.disable``d while layers are compiled), which runs as it does uncompiled: the cache, its
stores and the engine's kernels never have to be traceable. The first forward at each new kind of shape pays the
compilation (seconds on a GPU). transformers' attention modules pass their ``layer_idx``, a constant to Dynamo, to
the cache's ``update``; ``HeadwiseCache.update`` never reads it, so every layer shares one graph (``Cache.update``
indexes its layers with it: one graph per layer, and past Dynamo's recompile limit of 8 the rest run eagerly). The
model stays the same object: its modules call their compiled forward from then on, also outside the engine.
"""

from __future__ import annotations

import torch

COMPILED = "_headwise_compiled"
LAYER_KINDS = ("DecoderLayer",)
"""Class-name endings of the modules compiled whole (transformers' ``LlamaDecoderLayer``, ``Gemma3DecoderLayer``,
...)."""
PART_KINDS = ("MLP", "RMSNorm", "Attention")
"""Class-name endings of the modules compiled where no compiled layer holds them (``LlamaMLP``, ``Qwen3RMSNorm``,
``LlamaAttention``, ...)."""


def compiled_kinds(module: torch.nn.Module) -> bool:
    """Whether ``compile_layers`` may compile this module: a decoder layer, or an MLP, an RMS norm or an attention
    module (by class name, as transformers names them in every architecture headwise loads)."""
    return type(module).__name__.endswith(LAYER_KINDS + PART_KINDS)


def exclude_attention_function() -> None:
    """Register headwise's attention function wrapped in ``torch.compiler.disable``: a compiled module breaks its
    graph there and calls it eagerly (uncompiled, the wrapper only calls it)."""
    from transformers import AttentionInterface

    from headwise.attention import ATTN_NAME, headwise_attention

    AttentionInterface.register(ATTN_NAME, torch.compiler.disable(headwise_attention))


def compile_layers(model: torch.nn.Module) -> list[str]:
    """Compile ``model``'s decoder layers, and the MLP, RMS-norm and attention modules outside them, in place (once:
    a second call compiles nothing), headwise's attention function left out of the graphs. Returns the names of the
    modules compiled."""
    exclude_attention_function()
    done: list[str] = []
    inside: list[str] = []  # prefixes of the modules compiled whole (their parts run in their graphs)
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        if not compiled_kinds(module):
            continue
        if type(module).__name__.endswith(LAYER_KINDS):
            inside.append(name)
        if not getattr(module, COMPILED, False):
            module.compile(dynamic=True)
            setattr(module, COMPILED, True)
            done.append(name)
    return done
