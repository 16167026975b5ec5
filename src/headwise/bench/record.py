"""The one writer of result files: every benchmark, experiment and eval records the same provenance.

A result document is ``{"command", "commit", "device", "gpu", "torch", "date", "results"}``: the command that
made it, the checkout's commit (``+dirty`` with uncommitted changes), the device it ran on, the GPU model
(None on CPU), the torch version and the UTC date. Files are named ``<stem>_<date>.json``; a second run on the
same day gets ``_2``, ``_3``, ... instead of overwriting the first.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str:
    """The checkout's commit, ``+dirty`` when tracked files differ from it; ``HEADWISE_COMMIT`` names it where
    the tree travels without .git (a GPU box); "unknown" outside a checkout."""
    if os.environ.get("HEADWISE_COMMIT"):
        return os.environ["HEADWISE_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=here,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def gpu_model(device: Any = None) -> str | None:
    """The CUDA GPU's model name (``torch.cuda.get_device_name``) for a CUDA ``device`` (default: the current
    one, if any), else None."""
    import torch

    if device is None:
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def device_name(device: Any = None) -> str:
    """The GPU model on CUDA; on CPU, the processor's model and torch's thread count."""
    import torch

    gpu = gpu_model(device)
    if gpu is not None:
        return gpu
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def result_doc(command: str, results: Any, device: Any = None) -> dict[str, Any]:
    """A result document (module docstring) for ``results``, measured on ``device`` (default: the current CUDA
    device, else the CPU)."""
    import torch

    return {
        "command": command,
        "commit": git_commit(),
        "device": device_name(device),
        "gpu": gpu_model(device),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "results": results,
    }


def result_path(out_dir: str | Path, stem: str) -> Path:
    """A free file name for a new result: ``<out_dir>/<stem>_<date>.json``, or ``..._<n>.json`` if taken."""
    base = f"{stem}_{_dt.date.today().isoformat()}"
    path = Path(out_dir) / f"{base}.json"
    n = 2
    while path.exists():
        path = Path(out_dir) / f"{base}_{n}.json"
        n += 1
    return path


def write_result(doc: dict[str, Any], path: str | Path) -> Path:
    """Write ``doc`` as JSON to ``path`` atomically (a run cut short leaves the previous contents)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path


def save_result(command: str, results: Any, out_dir: str | Path, stem: str, device: Any = None) -> Path:
    """``result_doc`` written to a new ``result_path``; returns the path."""
    return write_result(result_doc(command, results, device), result_path(out_dir, stem))
