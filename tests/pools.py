"""A KV page pool filled with noise, for the kernel tests that read pages through page tables: a kernel that reads a
page its table does not name picks up garbage instead of a plausible zero."""

from __future__ import annotations

import torch

from headwise.pool import PagePool
from headwise.spec import ModelSpec


def noise_pool(heads: int, group: int, dim: int, dtype: torch.dtype, n_pages: int, page: int, device: str,
               generator: torch.Generator, scale: float = 1.0) -> PagePool:
    """``n_pages`` pages of ``page`` slots for a one-layer model of ``heads`` KV heads (``group`` query heads each),
    allocated on ``device`` and filled with ``scale`` x standard normal noise from ``generator``."""
    spec = ModelSpec(architecture="llama", num_layers=1, num_q_heads=heads * group, num_kv_heads=heads,
                     head_dim=dim, max_context=4096)
    pool = PagePool(spec, n_pages * page * 2 * dim * dtype.itemsize, dtype.itemsize, page)
    pool.allocate(device, dtype)
    assert pool.kv is not None and pool.num_pages == n_pages
    pool.kv.copy_(torch.randn(pool.kv.shape, generator=generator) * scale)
    return pool
