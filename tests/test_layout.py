"""Where code and files live: benchmarks use headwise's public API only; shipped files are found from the code."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def private_uses(path: Path) -> list[str]:
    """``_name`` symbols of headwise a script imports or reaches through an imported headwise module."""
    tree = ast.parse(path.read_text(), str(path))
    modules: set[str] = set()  # local names bound to headwise modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "headwise":
                    modules.add(alias.asname or alias.name.split(".")[0])
                    found += [f"{path.name}:{node.lineno} import {alias.name}"
                              for part in alias.name.split(".") if part.startswith("_")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "headwise":
            found += [f"{path.name}:{node.lineno} from {node.module} import {alias.name}"
                      for alias in node.names if alias.name.startswith("_")]
            modules.update(alias.asname or alias.name for alias in node.names)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_bench_script_uses_a_private_headwise_symbol():
    scripts = sorted((ROOT / "bench").rglob("*.py"))
    assert scripts
    assert [use for path in scripts for use in private_uses(path)] == []


def test_the_private_symbol_check_catches_both_forms(tmp_path):
    script = tmp_path / "s.py"
    script.write_text("from headwise.bench.timing import Timer, _sync\nfrom headwise.kernels import quest as q\n"
                      "q._order_keys\nq.select_pages\n")
    assert private_uses(script) == ["s.py:1 from headwise.bench.timing import _sync", "s.py:3 q._order_keys"]


def test_demo_plan_is_found_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from headwise.eval.cli import DEMO_PLAN

    assert DEMO_PLAN.is_absolute() and DEMO_PLAN.is_file()
    assert DEMO_PLAN == ROOT / "plans" / "smollm2-135m.json"


def test_package_data_names_only_files_that_exist():
    import tomllib

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, patterns in data.items():
        for pattern in patterns:
            assert any((ROOT / "src" / package).glob(pattern)), f"{package}: {pattern} matches no file"
