"""Shape rules of the tree that growth tends to break: no function over 60 lines outside
the Triton kernels, and an engine loop that stays small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_FUNCTION_LINES = 60
MAX_ENGINE_CORE_LINES = 250
# Generated stubs are not written by hand.
SKIPPED = ("protocol/node_pb2.py", "protocol/node_pb2_grpc.py")


def _sources() -> list[Path]:
    out = []
    for package in sorted(p for p in ROOT.iterdir() if (p / "__init__.py").is_file()):
        if package.name in ("tests", "kernels"):
            continue
        out.extend(sorted(package.rglob("*.py")))
    return [p for p in out if str(p.relative_to(ROOT)) not in SKIPPED]


def long_functions(path: Path, limit: int) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    return [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1})"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_no_function_over_60_lines_outside_kernels() -> None:
    found = [f for path in _sources() for f in long_functions(path, MAX_FUNCTION_LINES)]
    assert found == []


def test_engine_core_stays_small() -> None:
    lines = (ROOT / "engine" / "core.py").read_text().count("\n")
    assert lines < MAX_ENGINE_CORE_LINES
