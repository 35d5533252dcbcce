"""Constrained decoding on a CUDA GPU: the device path of the token bitmask (pinned host
words, one non-blocking copy, a torch unpack and masked fill) against xgrammar's CPU
kernel, and the tiny llama generating under every test schema with overlapped output
processing (the CUDA default), unconstrained rows beside them unchanged."""

from __future__ import annotations

import pytest
import torch
from structured_schemas import check_every_schema_beside_free_rows

from splitserve.engine.grammar import TokenBitmask, apply_token_bitmask
from splitserve.engine.llm import LLM

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
VOCAB = 1000


def test_device_bitmask_matches_the_cpu_kernel() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, VOCAB, generator=gen)
    words = torch.randint(-(2**31), 2**31 - 1, (3, -(-VOCAB // 32)), generator=gen)
    mask = TokenBitmask([0, 4, 7], words.to(torch.int32))
    on_cpu = logits.clone()
    apply_token_bitmask(on_cpu, mask)
    on_gpu = logits.cuda()
    apply_token_bitmask(on_gpu, mask)
    assert torch.equal(on_gpu.cpu(), on_cpu)


def test_every_schema_validates_on_the_gpu(tiny_llama) -> None:
    llm = LLM(str(tiny_llama), dtype="float32", device="cuda", kv_cache_memory_gib=2.0)
    assert llm.engine.overlap  # the CUDA default: the bitmask path under overlap
    check_every_schema_beside_free_rows(llm)
