"""The package's layering, pinned: which way imports run (README, Layout).

Every import counts, including those inside functions, since a late import
hides a cycle instead of removing it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "blockmirror"

# Layers from the bottom; a module may import its own layer and those below.
LAYERS = [
    {"_version", "errors", "units", "extents", "files", "closeable", "_numpy", "_core",
     "_fastwrite", "_remote", "_nfs"},
    {"_bindings"},
    {"tracking", "copying"},
    {"migration", "frontend"},  # frontend: serve, beside the sync (tracking, never _bindings)
    {"cli", "__init__", "__main__"},
]
# Only these wrappers of the C areas may import the binding.
BINDING_USERS = {"_bindings", "tracking", "copying"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")} | {
        _module_name(p) for p in PACKAGE.rglob("*.pyi")}


def _imports(path: Path, modules: set[str] | None = None) -> set[str]:
    """The blockmirror modules PATH imports: ``from pkg import mod`` counts as
    pkg.mod (not pkg), ``from pkg import name`` as pkg."""
    modules = _modules() if modules is None else modules
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return {name for name in found if name.split(".")[0] == "blockmirror"}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        graph[name] = {m for m in _imports(path, modules) if m in modules and m != name}
    return graph


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    top = _top(module)
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_no_import_cycle() -> None:
    graph = _graph()
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            cycle = [*stack[stack.index(node):], node]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            # The package's __init__ re-exports the public names: importing
            # blockmirror.x.y runs it first, but it is no dependency of x.y.
            if nxt != "blockmirror":
                visit(nxt, [*stack, node])
        done.add(node)

    for module in sorted(graph):
        visit(module, [])


def test_imports_run_down_the_layers() -> None:
    upward = [
        f"{src} imports {dst}"
        for src, targets in _graph().items()
        for dst in targets
        if dst != "blockmirror" and _layer(dst) > _layer(src)
    ]
    assert upward == []


def test_only_the_thin_wrappers_import_the_binding() -> None:
    offenders = [
        f"{src} imports {dst}"
        for src, targets in _graph().items()
        for dst in targets
        if _top(dst) in ("_bindings", "_core", "_fastwrite", "_remote", "_nfs")
        and _top(src) not in BINDING_USERS
    ]
    assert offenders == []


def test_the_checker_sees_late_imports(tmp_path: Path) -> None:
    """The graph must include imports inside functions (they hid cycles)."""
    sample = tmp_path / "late.py"
    sample.write_text("def f():\n    from blockmirror.migration import sync\n")
    assert "blockmirror.migration" in _imports(sample)


def test_every_subpackage_ships():
    """pyproject.toml's package list must name every package folder: with
    ``packages = ["blockmirror"]`` a wheel held only the top level, and an
    installed blockmirror failed at its first subpackage import."""
    import tomllib
    from setuptools import find_packages

    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {".".join(p.relative_to(PACKAGE.parent).parts)
               for p in PACKAGE.rglob("__init__.py") for p in [p.parent]}
    if "packages" in config and isinstance(config["packages"], list):
        shipped = set(config["packages"])
    else:
        include = config["packages"]["find"].get("include", ["*"])
        shipped = set(find_packages(str(PACKAGE.parent), include=include))
    assert on_disk <= shipped, f"not shipped: {sorted(on_disk - shipped)}"
