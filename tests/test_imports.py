"""The package's import graph: no two modules import each other (at module level or inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import sde_diffusion

PKG = Path(sde_diffusion.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str, modules: Set[str]) -> Set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from .pkg import mod` may name a submodule.
            for alias in node.names:
                if f"{target}.{alias.name}" in modules:
                    out.add(f"{target}.{alias.name}")
            if target in modules:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
    out.discard(name)
    return out


def import_graph() -> Dict[str, Set[str]]:
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    return {name: _imports(path, name, modules) for name, path in files.items()}


def test_graph_sees_known_edges() -> None:
    g = import_graph()
    assert "sde_diffusion.checkpoints" in g["sde_diffusion.tasks.classifier"]
    assert "sde_diffusion.tasks.common" in g["sde_diffusion.tasks.score_matching"]
    assert "sde_diffusion.fit" in g["sde_diffusion.tasks.score_matching"]


def test_no_two_modules_import_each_other() -> None:
    g = import_graph()
    # A package's __init__ re-exporting its children is not a circle of two modules' logic.
    pairs = sorted(
        (a, b)
        for a, deps in g.items()
        for b in deps
        if a < b and a in g.get(b, set()) and not (b.startswith(a + ".") or a.startswith(b + "."))
    )
    assert pairs == [], f"modules that import each other: {pairs}"
