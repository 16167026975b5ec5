"""Attention policies, one per file, and the registry that maps plan names to them.

Adding a policy: write ``policies/<name>.py`` with a frozen dataclass subclassing ``Policy`` and add one line
to ``_REGISTRY`` below.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from headwise.errors import PlanError
from headwise.policies.a_shape import AShape
from headwise.policies.act import ACT
from headwise.policies.base import AttendContext, Policy
from headwise.policies.block_topk import BlockTopK
from headwise.policies.full import Full
from headwise.policies.hyper import Hyper
from headwise.policies.knorm import KNorm
from headwise.policies.longheads import LongHeads
from headwise.policies.page_topk import PageTopK
from headwise.policies.quantized import Quantized
from headwise.policies.recycled import Recycled
from headwise.policies.retrieval_offload import RetrievalOffload
from headwise.policies.seer import Seer
from headwise.policies.streaming import Streaming
from headwise.policies.tidal import Tidal
from headwise.policies.vertical_slash import VerticalSlash

_REGISTRY: dict[str, type[Policy]] = {
    Full.name: Full,
    Streaming.name: Streaming,
    PageTopK.name: PageTopK,
    Tidal.name: Tidal,
    Recycled.name: Recycled,
    AShape.name: AShape,
    VerticalSlash.name: VerticalSlash,
    BlockTopK.name: BlockTopK,
    Quantized.name: Quantized,
    LongHeads.name: LongHeads,
    RetrievalOffload.name: RetrievalOffload,
    ACT.name: ACT,
    Hyper.name: Hyper,
    Seer.name: Seer,
    KNorm.name: KNorm,
}


def policy_names() -> list[str]:
    return sorted(_REGISTRY)


def build_policy(spec: dict[str, Any], where: str = "") -> Policy:
    """Instantiate a policy from a plan entry ``{"policy": name, "params": {...}, "decode": {...}}``."""
    at = f" at {where}" if where else ""
    if not isinstance(spec, dict) or "policy" not in spec:
        raise PlanError(f"head entry{at} must be an object with a 'policy' field, got {spec!r}")
    name = spec["policy"]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise PlanError(f"unknown policy '{name}'{at}; known policies: {', '.join(policy_names())}")
    params = dict(spec.get("params") or {})
    if not isinstance(params, dict):
        raise PlanError(f"'params'{at} must be an object, got {params!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    if "decode" in spec:
        if "decode" not in fields:
            raise PlanError(f"policy '{name}'{at} takes no 'decode' policy")
        params["decode"] = build_policy(spec["decode"], where + " (decode)")
    unknown = sorted(set(params) - fields)
    if unknown:
        raise PlanError(
            f"policy '{name}'{at}: unknown parameter(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(fields)) or 'none'}"
        )
    try:
        policy = cls(**params)
    except (TypeError, ValueError) as exc:
        raise PlanError(f"policy '{name}'{at}: {exc}") from None
    try:
        policy.validate()
    except PlanError as exc:
        raise PlanError(f"{exc}{at}") from None
    return policy


__all__ = ["ACT", "AShape", "AttendContext", "BlockTopK", "Full", "Hyper", "LongHeads", "PageTopK", "Policy", "Quantized", "Recycled", "RetrievalOffload", "Seer", "Streaming", "Tidal", "VerticalSlash", "build_policy", "policy_names"]
