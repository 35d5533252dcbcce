"""What varies from step to step must not pick a new compiled variant of a kernel mid-serving
(the engine compiles every variant at start-up, engine/warmup.py): here, split launches of
the prefill kernel at every split count and head count a node meets bind to one
specialisation on sm_90, as Triton's launcher computes it (divisibility by 16 and
alignment of each unspecialised argument), without a GPU. A subprocess with
TRITON_INTERPRET unset computes the keys (the interpreter other kernel tests may have
chosen in this process has no specialisation); CPU tensors stand in for CUDA ones and the
launch itself is replaced by one that records its arguments. On a GPU,
`test_no_kernel_compiles_after_start_up` (tests/test_engine_gpu.py) counts real compiles."""

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

PROBE = r"""
import json, sys, torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature
from splitserve.kernels import prefill_attention as pa
from splitserve.kernels.testing import make_paged_batch

kernel = pa._prefill_kernel
backend = make_backend(GPUTarget("cuda", 90, 64))
binder = create_function_from_signature(kernel.signature, kernel.params, backend)


class Launched(Exception):
    pass


class Capture:
    def __getitem__(self, grid):
        def launch(**kwargs):
            raise Launched(kwargs)
        return launch


pa._prefill_kernel = Capture()
pa.check_launchable = lambda device: None  # CPU tensors stand in for CUDA ones
keys = []
for heads, splits, decodes in json.loads(sys.argv[1]):
    cases = [(999, 1)] * decodes + [(700, 40), (2000, 20)]
    batch = make_paged_batch(
        cases, heads, max(1, heads // 4), 128, 16, torch.bfloat16, torch.device("cpu"), seed=1
    )
    meta = batch.meta
    try:  # the prefill sequences after the step's decode rows, as a mixed step passes them
        pa.prefill_attention(
            batch.q[decodes:], batch.kv_cache, meta.block_tables[decodes:],
            meta.seq_lens[decodes:], meta.query_start_loc[decodes:] - decodes, 40, 0.1,
            num_splits=splits,
        )
    except Launched as launched:
        kwargs = dict(launched.args[0])
    for option in ("num_warps", "num_stages"):
        kwargs.pop(option)
    keys.append(repr(binder(**kwargs)[1]))
print(json.dumps(keys))
"""


def _keys(launches: list[tuple[int, int, int]]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(launches)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def test_split_prefill_launches_bind_to_one_variant() -> None:
    """(heads, splits, decode rows before the prefill sequences): 4 and 32 heads, split
    counts whose partial strides are and are not multiples of 16, one or three decode rows."""
    launches = [(h, s, d) for h in (4, 32) for s in (2, 3, 9, 16, 32) for d in (1, 3)]
    keys = _keys(launches)
    by_heads: dict[int, set[str]] = {}
    for (heads, _, _), key in zip(launches, keys, strict=True):
        by_heads.setdefault(heads, set()).add(key)
    assert all(len(found) == 1 for found in by_heads.values()), by_heads
