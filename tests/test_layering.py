"""The layering of docs/ARCHITECTURE.md, read from the source: every module is parsed, never imported, so
an import inside a function counts as much as one at the top, and a broken module cannot hide its imports.

    bench/               never imports sahn, baselines, pipelines or reports (infrastructure under everything)
    sahn/, baselines/    methods: never each other, never pipelines or reports (shared layers live in bench)
    reports/             reads results, not models: never sahn, baselines or pipelines
    pipelines/           entry points and benchmark scripts: create methods by name (never sahn, baselines)

Inside bench/, rooms stand on floors (BENCH_FLOORS): a module imports only its own floor or lower ones. No
module of the repository reaches itself through imports (no circle), counting imports inside functions.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
LAYERS = ("bench", "sahn", "baselines", "reports", "pipelines")
FORBIDDEN = {
    "bench": ("sahn", "baselines", "pipelines", "reports"),
    "sahn": ("baselines", "pipelines", "reports"),
    "baselines": ("sahn", "pipelines", "reports"),
    "reports": ("sahn", "baselines", "pipelines"),
    "pipelines": ("sahn", "baselines"),  # methods are created by name through the registry
}
# bench/'s floors, lowest first. A module may import its own floor and those below it, never one above.
# The checkpoint format, files and errors are under everything (metric and teacher networks load files);
# methods, the published-weights mapping and the config stand on data, metrics and network parts; the run
# loops use all of those; the command line builds configs for the run.
BENCH_FLOORS = (
    ("bench.errors", "bench.files", "bench.devices", "bench.checkpoint_format"),
    ("bench.data",),
    ("bench.metrics",),
    ("bench.nn",),
    ("bench.methods", "bench.weights", "bench.config"),
    ("bench.run",),
    ("bench.cli",),
    ("bench",),  # the package itself: the façade that re-exports the method interface (bench.create_method)
)
# baselines/ holds several methods, which must not import each other; a module that is part of one method
# (DDNM's U-Net, kept apart from its sampler) belongs to that method's family. Unlisted modules are their own.
BASELINE_FAMILY = {"ddnm_unet": "ddnm"}


@dataclass(frozen=True)
class Import:
    file: str  # relative to the repository, POSIX
    line: int
    module: str  # absolute dotted name

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module}"


def module_name(path: Path, root: Path) -> list[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(node: ast.AST, package: list[str]) -> list[str]:
    """The modules one node imports, relative imports resolved; ``from bench.run import distributed`` names
    ``bench.run.distributed`` (a package's submodule), ``from bench.data.masks import RATIO_BINS`` names
    ``bench.data.masks``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        base = package[:len(package) - node.level + 1] if node.level else []
        module = ".".join(base + ([node.module] if node.module else []))
        return [f"{module}.{alias.name}" if alias.name != "*" else module for alias in node.names]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
        # importlib.import_module("x") / __import__("x") with a literal name is an import all the same
        function = node.func
        name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
        if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
            return [node.args[0].value]
    return []


def imports_in(path: Path, root: Path) -> list[Import]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name[:-1]
    file = path.relative_to(root).as_posix()
    return sorted((Import(file, node.lineno, module)
                   for node in ast.walk(tree) for module in imported_modules(node, package)),
                  key=lambda edge: (edge.line, edge.module))


def python_files(root: Path, layer: str) -> list[Path]:
    return sorted(path for path in (root / layer).rglob("*.py") if "__pycache__" not in path.parts)


def family(baselines_module: str | None) -> str | None:
    return BASELINE_FAMILY.get(baselines_module, baselines_module) if baselines_module else None


def violations(root: Path, layer: str) -> list[str]:
    """Every import in ``layer`` that breaks its rule, as ``file:line imports module (rule)``."""
    found = []
    for path in python_files(root, layer):
        own = module_name(path, root)
        for edge in imports_in(path, root):
            target = edge.module.split(".")
            if target[0] in FORBIDDEN[layer]:
                found.append(f"{edge} ({layer}/ never imports {', '.join(FORBIDDEN[layer])})")
            elif layer == "baselines" and target[0] == "baselines":
                importer = family(own[1] if len(own) > 1 else None)
                imported = family(target[1] if len(target) > 1 else None)
                if importer != imported:
                    found.append(f"{edge} (methods never import each other: {importer} is not {imported})")
    return found


def repository_modules(root: Path) -> dict[str, Path]:
    return {".".join(module_name(path, root)): path for layer in LAYERS for path in python_files(root, layer)}


def resolve(name: str, known: dict[str, Path]) -> str | None:
    """The repository module an imported name lives in (``bench.data.masks.RATIO_BINS`` → ``bench.data.masks``),
    or None for a module outside the repository."""
    while name not in known and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in known else None


def import_graph(root: Path) -> dict[str, dict[str, Import]]:
    """module → {imported repository module: the first import of it}."""
    known = repository_modules(root)
    graph: dict[str, dict[str, Import]] = {}
    for module, path in known.items():
        edges = graph.setdefault(module, {})
        for edge in imports_in(path, root):
            target = resolve(edge.module, known)
            if target is not None and target != module:
                edges.setdefault(target, edge)
    return graph


def floor_of(module: str) -> int | None:
    best = None
    for floor, prefixes in enumerate(BENCH_FLOORS):
        for prefix in prefixes:
            if module == prefix or (prefix != "bench" and module.startswith(prefix + ".")):
                best = floor
    return best


def floor_violations(root: Path) -> list[str]:
    found = []
    for module, edges in import_graph(root).items():
        if not module.startswith("bench"):
            continue
        own = floor_of(module)
        if own is None:
            found.append(f"{module} stands on no floor of BENCH_FLOORS")
            continue
        for target, edge in edges.items():
            floor = floor_of(target)
            if floor is not None and floor > own:
                found.append(f"{edge} (floor {own} {BENCH_FLOORS[own][0]} never imports floor {floor} "
                             f"{BENCH_FLOORS[floor][0]})")
    return found


def circles(root: Path) -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), each as a path that closes on itself."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in graph.get(module, {}):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return groups


