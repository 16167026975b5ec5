"""What the decode kernels and the policies that call them share, without importing Triton: quantized KV's code
widths, the device-side cache length of CUDA-graph decode, the in-kernel selection's page limit, and copying small
host-made index tensors to the device without stopping the host."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # read once, as triton.jit does
KV_CODE_BITS = (2, 4, 8)
"""The code widths of quantized KV (``kv_quant.BITS``): here so that the Triton kernels need not import the module
that launches them."""
MAX_SELECT_PAGES = 32768  # page scores per row the Triton top-k holds in registers (512K tokens at page 16)


@dataclass(frozen=True)
class DeviceLength:
    """A cache length that lives on the device, for decode steps replayed from a CUDA graph: the valid slots
    are ``min(count[0] + add, limit)``, read by the kernel when it runs; the launch (grid, splits) is sized for
    ``limit`` slots, and programs past the valid ones find nothing to attend. ``count`` is a one-element
    integer tensor on the kernel's device (e.g. the position of the token being decoded, with ``add=1``)."""

    count: torch.Tensor
    add: int
    limit: int


def length_args(length: int | DeviceLength) -> tuple[int, torch.Tensor | None, int]:
    """(limit, device tensor or None, add) of a length argument."""
    if isinstance(length, DeviceLength):
        assert length.count.numel() == 1 and not length.count.is_floating_point(), "count: one integer element"
        return int(length.limit), length.count, int(length.add)
    return int(length), None, 0


def host_to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``host``, a CPU tensor just made from host ints (slots, lengths, page ids), on ``device`` without stopping the
    host. On CUDA it goes through pinned memory, asynchronously (PyTorch's caching host allocator keeps the pinned
    block until the copy has run): a copy from pageable memory waits until the device has drained the work queued
    before it, as a synchronization would, and the paged steps made several in every layer. Elsewhere a plain
    ``to``, and so while a CUDA graph is being captured: a graph would record the pinned block's address and copy
    from it again at every replay, long after the block went back to the allocator, where a plain copy fails the
    capture loudly."""
    if torch.device(device).type != "cuda" or torch.cuda.is_current_stream_capturing():
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
