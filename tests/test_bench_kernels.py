"""The kernel micro-benchmark's command line (benchmarks/kernels.py) on the CPU: its smoke
run, and the vLLM FlashAttention-3 comparison, refused with a hint where vLLM is absent."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from splitserve.benchmarks import kernels


def test_a_smoke_run_writes_rows_with_their_provenance(tmp_path: Path) -> None:
    out = tmp_path / "kernels.json"
    assert kernels.main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["rows"] and result["provenance"]["command"].startswith("python3 -m")
    assert not kernels.parse_args([]).vllm_fa3 and kernels.parse_args(["--vllm-fa3"]).vllm_fa3


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed")
def test_vllm_fa3_without_vllm_is_refused_with_a_hint() -> None:
    with pytest.raises(RuntimeError, match=r"source /tmp/site/vllm_env\.sh"):
        kernels._fresh_call(kernels.VLLM_FA3, None, 16)
