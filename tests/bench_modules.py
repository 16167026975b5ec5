"""Load a script of bench/ as a module, for the tests that call its functions (the scripts are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def bench_module(relative: str) -> ModuleType:
    """``bench/<relative>`` (e.g. ``"retrieval_curve.py"``, ``"kvpress/import_outputs.py"``), executed afresh."""
    path = ROOT / "bench" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
