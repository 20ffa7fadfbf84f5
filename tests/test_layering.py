"""One direction of imports in dpkernels: no import cycle, and every module imports only from its own floor
or the floors below it (README, "Where things are").

The imports are read from the source with ``ast`` (no module is imported): top-level ones and those inside
functions alike, relative ones resolved against the importing module's package.  ``from P import name``
counts as an import of the module ``P.name`` where that is a module of the package, else of ``P``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dpkernels"

# Floors, bottom first: a module imports from its own floor or lower ones only.  A module's floor is that
# of the longest prefix listed here; a new module outside every prefix fails the test until it gets one.
FLOORS = (
    ("dpkernels.errors", "dpkernels.modes", "dpkernels.reference"),  # the leaves: exceptions, the mode table, the oracle
    ("dpkernels.kernels", "dpkernels.functional"),  # tensor math of one layer's per-sample norms and clipped sums
    ("dpkernels.layers",),  # per layer family: A, G and its per-sample norm and clipped gradient
    ("dpkernels.clipping",),  # the algorithms: ghost, bookkeeping, single sample, FSDP
    ("dpkernels", "dpkernels.engine", "dpkernels.optimizer"),  # the Opacus face (the package root re-exports it)
    ("dpkernels.testing",),  # tolerance checks and one DP step through the public API
    ("dpkernels.models",),  # workloads
    ("dpkernels.profiling",),  # the main job
    ("dpkernels.demo", "dpkernels.__main__"),  # commands
)


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(root: Path = PACKAGE) -> Dict[str, Path]:
    return {module_name(path, root): path for path in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: Set[str]) -> Set[str]:
    """The package's modules that ``name`` (source ``path``) imports anywhere in its source."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules}


def import_graph(root: Path = PACKAGE) -> Dict[str, Set[str]]:
    modules = package_modules(root)
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a path that returns to its start) per strongly connected component of more than one
    module, or of one module that imports itself (Tarjan's algorithm)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_through(graph, sorted(c)) for c in components]


def cycle_through(graph: Dict[str, Set[str]], component: List[str]) -> List[str]:
    """A shortest path start -> ... -> start inside ``component`` (breadth first from its first module)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                return paths[v] + [start]
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"{component} is not strongly connected")


def loop_members(graph: Dict[str, Set[str]], start: str) -> Set[str]:
    """The modules that ``start`` reaches and that reach ``start`` back."""

    def reach(edges: Dict[str, Set[str]]) -> Set[str]:
        seen, todo = {start}, [start]
        while todo:
            for w in edges[todo.pop()] - seen:
                seen.add(w)
                todo.append(w)
        return seen

    reverse: Dict[str, Set[str]] = {v: set() for v in graph}
    for v, targets in graph.items():
        for w in targets:
            reverse[w].add(v)
    return reach(graph) & reach(reverse)


def floor_of(module: str) -> int:
    best = None
    for floor, prefixes in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (floor, prefix)
    if best is None:
        raise KeyError(module)
    return best[0]


def layering_violations(graph: Dict[str, Set[str]]) -> List[str]:
    out = []
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            if floor_of(target) > floor_of(module):
                out.append(f"{module} (floor {floor_of(module)}) imports {target} (floor {floor_of(target)})")
    return out


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    found = cycles(graph)
    loops = [" -> ".join(c) + f"  (modules of this loop: {', '.join(sorted(loop_members(graph, c[0])))})" for c in found]
    assert not found, "import cycles in dpkernels:\n" + "\n".join(loops)


def test_every_module_has_a_floor():
    missing = []
    for module in import_graph():
        try:
            floor_of(module)
        except KeyError:
            missing.append(module)
    assert not missing, f"modules outside every floor of FLOORS (give each one): {missing}"


def test_imports_go_down_the_floors_only():
    found = layering_violations(import_graph())
    assert not found, "imports that go up a floor:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("dpkernels.kernels", ("layers", "clipping", "engine", "optimizer", "profiling", "models")),
        ("dpkernels.functional", ("layers", "clipping", "engine", "optimizer", "profiling", "models")),
        ("dpkernels.layers", ("clipping", "engine", "optimizer", "profiling", "models")),
        ("dpkernels.clipping", ("engine", "optimizer", "profiling", "models")),
    ],
)
def test_the_lower_packages_import_nothing_from_above(package, forbidden):
    graph = import_graph()
    bad = [
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m == package or m.startswith(package + ".")
        for t in targets
        if t.split(".")[1:2] and t.split(".")[1] in forbidden
    ]
    assert not bad, "\n".join(bad)


# ---- the check itself finds what it must --------------------------------------------------------------


def write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "dpkernels" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "dpkernels"


def test_the_check_finds_a_loop_through_a_late_import_inside_a_function(tmp_path):
    """The loop that once ran kernels/__init__ -> layers/linear -> kernels (the late import in a function)."""
    root = write(tmp_path, {
        "__init__.py": "",
        "errors.py": "",
        "kernels/__init__.py": "from ..layers.linear import bias_norm_sq\n",
        "layers/__init__.py": "",
        "layers/linear.py": "from ..errors import E\ndef f():\n    from ..kernels import flash\n",
    })
    graph = import_graph(root)
    assert graph["dpkernels.layers.linear"] == {"dpkernels.errors", "dpkernels.kernels"}
    assert cycles(graph) == [["dpkernels.kernels", "dpkernels.layers.linear", "dpkernels.kernels"]]
    assert layering_violations(graph) == ["dpkernels.kernels (floor 1) imports dpkernels.layers.linear (floor 2)"]


def test_the_check_resolves_absolute_and_package_imports(tmp_path):
    root = write(tmp_path, {
        "__init__.py": "from . import reference\nfrom .engine import PrivacyEngine\n",
        "reference.py": "",
        "engine.py": "import dpkernels.profiling.step\n",
        "profiling/__init__.py": "",
        "profiling/step.py": "from dpkernels import engine\nfrom .. import __version__\n",
    })
    graph = import_graph(root)
    assert graph["dpkernels"] == {"dpkernels.reference", "dpkernels.engine"}
    assert graph["dpkernels.profiling.step"] == {"dpkernels.engine", "dpkernels"}
    assert cycles(graph) == [["dpkernels", "dpkernels.engine", "dpkernels.profiling.step", "dpkernels"]]


def test_the_kernel_benchmark_runs_by_its_path_from_outside_the_package():
    """benchmarks/kernel_bench.py is a script (no ``benchmarks`` package: Opacus installs one): its imports
    resolve when run by path from the repository root, and its options are the ones the README names."""
    root = PACKAGE.parent
    assert not (root / "benchmarks" / "__init__.py").exists()
    done = subprocess.run([sys.executable, "benchmarks/kernel_bench.py", "--help"], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "--out" in done.stdout and "--tune" in done.stdout
