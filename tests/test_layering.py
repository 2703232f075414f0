"""The import direction of the packages: functional <- distillers <- modules <- cli, datamodules apart."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# what each part of lightningkd may import from lightningkd (besides itself); every import counts,
# including those inside functions, so no cycle can be dodged with a late import
ALLOWED: dict[str, set[str]] = {
    "taps": set(),
    "functional": set(),
    "checkpoint_io": set(),
    "teacher": set(),
    "teacher_cache": {"taps"},
    "strategies": {"distillers", "modules"},
    "adapters": {"functional"},
    "distillers": {"taps", "functional", "adapters"},
    "models": {"checkpoint_io"},
    "modules": {
        "taps",
        "functional",
        "adapters",
        "distillers",
        "checkpoint_io",
        "teacher",
        "teacher_cache",
        "models",
    },
    "callbacks": {"taps", "functional", "adapters", "distillers", "checkpoint_io", "teacher", "modules"},
    "export": {"checkpoint_io", "models"},
    "cli": {"taps", "callbacks", "models", "modules", "export", "checkpoint_io", "teacher_cache"},
    "__init__": {"taps", "adapters", "distillers", "modules", "teacher"},
    "__main__": {"cli"},
}


def part_of(module: str) -> str:
    """``lightningkd.distillers.kd`` -> ``distillers``; ``lightningkd`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def import_nodes(path: Path, package_root: Path) -> list[tuple[ast.stmt, str, bool]]:
    """``(node, absolute module name, at module level)`` for every import of ``path``."""
    parts = list(path.relative_to(package_root.parent).with_suffix("").parts)
    package = parts[:-1]  # the package a file's relative imports start from (its own, for __init__.py)
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node, alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - (node.level - 1)] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node, module, id(node) in top_level))
    return found


def imported_modules(path: Path, package_root: Path) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every module ``path`` imports (relative imports resolved)."""
    return [(node.lineno, module) for node, module, _ in import_nodes(path, package_root)]


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", sources("lightningkd"), ids=lambda p: str(p.relative_to(ROOT)))
def test_lightningkd_imports_point_down(path: Path) -> None:
    mine = part_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
    wrong = []
    for line, module in imported_modules(path, ROOT / "lightningkd"):
        top = module.split(".")[0]
        if top == "datamodules":
            wrong.append(f"line {line}: {module} (lightningkd never imports datamodules)")
        elif top == "lightningkd" and module != "lightningkd":
            target = part_of(module)
            if target != mine and target not in ALLOWED[mine]:
                wrong.append(f"line {line}: {module} ({mine} may import {sorted(ALLOWED[mine])})")
        elif module == "lightningkd" and mine != "__init__":
            wrong.append(f"line {line}: lightningkd (import the part, not the package)")
    assert not wrong, wrong


@pytest.mark.parametrize("path", sources("datamodules"), ids=lambda p: str(p.relative_to(ROOT)))
def test_datamodules_never_import_lightningkd(path: Path) -> None:
    wrong = [
        f"line {line}: {module}"
        for line, module in imported_modules(path, ROOT / "datamodules")
        if module.split(".")[0] == "lightningkd"
    ]
    assert not wrong, wrong


def test_the_check_sees_late_imports(tmp_path) -> None:
    source = tmp_path / "lightningkd" / "functional" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from lightningkd.modules import base\n    from .y import z\n")
    found = imported_modules(source, tmp_path / "lightningkd")
    assert found == [(2, "lightningkd.modules"), (3, "lightningkd.functional.y")]
    assert part_of("lightningkd.modules") not in ALLOWED["functional"]


@pytest.mark.parametrize("path", sources("lightningkd"), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_late_lightningkd_imports_and_no_private_names_of_siblings(path: Path) -> None:
    wrong = []
    for node, module, at_top in import_nodes(path, ROOT / "lightningkd"):
        if module.split(".")[0] != "lightningkd":
            continue
        if not at_top:  # a late import only hides a cycle
            wrong.append(f"line {node.lineno}: {module} imported inside a function or class")
        if isinstance(node, ast.ImportFrom):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private:  # shared helpers live in lightningkd/functional/_helpers.py, under public names
                wrong.append(f"line {node.lineno}: private {private} of {module}")
    assert not wrong, wrong


def test_functional_uses_torch_and_the_standard_library_only() -> None:
    for path in sorted((ROOT / "lightningkd" / "functional").glob("*.py")):
        for line, module in imported_modules(path, ROOT / "lightningkd"):
            root = module.split(".")[0]
            assert root in ("torch", "__future__", "lightningkd") or root in sys.stdlib_module_names, (
                f"{path.name}:{line} imports {module}"
            )
