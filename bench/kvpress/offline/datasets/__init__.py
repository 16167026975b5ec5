"""Stand-in for Hugging Face ``datasets`` on the GPU machine only (bench/kvpress/gpu.sh puts it on the path when the
real package does not import there).

kvpress 0.5.5 imports ``datasets.load_dataset`` when it is imported (``kvpress/__init__.py`` imports every press),
but only two presses call it, both to download data: DuoAttentionPress with ``on_the_fly_scoring`` (kmfoda/booksum)
and ExpectedAttentionStatsPress. The GPU machine has no network, and ``datasets`` needs pyarrow (55 MB as a wheel),
which with the rest does not fit the 64 MiB a call may carry. Calling it says so instead of failing obscurely.
"""

from __future__ import annotations

from typing import Any


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("datasets is not installed here (bench/kvpress/offline stand-in): load_dataset"
                       f"{args!r} needs the network and the real package; run_presses.py's presses do not use it")
