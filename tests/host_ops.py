"""Which aten operations a block of code runs, recorded with a ``TorchDispatchMode``: the tests that check what a
hot path asks of the host (a tensor made from host data, an output sized by tensor values) read the list."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Outputs sized by tensor values: on a GPU each stops the host until the device has drained.
VALUE_SIZED = {"aten.nonzero.default", "aten.masked_select.default", "aten._local_scalar_dense.default"}


class HostOps(TorchDispatchMode):
    """``with HostOps() as ops:`` records ``(op name, output shape or None)`` in ``ops.ops``."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, tuple[int, ...] | None]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        name = str(func)
        if name == "aten.index.Tensor" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                               for i in args[1]):
            name = "aten.index.Tensor(bool)"  # compacts a mask: value-sized too
        self.ops.append((name, tuple(out.shape) if isinstance(out, torch.Tensor) else None))
        return out

    def value_sized(self) -> list[str]:
        return [n for n, _ in self.ops if n in VALUE_SIZED or n == "aten.index.Tensor(bool)"]

    def from_host(self) -> list[tuple[int, ...] | None]:
        """Shapes of the tensors made from host data (``torch.tensor(list)``)."""
        return [shape for n, shape in self.ops if n == "aten.lift_fresh.default"]
