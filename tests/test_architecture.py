"""The package's import graph: modules import only downward, and no import cycle exists.

Every import statement in hvbridge/ counts: module-level, inside functions (lazy imports),
under `if TYPE_CHECKING:`, absolute and relative (`from . import x`). Importing `a.b.c` also
runs the packages `a.b` and `a`, so an import of a submodule is an edge to each enclosing
package too (except the packages the importer itself lives in).

LAYERS lists the modules bottom to top. A module may import its own layer or lower ones, never
a higher one; a module that no layer names fails the test, so that a new module gets its place
here when it is written.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

import pytest

PACKAGE: Final = Path(__file__).resolve().parent.parent / "hvbridge"

#: Bottom to top. An entry names a module, or a package and everything under it (the top
#: package, `hvbridge`, names only its own __init__).
LAYERS: Final[tuple[tuple[str, ...], ...]] = (
    # leaves: no hvbridge imports at all
    ("hvbridge", "hvbridge.errors", "hvbridge.logs", "hvbridge.systemd"),
    # the pure core: values and rules, no trio, no sockets
    (
        "hvbridge.routes",
        "hvbridge.stats",
        "hvbridge.addresses",
        "hvbridge.hyperv",
        "hvbridge.hyperv.guids",
        "hvbridge.proxyproto",
        "hvbridge.sshconfig",
    ),
    # reading route tables; Hyper-V's registry and VM lookup (subprocess, winreg)
    ("hvbridge.config", "hvbridge.hyperv.registry", "hvbridge.hyperv.vms"),
    # sockets, one module per address family
    ("hvbridge.transports",),
    # moving bytes between two streams
    ("hvbridge.relay", "hvbridge.proxyio"),
    # the injected socket layer: what module globals held (VM lookup, I/O model, splice switch)
    ("hvbridge.backend",),
    # running routes
    ("hvbridge.supervisor", "hvbridge.metrics", "hvbridge.listeners", "hvbridge.engine"),
    # the daemon
    ("hvbridge.service", "hvbridge.workers"),
    # the composition root
    ("hvbridge.cli", "hvbridge.cli_hyperv", "hvbridge.cli_errors", "hvbridge.__main__"),
)


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under `package`."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool) -> list[str]:
    """The dotted names an import statement asks for (a `from` import: the base and base.NAME)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package else importer.split(".")[:-1]
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join([*anchor, base] if base else anchor)
    return [base, *(f"{base}.{alias.name}" for alias in node.names)]


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports, every import statement counted."""
    modules = module_files(package)
    root = package.name
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for target in _imported(node, name, is_package):
                if target not in modules:
                    continue  # a name inside a module (from m import NAME), or outside the package
                parts = target.split(".")
                for end in range(1, len(parts) + 1):
                    enclosing = ".".join(parts[:end])
                    if enclosing == root or name == enclosing or name.startswith(enclosing + "."):
                        continue  # the importer is inside it: that package is running already
                    if enclosing in modules:
                        graph[name].add(enclosing)
    return graph


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    """The index of the layer whose longest entry names `module` (itself or an enclosing package)."""
    best: tuple[int, int] | None = None  # (entry length, layer)
    for index, entries in enumerate(layers):
        for entry in entries:
            encloses = "." in entry and module.startswith(entry + ".")
            if (module == entry or encloses) and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (or a module importing itself)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(start: str) -> None:  # Tarjan's algorithm, iterative: no recursion limit to meet
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1 or node in graph[node]:
                    groups.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return sorted(groups)


def layer_violations(graph: dict[str, set[str]], layers: tuple[tuple[str, ...], ...]) -> list[str]:
    """One line per module no layer names, and per import of a higher layer."""
    problems = []
    for module in sorted(graph):
        mine = layer_of(module, layers)
        if mine is None:
            problems.append(f"{module} is in no layer; add it to LAYERS in tests/test_architecture.py")
            continue
        for target in sorted(graph[module]):
            theirs = layer_of(target, layers)
            if theirs is not None and theirs > mine:
                problems.append(f"{module} (layer {mine}) imports {target} from the higher layer {theirs}")
    return problems


# ---------------------------------------------------------------------------- the package


def test_no_import_cycle() -> None:
    assert find_cycles(import_graph(PACKAGE)) == []


def test_imports_go_downward() -> None:
    assert layer_violations(import_graph(PACKAGE), LAYERS) == []


def test_pure_core_imports_no_io() -> None:
    """config/, addresses, routes, stats, proxyproto and hyperv.guids never import trio,
    subprocess or winreg, and never create a socket (the socket module's constants are fine)."""
    banned = {"trio", "subprocess", "winreg", "selectors"}
    creating = {"socket", "socketpair", "create_connection", "create_server", "fromfd"}
    modules = module_files(PACKAGE)
    pure = [
        name
        for name in modules
        if name.startswith("hvbridge.config")
        or name
        in {"hvbridge.addresses", "hvbridge.routes", "hvbridge.stats", "hvbridge.proxyproto", "hvbridge.hyperv.guids"}
    ]
    found = []
    for name in pure:
        for node in ast.walk(ast.parse(modules[name].read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                for target in _imported(node, name, modules[name].name == "__init__.py"):
                    if target.split(".")[0] in banned:
                        found.append(f"{name} imports {target}")
            elif (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "socket"
                and node.attr in creating
            ):
                found.append(f"{name} uses socket.{node.attr}")
    assert found == []


# ----------------------------------------------------------------- the checker on fixtures


def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text, encoding="utf-8")
    return package


def test_checker_finds_a_lazy_relative_cycle(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "low.py": "def f():\n    from . import high\n",
            "high.py": "from pkg.low import f\n",
            "alone.py": "import os\n",
        },
    )
    assert import_graph(package)["pkg.low"] == {"pkg.high"}
    assert find_cycles(import_graph(package)) == [["pkg.high", "pkg.low"]]


def test_checker_finds_a_cycle_through_a_package_init(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "sub/__init__.py": "from pkg.sub.leaf import x\nfrom pkg import top\n",
            "sub/leaf.py": "x = 1\n",
            "top.py": "import pkg.sub.leaf\n",
        },
    )
    graph = import_graph(package)
    assert graph["pkg.top"] == {"pkg.sub", "pkg.sub.leaf"}
    assert graph["pkg.sub.leaf"] == set()  # its own package runs already
    assert find_cycles(graph) == [["pkg.sub", "pkg.top"]]


def test_checker_finds_an_upward_import_and_an_unplaced_module(tmp_path: Path) -> None:
    package = write_package(
        tmp_path,
        {
            "low.py": "if True:\n    from pkg.high import thing\n",
            "high.py": "thing = 1\n",
            "stray.py": "",
        },
    )
    layers = (("pkg", "pkg.low"), ("pkg.high",))  # pkg names its __init__ only, not pkg.stray
    assert layer_violations(import_graph(package), layers) == [
        "pkg.low (layer 0) imports pkg.high from the higher layer 1",
        "pkg.stray is in no layer; add it to LAYERS in tests/test_architecture.py",
    ]


@pytest.mark.parametrize(
    ("module", "layer"),
    [("hvbridge.hyperv.guids", 1), ("hvbridge.hyperv.vms", 2), ("hvbridge.config.toml", 2), ("hvbridge.nope", None)],
)
def test_layer_of_takes_the_longest_entry(module: str, layer: int | None) -> None:
    assert layer_of(module, LAYERS) == layer
