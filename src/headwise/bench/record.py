"""One shape for every benchmark result file: the command, the commit, the device, the results."""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
from pathlib import Path
from typing import Any


def git_commit() -> str:
    """The checkout's commit; ``HEADWISE_COMMIT`` names it where the tree travels without .git (GPU box)."""
    if os.environ.get("HEADWISE_COMMIT"):
        return os.environ["HEADWISE_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def result_doc(command: str, results: Any) -> dict[str, Any]:
    import torch

    return {
        "command": command,
        "commit": git_commit(),
        "device": device_name(),
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "results": results,
    }


def write_doc(doc: dict[str, Any], out_dir: str | Path, stem: str) -> Path:
    """Write ``<out_dir>/<stem>_<date>.json`` and return its path."""
    path = Path(out_dir) / f"{stem}_{_dt.date.today().isoformat()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return path
