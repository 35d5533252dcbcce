"""scripts/gpu_step_trees.sh on the CPU, in a small git repository of its own: `pack`
writes each named commit's tree (results left out) with its hash, `run` runs every tree's
own gpu_step_pairs.sh (here a stand-in that records its environment) round by round."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_step_trees.sh"
# Stands in for the engine runs: records which tree ran, into which folder, at which commit.
PAIRS = """#!/usr/bin/env bash
mkdir -p "$BG_OUT"
echo "$(cat version) $SYSTEMS $REPEAT $SPLITSERVE_GIT_COMMIT $PKG $SHAPES" > "$BG_OUT/ran"
"""


def _git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    return done.stdout.decode().strip()


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "scripts" / "gpu_step_trees.sh")
    (repo / "scripts" / "gpu_step_pairs.sh").write_text(PAIRS)
    (repo / "benchmarks" / "results" / "big.json").write_text("{}")
    (repo / "version").write_text("a\n")
    _git(repo, "init", "-q", "-b", "main")
    _git(repo, "add", "-A")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    _git(repo, "checkout", "-q", "-b", "feature/b")
    (repo / "version").write_text("b\n")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qam", "b")
    return repo


def _script(repo: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(repo / "scripts" / "gpu_step_trees.sh"), *args],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin", **env},
    )  # fmt: skip


def test_pack_writes_each_commit_without_results_and_run_takes_turns(repo: Path) -> None:
    packed = _script(repo, "pack", "main", "feature/b")
    assert packed.returncode == 0, packed.stderr
    trees = repo / ".trees"
    assert sorted(p.name for p in trees.iterdir()) == ["feature_b", "main"]
    assert (trees / "main" / "version").read_text() == "a\n"
    assert (trees / "feature_b" / ".commit").read_text().strip() == _git(repo, "rev-parse", "HEAD")
    assert not (trees / "main" / "benchmarks" / "results").exists()
    assert "/.trees/" in (repo / ".git" / "info" / "exclude").read_text()

    out = repo.parent / "out"
    ran = _script(repo, "run", BG_OUT=str(out), SHAPES="4x100+1x64")
    assert ran.returncode == 0, ran.stderr
    main_sha = _git(repo, "rev-parse", "main")
    for round_ in ("r1", "r2"):
        line = (out / "main" / round_ / "ran").read_text().split()
        assert line == ["a", "splitserve", "1", main_sha, "/tmp/pkg_main", "4x100+1x64"]
        assert (out / "feature_b" / round_ / "ran").read_text().startswith("b splitserve 1 ")


def test_bad_calls_are_refused_with_a_hint(repo: Path) -> None:
    unknown = _script(repo, "pack", "no-such-branch")
    assert unknown.returncode == 2 and "no commit no-such-branch" in unknown.stderr
    nothing = _script(repo, "run")
    assert nothing.returncode == 2 and "pack them and carry .trees" in nothing.stderr
