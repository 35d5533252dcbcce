"""Which files a serving run reads, and commits told apart by them (benchmarks/served_code.py):
the import closure on sources in memory and on this checkout, and `git` on a repository
made here commit by commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from splitserve.benchmarks import served_code
from splitserve.benchmarks.served_code import named_modules, served_files

CHECKOUT = Path(served_code.__file__).resolve().parents[1]


def test_imports_anywhere_in_a_module_and_module_names_in_strings_count() -> None:
    source = """
import json
import splitserve.engine.core
from splitserve.node import server, gc_pauses
from . import sibling
from ..router import app

def later():
    from splitserve.kernels.decode import plan
    return ["python", "-m", "splitserve.launch.cli", "not splitserve.x y"]
"""
    names = named_modules(source, "splitserve.benchmarks.serving")
    assert names == {
        "splitserve.engine.core",
        "splitserve.node",
        "splitserve.node.server",
        "splitserve.node.gc_pauses",
        "splitserve.benchmarks",
        "splitserve.benchmarks.sibling",
        "splitserve.router",
        "splitserve.router.app",
        "splitserve.kernels.decode",
        "splitserve.kernels.decode.plan",
        "splitserve.launch.cli",
    }
    # In a package's __init__, `from . import x` is the package's own x.
    assert named_modules("from . import x\n", "splitserve.node", is_package=True) == {
        "splitserve.node",
        "splitserve.node.x",
    }


def test_the_closure_follows_imports_parents_and_names_and_leaves_the_rest() -> None:
    tree = {
        "__init__.py": "",
        "benchmarks/__init__.py": "",
        "benchmarks/serving.py": "import splitserve.launch.cli\n",
        "benchmarks/thread_cpu.py": "",
        "benchmarks/gemm_rows.py": "import splitserve.engine.core\n",
        "launch/__init__.py": "",
        "launch/cli.py": 'SUB = {"up": "splitserve.launch.up_cmd"}\n',
        "launch/up_cmd.py": "from splitserve.engine import core\n",
        "engine/__init__.py": "",
        "engine/core.py": "from splitserve.engine.core import Engine\nclass Engine: ...\n",
        "kernels/testing.py": "",
    }
    files = served_files(tree.get)
    assert files == set(tree) - {"benchmarks/gemm_rows.py", "kernels/testing.py"}
    assert served_files({"engine/core.py": ""}.get) is None  # no serving roots


def test_this_checkout_serves_the_cluster_and_not_the_standalone_benchmarks() -> None:
    def read(path: str) -> str | None:
        file = CHECKOUT / path
        return file.read_text() if file.is_file() else None

    files = served_files(read)
    assert files is not None
    for path in ("launch/cli.py", "launch/up_cmd.py", "launch/decode_cmd.py",
                 "launch/router_cmd.py", "benchmarks/cli.py", "engine/core.py",
                 "kernels/cudnn_prefill.py", "__init__.py"):  # fmt: skip
        assert path in files, path
    for path in ("benchmarks/gemm_rows.py", "benchmarks/step_windows.py",
                 "benchmarks/device_clocks.py", "kernels/testing.py"):  # fmt: skip
        assert path not in files, path


def _repo(tmp_path: Path):  # type: ignore[no-untyped-def]
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tmp_path), *args], check=True,
                              capture_output=True, text=True)  # fmt: skip
        return done.stdout.strip()

    def commit(path: str, text: str) -> str:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
        git("add", "-A")
        git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", path)
        return git("rev-parse", "HEAD")

    git("init", "-q")
    return commit


def test_git_tells_commits_apart_by_what_a_serving_run_reads(tmp_path: Path) -> None:
    commit = _repo(tmp_path)
    commit("benchmarks/serving.py", "import splitserve.engine.core\n")
    commit("benchmarks/thread_cpu.py", "")
    commit("benchmarks/gemm_rows.py", "rows = 1\n")
    first = commit("scripts/run.sh", "# runs it\npython3 -m splitserve.benchmarks.serving\n")
    same = [
        first,
        commit("docs/performance.md", "measured\n"),
        commit("benchmarks/results/x/summary.json", "[]\n"),
        commit("benchmarks/gemm_rows.py", "rows = 2\n"),
        commit("scripts/run.sh", "# runs the sweep\n\npython3 -m splitserve.benchmarks.serving\n"),
    ]
    assert served_code.same_served_code(same, tmp_path) is True
    assert served_code.differing_served(tmp_path, first, same[-1]) == []
    served = commit("engine/core.py", "a = 2\n")
    assert served_code.differing_served(tmp_path, first, served) == ["engine/core.py"]
    assert served_code.same_served_code([*same, served], tmp_path) is False
    script = commit("scripts/run.sh", "python3 -m splitserve.benchmarks.serving --fast\n")
    assert served_code.differing_served(tmp_path, served, script) == ["scripts/run.sh"]
    config = commit("pyproject.toml", "[project]\n")
    assert served_code.differing_served(tmp_path, script, config) == ["pyproject.toml"]
    assert served_code.same_served_code([first, "0" * 40], tmp_path) is None


def test_a_tree_without_the_serving_roots_cannot_be_told(tmp_path: Path) -> None:
    commit = _repo(tmp_path)
    first = commit("engine/core.py", "a = 1\n")
    second = commit("engine/core.py", "a = 2\n")
    assert served_code.same_served_code([first, second], tmp_path) is None
