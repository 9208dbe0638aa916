"""foreman's layout holds: no import cycle, no layer importing a higher one, a pure scheduler, a short top level.

Imports are read from the source with `ast`. The layers and the purity count every import, at
the top, under `TYPE_CHECKING` and inside functions alike: each is a dependency the layout carries.
Cycles count the imports that run as a module is imported (not those inside functions): a
function that picks a backend may import it, though the backend imports the interface it meets.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

import foreman

ROOT = Path(foreman.__file__).resolve().parent

# Lowest first. A module may import its own unit (a package under foreman/, or a module at
# its top level) and the units of its own or a lower layer, never one of a higher layer.
LAYERS: tuple[frozenset[str], ...] = tuple(
    frozenset(layer.split())
    for layer in (
        "foreman job errors durations log looplag background",  # values and helpers everything shares
        "retry setting_values config metrics",
        "scheduling ollama client",  # the pure policy; Ollama's side; the CLI's client (talks HTTP only)
        "dialects",  # the two wire dialects, turning requests into jobs
        "routing",
        "simulator storage",  # the simulated worker; the storage interface and its backends
        "queue embeddings",
        "batches webhooks",  # OpenAI's Batch API over the queue; webhooks out of the outbox
        "worker",
        "api ui",  # the HTTP surface and the page
        "app",
        "serve demo",
        "cli __main__",
    )
)

# Imports that cross the layers today, each to go when its reason does.
# The test fails once one of them is gone, so that this list only shrinks.
CROSSINGS: Mapping[tuple[str, str], str] = {}

# What the scheduler and the simulator may not reach, directly or through what they import:
# they are pure code with no I/O and no clock, so the simulator runs the worker's own policy.
IMPURE = frozenset(
    {"asyncio", "aiohttp", "sqlite3", "psycopg", "psycopg_pool", "socket", "threading", "time"}
)
PURE_UNITS = ("scheduling", "simulator")

MAX_TOP_LEVEL = 20


@dataclass(frozen=True)
class Module:
    name: str  # dotted, foreman.api.keys
    path: Path
    foreman: frozenset[str]  # the foreman modules it imports
    on_import: frozenset[str]  # those of them it imports as it is imported, not inside a function
    outside: frozenset[str]  # the top-level names of everything else it imports

    @property
    def unit(self) -> str:
        parts = self.name.split(".")
        return parts[1] if len(parts) > 1 else parts[0]

    @property
    def package(self) -> str:
        return self.name if self.path.name == "__init__.py" else self.name.rpartition(".")[0]


def read_modules(root: Path, package: str = "foreman") -> dict[str, Module]:
    """Every module under `root`, with what it imports."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    modules = {}
    for name, path in names.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        inside, on_import, outside = set(), set(), set()
        for target, lazy in _imports(ast.parse(path.read_text(), str(path)), here, names):
            if target.split(".")[0] != package:
                outside.add(target.split(".")[0])
                continue
            inside.add(target)
            if not lazy:
                on_import.add(target)
        modules[name] = Module(name, path, frozenset(inside), frozenset(on_import), frozenset(outside))
    return modules


def _imports(tree: ast.AST, here: str, modules: Iterable[str]) -> Iterable[tuple[str, bool]]:
    """The modules `tree` imports, each with whether it is imported inside a function (lazily).

    `from foreman.api import keys` is foreman.api.keys; relative imports are resolved from `here`.
    """
    known = set(modules)
    for node, lazy in _import_nodes(tree, lazy=False):
        if isinstance(node, ast.Import):
            yield from ((alias.name, lazy) for alias in node.names)
            continue
        if node.level:
            base = here.split(".")[: len(here.split(".")) - node.level + 1]
            source = ".".join([*base, node.module] if node.module else base)
        else:
            source = node.module or ""
        submodules = [f"{source}.{alias.name}" for alias in node.names]
        yield from ((name, lazy) for name in submodules if name in known)
        if not all(name in known for name in submodules):
            yield source, lazy


def _import_nodes(node: ast.AST, lazy: bool) -> Iterable[tuple[ast.Import | ast.ImportFrom, bool]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child, lazy
        inside = lazy or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from _import_nodes(child, inside)


def layer_of(unit: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if unit in layer), None)


def upward_imports(modules: Mapping[str, Module]) -> dict[tuple[str, str], str]:
    """Every import of a higher layer's module, explained."""
    found = {}
    for module in modules.values():
        for target in module.foreman:
            if target not in modules:
                continue
            mine, theirs = layer_of(module.unit), layer_of(modules[target].unit)
            if mine is not None and theirs is not None and theirs > mine:
                found[module.name, target] = f"layer {mine} ({module.unit}) imports layer {theirs}"
    return found


