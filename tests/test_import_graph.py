"""The packages of src/fedtune import each other without cycles, read from the source (ast), imports inside
functions included: a lazy import is still a dependency.

``core`` is the bottom layer (messages, keys on the wire, the fit contract, state): it imports nothing of
fedtune but ``config`` and ``errors``. No edge is excused: any cycle fails here, and so does any import
upward through ``LAYERS`` (the list docs/DESIGN.md draws)."""

from __future__ import annotations

import ast
from pathlib import Path

import fedtune

SRC = Path(fedtune.__file__).resolve().parent

# lowest first; a package imports only packages of lower layers (docs/DESIGN.md). "__init__": fedtune itself
LAYERS = [
    {"errors"},
    {"config"},
    {"core"},
    {"models", "aggregation", "data"},
    {"tasks"},
    {"privacy"},
    {"client"},
    {"transport"},
    {"server"},
    {"run"},
    {"dashboard"},
    {"deploy"},
    {"api"},
    {"cli"},
    {"__init__"},
]


def package_edges() -> dict[str, dict[str, list[str]]]:
    """{package: {imported package: ["file:line", ...]}} between top-level packages of fedtune."""
    edges: dict[str, dict[str, list[str]]] = {}
    packages = {p.name.removesuffix(".py") for p in SRC.iterdir() if p.is_dir() or p.suffix == ".py"}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        pkg = rel.parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "fedtune"]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                parts = name.split(".")
                if parts[0] == "fedtune" and len(parts) > 1 and parts[1] != pkg and parts[1] in packages:
                    edges.setdefault(pkg, {}).setdefault(parts[1], []).append(f"{rel}:{node.lineno}")
    return edges


def cycles(edges: dict[str, dict[str, list[str]]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_cycles_finds_a_cycle_and_only_a_cycle() -> None:
    graph = {"a": {"b": []}, "b": {"c": []}, "c": {"a": []}, "d": {"a": []}}
    assert cycles(graph) == [frozenset("abc")]
    assert cycles({"a": {"b": []}, "b": {}}) == []


def test_no_cycles_between_packages() -> None:
    edges = package_edges()
    found = cycles(edges)
    where = {
        tuple(sorted(c)): {f"{a}->{b}": edges[a][b][:3] for a in c for b in edges.get(a, {}) if b in c} for c in found
    }
    assert not found, f"package cycles: {where}"


def test_core_is_the_bottom_layer() -> None:
    imported = set(package_edges().get("core", {}))
    assert imported <= {"config", "errors"}, f"core imports {sorted(imported - {'config', 'errors'})}"


def test_the_edges_that_closed_cycles_are_gone() -> None:
    """client <- server, privacy <- client, core -> tasks: the wire keys, the fit contract, EvalSums and the
    client state store live in core instead. data -> tasks: screening counts examples, the classifier names
    its labels (tasks.classification). run -> api: ``fedtune.federate`` composes participate in api.
    config -> privacy: the SecAgg availability bounds the config is checked with live in config."""
    edges = package_edges()
    gone = [("client", "server"), ("privacy", "client"), ("core", "tasks"), ("server", "client")]
    gone += [("data", "tasks"), ("run", "api"), ("config", "privacy")]
    for a, b in gone:
        assert b not in edges.get(a, {}), f"{a} imports {b}: {edges[a][b]}"


def test_every_package_imports_only_lower_layers() -> None:
    edges = package_edges()
    layer = {pkg: i for i, names in enumerate(LAYERS) for pkg in names}
    assert set(edges) | {b for out in edges.values() for b in out} <= set(layer), "a package missing from LAYERS"
    upward = {f"{a}->{b}": where[:3] for a, out in edges.items() for b, where in out.items() if layer[b] >= layer[a]}
    assert not upward, f"imports at or above their own layer: {upward}"


ROUND_PATH = ["core", "server", "aggregation", "client/worker.py", "transport/base.py", "transport/inprocess.py"]


def test_the_round_path_finds_no_method_or_attribute_by_name() -> None:
    """Typed messages and protocols, no optional attribute found with getattr/hasattr (docs/DESIGN.md)."""
    found = []
    for part in ROUND_PATH:
        for path in sorted((SRC / part).rglob("*.py")) if (SRC / part).is_dir() else [SRC / part]:
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Name)
                    and node.func.id in ("getattr", "hasattr")
                ):
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert not found, f"getattr/hasattr in the round path: {found}"
