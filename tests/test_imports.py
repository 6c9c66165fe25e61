"""The package's imports run one way (docs/architecture.md, "Layers and imports"): read from the
source with `ast` (every `import`, at module level or inside a function), nothing is imported."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "jaxmamba"

#: The layers, lowest first: a module may import its own layer and those below it, never above.
#: A name is a top-level module or package of jaxmamba; a command module (`cli.py` or `cli/`
#: anywhere) belongs to the `cli` layer wherever it lives.
LAYERS = (
    ("errors", "choices", "atomic", "jsonfile", "console", "distributed", "typed_yaml", "config",
     "nnunet_plans", "plans", "scan_math", "compile_cache", "paths", "peers", "diskspace"),
    ("kernels",),
    ("ops",),
    ("layers",),
    ("models",),
    ("data", "datasets", "interop", "rundir", "runlock"),
    ("train", "infer"),
    ("cli",),
)
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
#: Imports the layers would allow but docs/architecture.md rules out: the data pipeline knows
#: plans, never networks.
FORBIDDEN = {("data", "models")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of `jaxmamba.X[.Y...]`: `cli` for command modules, else X (the package itself is
    `jaxmamba`, whose `__init__` is a layer of its own: below everything but importing nothing)."""
    parts = module.split(".")
    if "cli" in parts[1:]:
        return "cli"
    return parts[1] if len(parts) > 1 else "jaxmamba"


def imports(path: Path, modules: set[str]) -> dict[str, int]:
    """jaxmamba modules that `path` imports -> the line of the first import."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:
                parts.pop()
            target = ".".join(parts)
            if target and target != name and target.startswith("jaxmamba"):
                found.setdefault(target, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports(path, set(paths)) for name, path in paths.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One import cycle of `graph` (modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def upward_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets.items()):
            if target == "jaxmamba":  # the package's __init__ (its version, nothing else)
                continue
            if RANK[layer(target)] > RANK[layer(module)]:
                bad.append(f"{module} (line {line}) imports {target}: layer "
                           f"{layer(module)!r} is below {layer(target)!r}")
    return bad


def forbidden_imports(graph: dict[str, dict[str, int]]) -> list[str]:
    return [f"{module} (line {line}) imports {target}"
            for module, targets in sorted(graph.items())
            for target, line in sorted(targets.items())
            if (layer(module), layer(target)) in FORBIDDEN]


def test_every_module_has_a_layer():
    """A new top-level module or package must be placed in LAYERS (and in docs/architecture.md)."""
    unplaced = sorted({layer(m) for m in import_graph()} - set(RANK) - {"jaxmamba"})
    assert not unplaced, (f"jaxmamba.{unplaced}: not in tests/test_imports.py's LAYERS; add it "
                          "to its layer there and in docs/architecture.md")


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_data_does_not_import_models():
    assert forbidden_imports(import_graph()) == []


def test_the_training_loop_does_not_import_infer():
    """Only the final validation (`train/validate.py`) predicts; the loop builds its mesh from
    `ops/mesh.py`."""
    assert not [t for t in import_graph()["jaxmamba.train.loop"] if t.startswith("jaxmamba.infer")]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_package_init_imports_nothing_of_its_own():
    """`import jaxmamba` stays cheap and below every layer (so that `import jaxmamba.X` never
    pulls in another layer)."""
    assert import_graph()["jaxmamba"] == {}


def test_the_checks_see_violations():
    """The checks themselves: a kernel importing the public op is upward, a two-module loop is a
    cycle, and relative imports resolve."""
    graph = {"jaxmamba.kernels.scan_forward": {"jaxmamba.ops.selective_scan": 3},
             "jaxmamba.ops.selective_scan": {"jaxmamba.kernels.scan_forward": 9}}
    assert upward_imports(graph) == [
        "jaxmamba.kernels.scan_forward (line 3) imports jaxmamba.ops.selective_scan: layer "
        "'kernels' is below 'ops'"]
    assert find_cycle(graph) == ["jaxmamba.kernels.scan_forward", "jaxmamba.ops.selective_scan",
                                 "jaxmamba.kernels.scan_forward"]
    assert layer("jaxmamba.train.cli") == layer("jaxmamba.cli.train") == "cli"
    assert forbidden_imports({"jaxmamba.data.pipeline": {"jaxmamba.models.build": 7}}) == [
        "jaxmamba.data.pipeline (line 7) imports jaxmamba.models.build"]


def test_relative_imports_resolve(tmp_path, monkeypatch):
    pkg = tmp_path / "jaxmamba"
    (pkg / "ops").mkdir(parents=True)
    for f in ("__init__.py", "scan_math.py", "ops/__init__.py", "ops/scan_xla.py"):
        (pkg / f).write_text("")
    (pkg / "ops/scan_xla.py").write_text("from ..scan_math import softplus\nfrom . import x\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", pkg)
    graph = import_graph()
    assert graph["jaxmamba.ops.scan_xla"] == {"jaxmamba.scan_math": 1, "jaxmamba.ops": 2}


@pytest.mark.parametrize("module", ["jaxmamba.kernels.scan_common", "jaxmamba.kernels.scan_forward",
                                    "jaxmamba.kernels.scan_backward",
                                    "jaxmamba.kernels.selective_scan"])
def test_kernels_do_not_import_ops(module):
    """The kernels take their maths from `scan_math`; the reference scan is only their tests'
    oracle."""
    assert not [t for t in import_graph()[module] if t.startswith("jaxmamba.ops")]
