"""The package structure holds: no cycle between top-level packages, no import between the
role packages (prefill, decode, router), kernels free of engine internals, a torch-free router.

Imports are read with `ast` from every module of the tree: module-level and function-level
`import`/`from ... import` statements (relative ones resolved), and string literals passed
to `importlib.import_module` / `__import__`. Nothing is imported to build the graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "splitserve"
ROLE_PACKAGES = ("prefill", "decode", "router")
# Never imported by the router, directly or through what it imports.
HEAVY_MODULES = ("torch", "triton", "nixl", "safetensors")


def _packages() -> list[str]:
    return sorted(
        p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file() and p.name != "tests"
    )


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([NAMESPACE, *parts])


def _modules() -> dict[str, Path]:
    out = {}
    for package in _packages():
        for path in (ROOT / package).rglob("*.py"):
            out[_module_name(path)] = path
    return out


def _import_call_target(node: ast.Call) -> str | None:
    """The module named by `importlib.import_module("x")` or `__import__("x")`."""
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def _is_type_checking(node: ast.stmt) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def _lazy_export_nodes(tree: ast.Module) -> set[int]:
    """ids of the nodes inside a module-level `__getattr__` (PEP 562 lazy attributes: their
    imports run only when someone asks the module for that attribute) or an
    `if TYPE_CHECKING:` block (never run)."""
    return {
        id(inner)
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name == "__getattr__")
        or _is_type_checking(node)
        for inner in ast.walk(node)
    }


def imports_of(module: str, path: Path, lazy_exports: bool = True) -> Iterator[str]:
    """Every module name `module` imports, anywhere in its body (but for the lazy
    attributes of a module-level `__getattr__` when `lazy_exports` is False)."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    tree = ast.parse(path.read_text(), str(path))
    skipped = set() if lazy_exports else _lazy_export_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                target = node.module or ""
            yield target
            # `from pkg import module` imports pkg.module when that is a module.
            yield from (f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            target = _import_call_target(node)
            if target is not None:
                yield target


def _top_package(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != NAMESPACE or len(parts) < 2:
        return None
    return parts[1]


def module_graph(lazy_exports: bool = True) -> dict[str, set[str]]:
    """module -> the splitserve modules and external top-level names it imports."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for target in imports_of(module, path, lazy_exports):
            if target.split(".")[0] != NAMESPACE:
                targets.add(target.split(".")[0])
            else:
                # Importing a.b.c runs the __init__ of a and a.b first.
                parts = target.split(".")
                prefixes = (".".join(parts[:i]) for i in range(2, len(parts) + 1))
                targets.update(p for p in prefixes if p in modules and p != module)
        graph[module] = targets
    return graph


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {p: set() for p in _packages()}
    for module, targets in module_graph().items():
        source = _top_package(module)
        if source is None:
            continue
        for target in targets:
            package = _top_package(target)
            if package is not None and package != source:
                graph[source].add(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_graph_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    source = tmp_path / "mod.py"
    source.write_text(
        "import splitserve.a.x\n"
        "from splitserve.b import y\n"
        "from . import sibling\n"
        "def f():\n"
        "    import importlib\n"
        "    from splitserve.c.z import w\n"
        "    return importlib.import_module('splitserve.d.v')\n"
    )
    found = set(imports_of("splitserve.e.mod", source))
    assert {"splitserve.a.x", "splitserve.b.y", "splitserve.e.sibling"} <= found
    assert {"splitserve.c.z", "splitserve.d.v", "importlib"} <= found


def test_graph_reader_can_leave_out_lazy_exports(tmp_path: Path) -> None:
    source = tmp_path / "__init__.py"
    source.write_text(
        "if TYPE_CHECKING:\n    import splitserve.typing_only\n"
        "def __getattr__(name):\n    from splitserve.heavy import Thing\n"
    )
    assert "splitserve.typing_only" not in set(imports_of("splitserve.p", source, False))
    assert "splitserve.heavy" in set(imports_of("splitserve.p", source))
    assert "splitserve.heavy" not in set(imports_of("splitserve.p", source, lazy_exports=False))


def test_find_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_cycle_between_top_level_packages() -> None:
    cycle = find_cycle(package_graph())
    assert cycle is None, "package import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("role", ROLE_PACKAGES)
def test_role_packages_do_not_import_each_other(role: str) -> None:
    others = set(ROLE_PACKAGES) - {role}
    assert not package_graph()[role] & others


def test_kernels_import_no_engine() -> None:
    assert "engine" not in package_graph()["kernels"]


def test_only_tools_import_the_cli() -> None:
    # The benchmarks and the Ray launcher start clusters through launch's helpers; launch
    # names them only as subcommand module strings (a dispatch table, not an import).
    graph = package_graph()
    assert [p for p, targets in graph.items() if "launch" in targets] == [
        "benchmarks",
        "ray_cluster",
    ]


def test_only_ray_cluster_imports_ray() -> None:
    # Ray is an optional extra: `splitserve ray` needs it, nothing else may.
    graph = module_graph()
    assert (
        sorted(
            m
            for m, targets in graph.items()
            if "ray" in targets and not m.startswith("splitserve.ray_cluster.")
        )
        == []
    )


def test_router_never_reaches_torch() -> None:
    # `splitserve.engine` exports LLM and AsyncEngine lazily; the router never asks for them.
    graph = module_graph(lazy_exports=False)
    seen: set[str] = set()
    todo = [m for m in graph if _top_package(m) == "router"]
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(t for t in graph.get(module, ()) if t in graph)
    reached = {
        module: sorted(graph[module] & set(HEAVY_MODULES))
        for module in seen
        if graph[module] & set(HEAVY_MODULES)
    }
    assert reached == {}
