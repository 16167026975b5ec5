"""Opt-in compilation of a model's layers around attention: its MLPs, RMS norms and attention modules
(``Engine(compile_layers=True)``).

A prompt chunk's step spends a third of its GPU time outside the GEMMs and attention (docs/serving.md, "What 3x in
the mix needs"): transformers' RMS norm is six elementwise kernels over fp32 copies of the hidden states, a SwiGLU
MLP writes ``act(gate)`` before multiplying it by ``up``, and an attention module rotates its queries and keys
(``rotate_half``: a negation, a concatenation, two products and a sum each) and transposes them before it calls the
attention function. ``torch.compile`` (Inductor) fuses each into one or two kernels. headwise compiles only those
modules, each in place (``nn.Module.compile``, ``dynamic=True``: chunks and batches of any size reuse one graph). In an
attention module the compiled graph stops at headwise's attention function (registered ``torch.compiler.disable``d
while layers are compiled), which runs as it does uncompiled: the cache, its stores and the engine's kernels never
have to be traceable. The first forward at each new kind of shape pays the compilation (seconds on a GPU). The model
stays the same object: its modules call their compiled forward from then on, also outside the engine.
"""

from __future__ import annotations

import torch

COMPILED = "_headwise_compiled"


def compiled_kinds(module: torch.nn.Module) -> bool:
    """Whether ``compile_layers`` compiles this module: an MLP, an RMS norm or an attention module (by class name,
    as transformers names them in every architecture headwise loads: ``LlamaMLP``, ``Gemma3MLP``, ``Qwen3RMSNorm``,
    ``LlamaAttention``, ...)."""
    name = type(module).__name__
    return name.endswith(("MLP", "RMSNorm", "Attention"))


def exclude_attention_function() -> None:
    """Register headwise's attention function wrapped in ``torch.compiler.disable``: a compiled attention module
    breaks its graph there and calls it eagerly (uncompiled, the wrapper only calls it)."""
    from transformers import AttentionInterface

    from headwise.attention import ATTN_NAME, headwise_attention

    AttentionInterface.register(ATTN_NAME, torch.compiler.disable(headwise_attention))


def compile_layers(model: torch.nn.Module) -> list[str]:
    """Compile ``model``'s MLP, RMS-norm and attention modules in place (once: a second call compiles nothing),
    headwise's attention function left out of the graphs. Returns the names of the modules compiled."""
    exclude_attention_function()
    done: list[str] = []
    for name, module in model.named_modules():
        if compiled_kinds(module) and not getattr(module, COMPILED, False):
            module.compile(dynamic=True)
            setattr(module, COMPILED, True)
            done.append(name)
    return done
