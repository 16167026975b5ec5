"""The model-loading arguments every command shares (``MODEL``, ``--device``, ``--dtype``) and the load they
describe: one declaration, one dtype default (``models.load_model``'s: bfloat16 on CUDA, float32 elsewhere).
A module of its own so that subcommand modules use it without importing ``headwise.cli`` (which imports them)."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """Add MODEL, --device and --dtype (read by ``load_from_args``). ``required=False``: MODEL may be left out
    (commands that can also run without a model)."""
    p.add_argument("model", nargs=None if required else "?",
                   help="bundled name (smollm2-135m, gemma3-270m), a .gguf file, a HF model directory or a hub id "
                        "(org/name)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None,
                   help="float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU)")


def load_from_args(args: argparse.Namespace) -> Any:
    """Load the model named by ``add_model_args``' arguments (a ``LoadedModel``)."""
    from headwise.models import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype)
