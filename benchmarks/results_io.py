"""Writing benchmark results: JSON with the exact command, git commit, device and date."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any


def git_commit(cwd: Path | None = None) -> str:
    """The checkout's commit, with "-dirty" when tracked files differ from it (a copy whose
    .git is not the tree's own says so instead of naming a commit that did not run);
    SPLITSERVE_GIT_COMMIT overrides it (a copy without .git)."""
    if os.environ.get("SPLITSERVE_GIT_COMMIT"):
        return os.environ["SPLITSERVE_GIT_COMMIT"]
    where = cwd or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        run = subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=where)
        return run.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if changed else commit


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} CPU"


def provenance(device: str) -> dict[str, Any]:
    return {
        "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "git_commit": git_commit(),
        "device": device_name(device),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
    }


def write_result(path: str | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