def cycles(modules: Mapping[str, Module]) -> list[list[str]]:
    """The import cycles among `modules`, by the imports run on import: each group of modules that import
    one another round (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(name: str) -> None:  # Tarjan's algorithm; foreman's graph is shallow enough to recurse
        index[name] = low[name] = len(index)
        stack.append(name)
        for target in sorted(modules[name].on_import & modules.keys()):
            if target not in index:
                visit(target)
                low[name] = min(low[name], low[target])
            elif target in stack:
                low[name] = min(low[name], index[target])
        if low[name] == index[name]:
            group = []
            while not group or group[-1] != name:
                group.append(stack.pop())
            if len(group) > 1 or name in modules[name].on_import:
                found.append(sorted(group))

    for name in sorted(modules):
        if name not in index:
            visit(name)
    return found


def reached(modules: Mapping[str, Module], start: str) -> set[str]:
    """The foreman modules importing `start` runs: what it imports, their packages' __init__, and so on."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        if name in seen or name not in modules:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # a package runs before its modules
        todo += modules[name].foreman
    return seen


def impurities(modules: Mapping[str, Module], units: Iterable[str]) -> dict[str, set[str]]:
    """For each module of `units`: the I/O or clock modules it reaches, and through which foreman module."""
    found = {}
    for name in sorted(n for n in modules if modules[n].unit in units):
        bad = {
            f"{other}: {', '.join(sorted(modules[other].outside & IMPURE))}"
            for other in reached(modules, name)
        }
        bad = {line for line in bad if not line.endswith(": ")}
        if bad:
            found[name] = bad
    return found


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    return read_modules(ROOT)


def test_no_import_cycle(modules: dict[str, Module]) -> None:
    """No foreman module imports itself back through others as it is imported (types included)."""
    assert cycles(modules) == []


def test_every_unit_sits_in_a_layer(modules: dict[str, Module]) -> None:
    """A new package or top-level module is given its place in LAYERS, so the layering covers it."""
    assert sorted({m.unit for m in modules.values() if layer_of(m.unit) is None}) == []


def test_no_layer_imports_a_higher_one(modules: dict[str, Module]) -> None:
    """Job, scheduling, storage and Ollama's side never import the API, the app or the worker, and so on up."""
    upward = upward_imports(modules)
    assert {pair: why for pair, why in upward.items() if pair not in CROSSINGS} == {}
    gone = sorted(pair for pair in CROSSINGS if pair not in upward)
    assert gone == [], "these imports no longer cross a layer: remove them from CROSSINGS"


def test_the_scheduler_and_the_simulator_are_pure(modules: dict[str, Module]) -> None:
    """foreman.scheduling and foreman.simulator reach no asyncio, aiohttp, sqlite3 or clock, however indirectly."""
    assert {m.unit for m in modules.values()} >= set(PURE_UNITS)
    assert impurities(modules, PURE_UNITS) == {}
    # The policy needs nothing of foreman but the job's values.
    for module in modules.values():
        if module.unit == "scheduling":
            assert {t for t in module.foreman if not t.startswith("foreman.scheduling")} <= {"foreman.job"}


def test_at_most_twenty_modules_at_the_top_level() -> None:
    """foreman/ keeps its modules in packages by role; at most 20 sit side by side at its top."""
    top = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert len(top) <= MAX_TOP_LEVEL, top


def test_no_test_imports_the_bench_scripts() -> None:
    """Tests import foreman, the stub and tests.support; bench/ scripts run as processes (tests/bench/)."""
    tests = ROOT.parent / "tests"
    bench = {p.stem for p in (ROOT.parent / "bench").glob("*.py")} | {"bench"}
    importers = {}
    for path in sorted(tests.rglob("*.py")):
        here = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found = {name.split(".")[0] for name, _ in _imports(ast.parse(path.read_text()), here, ())}
        if found & bench:
            importers[str(path.relative_to(tests))] = sorted(found & bench)
    assert importers == {}


def test_the_checks_catch_a_violation(tmp_path: Path) -> None:
    """A cycle, an upward import and an impure scheduler in a made-up tree are each reported."""
    files = {
        "__init__.py": "",
        "job.py": "import foreman.storage.disk\n",  # a cycle, and the lowest layer importing a higher one
        # An interface whose function picks its backend, which meets the interface: no cycle.
        "storage/__init__.py": "def open():\n    from foreman.storage import disk\n",
        "storage/disk.py": "from foreman import job\nfrom foreman.api import keys\nfrom foreman.storage import X\n",
        "api/__init__.py": "",
        "api/keys.py": "",
        "scheduling/__init__.py": "",
        "scheduling/policy.py": "from . import clock\n",
        "scheduling/clock.py": "def now():\n    import time\n    return time.time()\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    made_up = read_modules(tmp_path)
    assert cycles(made_up) == [["foreman.job", "foreman.storage.disk"]]
    assert set(upward_imports(made_up)) == {
        ("foreman.job", "foreman.storage.disk"),
        ("foreman.storage.disk", "foreman.api.keys"),
    }
    assert impurities(made_up, ["scheduling"]) == {
        "foreman.scheduling.clock": {"foreman.scheduling.clock: time"},
        "foreman.scheduling.policy": {"foreman.scheduling.clock: time"},
    }
