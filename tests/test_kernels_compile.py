"""Every kernel compiles for sm_90 (Hopper) at its default launch configuration, on a
machine without a GPU: `python -m splitserve.kernels.compile_check` in a subprocess with
TRITON_INTERPRET unset (the interpreter the other kernel tests may have chosen in this
process stays out of it). Triton is not imported here: the interpreter is chosen when
triton is imported (tests/conftest.py, `triton_interpreter`)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="triton is not installed (pip install triton)",
)


def test_all_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "splitserve.kernels.compile_check", "--arch", "90", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reports = {r["label"]: r for r in json.loads(proc.stdout)}
    assert len(reports) == 17, sorted(reports)
    # The bf16 attention kernels at their defaults: no register spills (when the shipped
    # cuobjdump could read the cubin), and prefill on Hopper's warpgroup matrix instructions.
    for label in ("decode split (bf16, split-K)", "decode split (bf16, single)", "prefill (bf16)"):
        assert reports[label]["stack_bytes"] in (0, None), reports[label]
    # The split prefill spills a little (80 bytes a thread at its 128 x 64 tiles, 20 loads
    # and 20 stores): bounded here.
    assert (reports["prefill, context split (bf16)"]["stack_bytes"] or 0) <= 96
    for label in ("prefill (bf16)", "prefill, context split (bf16)"):
        ops = reports[label]["ops"]
        assert not ops or ops["HGMMA"] > 0, ops
    # The merge inside the split kernel: a device-scope fence before its ticket atomic;
    # the separate-merge variant has neither.
    merged = reports["decode split (bf16, split-K, merged inside)"]
    assert merged["stack_bytes"] in (0, None), merged
    ops = merged["ops"]
    assert not ops or (ops["ATOMG"] > 0 and ops["MEMBAR.ALL.GPU"] > 0), ops
    ops = reports["decode split (bf16, split-K)"]["ops"]
    assert not ops or ops["ATOMG"] == ops["MEMBAR.ALL.GPU"] == 0, ops
