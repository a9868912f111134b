"""The package is layered: runtime, then host, kvm, x86, then check, explore, trace. Each layer
imports only layers below it (trace, like uapi and intervals, is a leaf any layer may use), generic ``kvm`` never names
``x86``, and nothing in the model (runtime, host, kvm, x86) imports the oracles in ``check``."""

from __future__ import annotations

import ast
from pathlib import Path

import asyncvm

PACKAGE = Path(asyncvm.__file__).parent
#: bottom up; a layer may import the ones before it
ORDER = ["runtime", "host", "kvm", "x86", "check", "explore"]
#: leaves any layer may use (they import no layer)
LEAVES = {"trace"}


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "asyncvm" and parts[1] in (*ORDER, *LEAVES):
        return parts[1]
    return None


def package_edges() -> set[tuple[str, str]]:
    """(importer layer, imported layer) for every import in the package, relative ones resolved."""
    edges: set[tuple[str, str]] = set()
    for path in PACKAGE.rglob("*.py"):
        parts = ("asyncvm", *path.relative_to(PACKAGE).with_suffix("").parts)
        src = _layer(".".join(parts))
        if src is None:
            continue
        package = list(parts if path.name == "__init__.py" else parts[:-1])
        if path.name == "__init__.py":
            package = package[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                full = ".".join([*base, node.module] if node.module else base)
                names = [full, *(f"{full}.{a.name}" for a in node.names)]
            for name in names:
                dst = _layer(name)
                if dst is not None and dst != src:
                    edges.add((src, dst))
    return edges


def test_every_layer_imports_only_layers_below_it() -> None:
    upward = sorted((s, d) for s, d in package_edges() if s in ORDER and d in ORDER and ORDER.index(d) > ORDER.index(s))
    assert not upward, f"imports against the layer order: {upward}"


def test_the_leaves_import_no_layer() -> None:
    bad = sorted((s, d) for s, d in package_edges() if s in LEAVES)
    assert not bad, bad


def test_the_model_never_imports_the_oracles() -> None:
    bad = sorted((s, d) for s, d in package_edges() if d == "check" and s in ("runtime", "host", "kvm", "x86"))
    assert not bad, bad


def test_generic_kvm_reaches_x86_only_through_its_slots() -> None:
    assert ("kvm", "x86") not in package_edges()


def test_the_edge_finder_sees_relative_imports() -> None:
    """The checker can fail: the x86 layer's own imports of generic KVM are found."""
    assert ("x86", "kvm") in package_edges() and ("check", "x86") in package_edges()
