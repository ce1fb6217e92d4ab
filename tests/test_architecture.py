"""The package's rooms import one way (docs/architecture.md): no module imports a room above its own, and no
modules import each other in a circle (imports inside functions included)."""

import ast
import collections
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sparsediff"

# Lowest first; a module may import its own room and any room listed before it.
LAYERS = [
    {"_logging"},
    {"kernels"},
    {"runtime"},
    {"methods"},
    {"attention_processors", "hooks"},
    {"api"},
    {"pipelines"},
    {"eval"},
    {"testing"},
    {"commands"},
    {"cli", "__init__"},
]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    path = PACKAGE.parent / name.replace(".", "/")
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_graph() -> dict[str, set[str]]:
    """module -> the sparsediff modules it imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    graph = collections.defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        name = _module(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("sparsediff"):
                    continue
                subs = [f"{target}.{a.name}" for a in node.names]
                graph[name].update(subs if all(map(_is_module, subs)) else [target])
            elif isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name.startswith("sparsediff"))
    return graph


def _room(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(room: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if room in layer)


def test_every_room_has_a_layer():
    rooms = {_room(_module(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set().union(*LAYERS), f"rooms without a layer: {rooms - set().union(*LAYERS)}"


def test_no_import_runs_up():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets
                    if _rank(_room(b)) > _rank(_room(a)))
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, f"modules importing each other in a circle: {circles}"
