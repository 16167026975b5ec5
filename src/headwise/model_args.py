"""The model-loading arguments every command shares (``MODEL``, ``--device``, ``--dtype``) and the load they
describe, public so that subcommand modules use them without reaching into ``headwise.cli``."""

from __future__ import annotations

import argparse
from typing import Any


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="bundled name (smollm2-135m, gemma3-270m), a .gguf file or a HF model directory")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU), bfloat16 (default on CUDA), float16")


def load_model_from_args(args: argparse.Namespace) -> Any:
    """``load_model`` for parsed ``add_model_args`` arguments; the dtype defaults to bfloat16 on CUDA, float32
    on CPU."""
    from headwise.models import load_model

    dtype = args.dtype
    if dtype is None:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = "bfloat16" if device == "cuda" else "float32"
    return load_model(args.model, device=args.device, dtype=dtype)
