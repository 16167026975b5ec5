"""Pieces the server tests share: the heterogeneous plan they serve and the one-thread fixture."""

from __future__ import annotations

import pytest
import torch

from headwise.plan import HeadPlan
from headwise.policies import Full, Streaming


def mixed_plan(spec, window: int = 8, name: str = "") -> HeadPlan:
    """Full and streaming(sink=2, window) KV heads alternating by (layer + head): heterogeneous per-head cache
    lengths, and prompts longer than the window overflow it."""
    rows = [[Full() if (i + h) % 2 == 0 else Streaming(sink=2, window=window) for h in range(spec.num_kv_heads)]
            for i in range(spec.num_layers)]
    return HeadPlan.from_policies(spec, rows, name)


@pytest.fixture(scope="module")
def one_torch_thread():
    """The server, its scheduler and the test's client threads share this process: one intra-op thread
    keeps OpenMP workers from spinning against them (10x faster steps on a busy 2-core machine)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
