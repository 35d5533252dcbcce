"""Piecewise graphs of prefill and mixed steps (engine/piecewise_graphs.py): the bucket
rule, and the pieces' orchestration (static buffers, padding to a bucket, attention
between pieces) run without graphs on the CPU against the plain forward.
tests/test_engine_gpu.py checks the captured graphs against eager steps on a GPU."""

from __future__ import annotations

import random

import pytest
from engine_outputs import assert_same_tokens

from splitserve.engine.llm import LLM
from splitserve.engine.piecewise_graphs import PiecewiseGraphs, piecewise_buckets
from splitserve.engine.sampling_params import SamplingParams


@pytest.mark.parametrize("max_tokens", [1, 16, 100, 512, 2048, 8192, 10000])
def test_buckets_cover_every_step_with_little_padding(max_tokens: int) -> None:
    sizes = piecewise_buckets(max_tokens)
    assert sizes == sorted(set(sizes)) and sizes[-1] == max_tokens
    for tokens in range(1, max_tokens + 1, 7):
        bucket = next(s for s in sizes if s >= tokens)
        assert bucket - tokens < max(16, tokens / 8 + 1)


def test_buckets_refuse_nothing_to_capture() -> None:
    with pytest.raises(ValueError, match="max_tokens"):
        piecewise_buckets(0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pieces_give_the_plain_forward_tokens(tiny_model_factory, arch: str) -> None:
    model_dir = tiny_model_factory(arch)
    plain = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    pieced = LLM(str(model_dir), dtype="float32", max_num_batched_tokens=64)
    runner = pieced.engine.runner
    runner.pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 64, capture=False)
    rng = random.Random(1)
    vocab = plain.engine.arch.vocab_size
    batch = [[rng.randrange(vocab) for _ in range(n)] for n in (1, 9, 16, 33, 70, 150)]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    want = plain.generate(batch, params)
    got = pieced.generate(batch, params)
    again = pieced.generate(batch[3:], params)  # prefixes now cached
    assert pieced.engine.stats().num_piecewise_steps > 0
    assert_same_tokens(got + again, want + want[3:])