@pytest.mark.parametrize("layer", LAYERS)
def test_every_module_keeps_to_its_layer(layer):
    assert python_files(REPOSITORY, layer), f"no Python files under {REPOSITORY / layer}"
    found = violations(REPOSITORY, layer)
    assert not found, "layering broken:\n" + "\n".join(found)


def test_bench_rooms_import_only_their_own_floor_or_lower_ones():
    found = floor_violations(REPOSITORY)
    assert not found, "a bench/ room imports a higher one:\n" + "\n".join(found)


def test_no_module_reaches_itself_through_imports():
    graph = import_graph(REPOSITORY)
    found = circles(REPOSITORY)
    described = ["; ".join(str(graph[member][other]) for member in group for other in group if other in graph[member])
                 for group in found]
    assert not found, "import circles:\n" + "\n".join(described)


def test_each_family_exception_is_an_import_that_exists():
    """An entry of BASELINE_FAMILY that nothing uses any more only widens the rule: drop it."""
    edges = {(Path(edge.file).stem, edge.module.split(".")[1])
             for path in python_files(REPOSITORY, "baselines") for edge in imports_in(path, REPOSITORY)
             if edge.module.startswith("baselines.")}
    for member, owner in BASELINE_FAMILY.items():
        assert (owner, member) in edges, f"baselines/{owner}.py no longer imports baselines.{member}"


def write(root: Path, relative: str, source: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)


def test_imports_anywhere_in_a_module_are_found_with_file_line_and_module(tmp_path):
    write(tmp_path, "bench/__init__.py", "")
    write(tmp_path, "bench/loop.py", "\n".join([
        "import numpy",
        "from bench import masks",
        "def run():",
        "    from sahn.model import sahn_tiny  # inside a function",
        "    class Late:",
        "        import pipelines.tune",
        "    return importlib.import_module('reports.build')",
        "from . import metrics",
        "from ..baselines import ec",  # relative, resolved from the file's package
    ]))
    write(tmp_path, "baselines/__init__.py", "")
    write(tmp_path, "baselines/ddnm.py", "from baselines.ddnm_unet import UNet\nfrom . import ddnm_unet\n")
    write(tmp_path, "baselines/spl.py", "def f():\n    from baselines import ec, ddnm_unet\n")
    write(tmp_path, "reports/tables.py", "from bench.data.masks import RATIO_BINS\nfrom reports import figures\n")
    write(tmp_path, "reports/compare.py", "import baselines.lama as lama\n")

    assert violations(tmp_path, "bench") == [
        "bench/loop.py:4 imports sahn.model.sahn_tiny (bench/ never imports sahn, baselines, pipelines, reports)",
        "bench/loop.py:6 imports pipelines.tune (bench/ never imports sahn, baselines, pipelines, reports)",
        "bench/loop.py:7 imports reports.build (bench/ never imports sahn, baselines, pipelines, reports)",
        "bench/loop.py:9 imports baselines.ec (bench/ never imports sahn, baselines, pipelines, reports)",
    ]
    assert sorted(violations(tmp_path, "baselines")) == [
        "baselines/spl.py:2 imports baselines.ddnm_unet (methods never import each other: spl is not ddnm)",
        "baselines/spl.py:2 imports baselines.ec (methods never import each other: spl is not ec)",
    ]
    assert violations(tmp_path, "reports") == [
        "reports/compare.py:1 imports baselines.lama (reports/ never imports sahn, baselines, pipelines)",
    ]


def test_floors_and_circles_are_found_in_a_made_up_tree(tmp_path):
    write(tmp_path, "bench/__init__.py", "")
    write(tmp_path, "bench/errors.py", "")
    write(tmp_path, "bench/data/__init__.py", "")
    write(tmp_path, "bench/data/masks.py", "from bench.run.cell import run_cell\nfrom bench.errors import UserError\n")
    write(tmp_path, "bench/run/__init__.py", "")
    write(tmp_path, "bench/run/cell.py", "def f():\n    from bench.run import shards\n")
    write(tmp_path, "bench/run/shards.py", "from bench.run.cell import f\nfrom bench.data import masks\n")
    write(tmp_path, "bench/stray.py", "")

    assert sorted(floor_violations(tmp_path)) == [
        "bench.stray stands on no floor of BENCH_FLOORS",
        "bench/data/masks.py:1 imports bench.run.cell.run_cell (floor 1 bench.data never imports floor 5 bench.run)",
    ]
    assert circles(tmp_path) == [["bench.data.masks", "bench.run.cell", "bench.run.shards"]]
