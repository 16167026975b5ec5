"""headwise: per-head attention plans for long-context LLM inference.

Profile a model's heads once, give each the cheapest attention and KV cache that keeps its job, and run the
plan: ``load_model`` → ``HeadPlan`` → ``Engine``, or inside plain transformers code with ``headwise.apply``.
"""

from __future__ import annotations

from typing import Any

from headwise.errors import HeadwiseError
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec

__version__ = "0.1.0"

__all__ = ["HeadPlan", "HeadwiseError", "ModelSpec", "__version__", "apply"]


def __getattr__(name: str) -> Any:
    # ``apply`` imports transformers (seconds); ``import headwise`` stays light for the CLI.
    if name == "apply":
        from headwise.integration import apply

        return apply
    raise AttributeError(f"module 'headwise' has no attribute {name!r}")
