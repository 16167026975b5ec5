"""headwise: per-head attention plans for long-context LLM inference.

Profile a model's heads once, give each the cheapest attention and KV cache that keeps its job, and run the
plan: ``load_model`` → ``HeadPlan`` → ``Engine``.
"""

from headwise.errors import HeadwiseError
from headwise.plan import HeadPlan
from headwise.spec import ModelSpec

__version__ = "0.1.0"

__all__ = ["HeadPlan", "HeadwiseError", "ModelSpec", "__version__"]
