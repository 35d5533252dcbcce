"""Which files a serving measurement runs, and whether two commits differ in them.

A sweep in chunks, one lease each, runs on whatever `main` is at each lease, so its rows
name several commits. They hold the same served code when every file that differs between
them is one a serving run never reads:

- documents, tests and results (`NOT_CODE`);
- Python modules of the package outside the import closure of what a serving run starts
  (`SERVING_ROOTS`: `benchmarks/serving.py`, which starts `splitserve up` and `splitserve
  bench run` through `launch/cli.py`, and the thread sampler `scripts/gpu_serving.sh` runs
  beside it), such as the standalone kernel and engine benchmarks and the kernel tests'
  batch maker;
- shell scripts whose lines differ only in whole-line comments.

Anything else that differs (a module in the closure, a script's commands, `pyproject.toml`,
a data file) makes them differ.

The closure is read from each commit's own sources (`ast`, no import): every `import` and
`from ... import` of the package anywhere in a module (inside functions too), each
module's parent packages, and every string constant that names one of its modules (the
launcher imports subcommands by name and starts processes with `python -m splitserve...`).
It over-counts (an import in a branch never taken still counts) and does not miss a module
a run imports by its name.

Who calls it: `serving_report compare` (benchmarks/serving_report.py) passes
`same_served_code` to `comparison.compare`, which calls it once per workload with the
commits of the system's rows; it runs `git` in this checkout (or the repository given).
"""

from __future__ import annotations

import ast
import contextlib
import logging
import subprocess
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

PACKAGE = "splitserve"
# What a serving measurement runs (scripts/gpu_serving.sh): its import closure is served.
SERVING_ROOTS = ("splitserve.benchmarks.serving", "splitserve.benchmarks.thread_cpu")
# What does not change what is measured: documents, tests and results.
NOT_CODE = ("docs", "README.md", "tests", "benchmarks/results")

# A path in one commit's tree -> its text, or None where the tree has no such file.
Reader = Callable[[str], str | None]


def _module_files(module: str) -> tuple[str, ...]:
    """The files `module` of the package may be, a module first, then a package."""
    parts = module.split(".")[1:]
    if not parts:
        return ("__init__.py",)
    base = "/".join(parts)
    return (f"{base}.py", f"{base}/__init__.py")


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` names, relative imports resolved against `module`."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def named_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """The package's modules that `source` (the text of `module`) imports or names."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names.add(node.value)
    return {name for name in names if name == PACKAGE or name.startswith(PACKAGE + ".")}


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _find(read: Reader, module: str) -> tuple[str, str] | None:
    """The file of `module` in the tree, and its text."""
    for path in _module_files(module):
        text = read(path)
        if text is not None:
            return path, text
    return None


def served_files(read: Reader, roots: Iterable[str] = SERVING_ROOTS) -> set[str] | None:
    """The files of `roots`' import closure in the tree `read` reads; None when a root is
    not there (a tree this closure cannot be told for)."""
    roots = tuple(roots)
    files: set[str] = set()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        found = _find(read, module)
        if found is None:
            if module in roots:
                return None
            continue  # a name in the package that is not a module (a class, a string)
        path, text = found
        files.add(path)
        todo += _parents(module)
        todo += named_modules(text, module, path.endswith("__init__.py"))
    return files


@contextlib.contextmanager
def git_reader(repo: Path, commit: str) -> Iterator[Reader]:
    """A Reader of `commit`'s tree, through one `git cat-file --batch`."""
    with subprocess.Popen(
        ["git", "-C", str(repo), "cat-file", "--batch"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        stdin, stdout = proc.stdin, proc.stdout

        def read(path: str) -> str | None:
            stdin.write(f"{commit}:{path}\n".encode())
            stdin.flush()
            header = stdout.readline().decode().split()
            if len(header) != 3:  # "<name> missing"
                return None
            data = stdout.read(int(header[2]) + 1)[:-1]  # each object ends in a newline
            return data.decode(errors="replace") if header[1] == "blob" else None

        try:
            yield read
        finally:
            stdin.close()


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=False)  # fmt: skip


def _changed(repo: Path, first: str, other: str) -> list[str] | None:
    """Files that differ between the commits outside NOT_CODE; None if git cannot tell."""
    excluded = [f":(exclude){path}" for path in NOT_CODE]
    done = _git(repo, "diff", "--name-only", "--no-renames", first, other, "--", ".", *excluded)
    if done.returncode != 0:
        logger.warning("git cannot compare %s and %s: %s", first, other, done.stderr.strip())
        return None
    return done.stdout.splitlines()


def _script_lines(repo: Path, commit: str, path: str) -> list[str] | None:
    """A shell script's lines but its whole-line comments and blank lines."""
    done = _git(repo, "show", f"{commit}:{path}")
    if done.returncode != 0:
        return None
    lines = (line.strip() for line in done.stdout.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _served_at(repo: Path, commit: str, known: dict[str, set[str] | None]) -> set[str] | None:
    """`served_files` of `commit`'s tree, read once per commit into `known`."""
    if commit not in known:
        with git_reader(repo, commit) as read:
            known[commit] = served_files(read)
    return known[commit]


def differing_served(
    repo: Path, first: str, other: str, known: dict[str, set[str] | None] | None = None
) -> list[str] | None:
    """The files that differ between two commits that a serving run reads (empty: the
    same served code); None when git cannot tell (no repository, an unknown commit, a
    tree without the serving roots). `known`: closures already read, by commit."""
    changed = _changed(repo, first, other)
    if changed is None:
        return None
    known = {} if known is None else known
    served: set[str] = set()
    for commit in (first, other):
        files = _served_at(repo, commit, known)
        if files is None:
            return None
        served |= files
    differ = []
    for path in changed:
        if path.endswith(".py") and path not in served:
            continue
        if path.endswith(".sh"):
            before, after = _script_lines(repo, first, path), _script_lines(repo, other, path)
            if before is not None and before == after:
                continue
        differ.append(path)
    return differ


def same_served_code(commits: list[str], repo: Path | None = None) -> bool | None:
    """Whether every commit holds the first's served code (`differing_served`), in
    `repo` or this checkout; None when git cannot tell."""
    repo = repo or Path(__file__).resolve().parents[1]
    known: dict[str, set[str] | None] = {}  # the first commit's closure is read once
    for commit in commits[1:]:
        differ = differing_served(repo, commits[0], commit, known)
        if differ is None:
            return None
        if differ:
            logger.info("%s and %s differ in served files: %s", commits[0][:12], commit[:12],
                        ", ".join(differ))  # fmt: skip
            return False
    return True
