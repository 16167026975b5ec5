"""Opt-in compilation of a model's layers outside attention: its MLPs and RMS norms (``Engine(compile_layers=True)``).

A prompt chunk's step spends a third of its GPU time outside the GEMMs and attention (docs/serving.md, "What 3x in
the mix needs"): transformers' RMS norm is six elementwise kernels over fp32 copies of the hidden states, a SwiGLU
MLP writes ``act(gate)`` before multiplying it by ``up``. ``torch.compile`` (Inductor) fuses each into one or two
kernels. headwise compiles only those modules, each in place (``nn.Module.compile``, ``dynamic=True``: chunks and
batches of any size reuse one graph); attention, the cache and the engine's own kernels stay as they are, so nothing
in them has to be traceable. The first forward at each new kind of shape pays the compilation (seconds on a GPU).
The model stays the same object: its modules call their compiled forward from then on, also outside the engine.
"""

from __future__ import annotations

import torch

COMPILED = "_headwise_compiled"


def compiled_kinds(module: torch.nn.Module) -> bool:
    """Whether ``compile_layers`` compiles this module: an MLP or an RMS norm (by class name, as transformers names
    them in every architecture headwise loads: ``LlamaMLP``, ``Gemma3MLP``, ``Qwen3RMSNorm``, ...)."""
    name = type(module).__name__
    return name.endswith("MLP") or name.endswith("RMSNorm")


def compile_layers(model: torch.nn.Module) -> list[str]:
    """Compile ``model``'s MLP and RMS-norm modules in place (once: a second call compiles nothing). Returns the
    names of the modules compiled."""
    done: list[str] = []
    for name, module in model.named_modules():
        if compiled_kinds(module) and not getattr(module, COMPILED, False):
            module.compile(dynamic=True)
            setattr(module, COMPILED, True)
            done.append(name)
    return done
