"""The README and docs cite only paths that exist in the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
TOP = ("src", "bench", "docs", "plans", "tests")
# A path in backticks or plain text that starts at a top-level folder of the repository; ``COMMIT:path`` cites
# git history, not the tree, and is left alone.
BARE = re.compile(r"(?<![\w./$:-])((?:" + "|".join(TOP) + r")/[\w.*/-]*[\w*/])")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def cited_paths(doc: Path) -> list[str]:
    """Repository paths a markdown file cites: link targets (relative to the file) and bare repo paths
    (relative to the repository root), without anchors or test ids."""
    text = doc.read_text()
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL, or an anchor in the same file
        path = (doc.parent / target.split("#")[0]).resolve()
        out.append(str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    out += [m.rstrip(".") for m in BARE.findall(text)]
    return out


def exists(path: str) -> bool:
    return any(ROOT.glob(path)) if "*" in path else (ROOT / path).exists()


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_a_doc_cites_exists(doc):
    assert [p for p in cited_paths(doc) if not exists(p)] == []


def test_the_path_finder_sees_links_and_bare_paths():
    text = "see [a](../plans/p.json#top), `src/headwise/q.py::test_x` and bench/results/r_*.json. $OUT/y.json"
    assert LINK.findall(text) == ["../plans/p.json#top"]
    assert BARE.findall(text) == ["src/headwise/q.py", "bench/results/r_*.json"]


def test_readme_is_a_map_within_120_lines_that_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 120
    head = "\n".join(lines[:8])
    assert head.index("make demo") < head.index("make test")
