"""Sizing by device (engine/device_memory.py, engine/config.py's `scheduler_config`): the KV
pool's budget from a memory profile, the step limits of a large GPU, the probe step that
the profile runs, and what the CLI and `LLM` resolve on the CPU. On a GPU, an engine
started with no KV size stays within its memory share."""

from __future__ import annotations

import argparse

import pytest
import torch

from splitserve.engine.config import (
    CPU_KV_CACHE_MEMORY_GIB,
    LARGE_GPU_MIN_GIB,
    LARGE_GPU_SCHEDULER,
    CacheConfig,
    SchedulerConfig,
    scheduler_config,
)
from splitserve.engine.device_memory import (
    GIB,
    MemoryUse,
    ProbeStep,
    kv_budget_bytes,
    run_probe,
    total_memory_gib,
)
from splitserve.engine.kv_pool import (
    KVShape,
    allocate_kv_pool,
    block_bytes,
    needs_profile,
    num_blocks_for,
)
from splitserve.engine.llm import LLM
from splitserve.launch.engine_args import add_engine_arguments, engine_config_from_args

SHAPE = KVShape(num_layers=4, num_kv_heads=2, head_dim=8, block_size=16)


def use(**fields: int) -> MemoryUse:
    base = dict(total=100 * GIB, free_at_start=99 * GIB, torch_peak=20 * GIB, non_torch_growth=0)
    return MemoryUse(**{**base, **fields})


def test_budget_is_the_share_less_weights_step_and_outside_memory() -> None:
    got = kv_budget_bytes(use(non_torch_growth=GIB), 0.9)
    assert got == int(0.9 * 100 * GIB) - 20 * GIB - GIB


def test_budget_refuses_a_share_another_process_holds() -> None:
    with pytest.raises(ValueError, match="lower --gpu-memory-utilization"):
        kv_budget_bytes(use(free_at_start=50 * GIB), 0.9)


def test_budget_refuses_a_share_the_weights_fill() -> None:
    with pytest.raises(ValueError, match="leaves nothing for the KV pool"):
        kv_budget_bytes(use(torch_peak=95 * GIB), 0.9)


def test_pool_size_given_profiled_or_cpu_default() -> None:
    one = block_bytes(SHAPE, torch.float32)
    assert num_blocks_for(CacheConfig(num_blocks=7), SHAPE, torch.float32, 10**12) == 7
    given = CacheConfig(kv_cache_memory_gib=1.0)
    assert num_blocks_for(given, SHAPE, torch.float32, 10**12) == GIB // one
    assert num_blocks_for(CacheConfig(), SHAPE, torch.float32, 100 * one + 5) == 100
    cpu = num_blocks_for(CacheConfig(), SHAPE, torch.float32)
    assert cpu == int(CPU_KV_CACHE_MEMORY_GIB * GIB) // one
    with pytest.raises(ValueError, match="holds no KV block"):
        num_blocks_for(CacheConfig(), SHAPE, torch.float32, one - 1)


def test_only_an_unsized_cuda_pool_is_profiled() -> None:
    assert needs_profile(CacheConfig(), torch.device("cuda"))
    assert not needs_profile(CacheConfig(), torch.device("cpu"))
    assert not needs_profile(CacheConfig(num_blocks=8), torch.device("cuda"))
    assert not needs_profile(CacheConfig(kv_cache_memory_gib=2.0), torch.device("cuda"))
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        CacheConfig(gpu_memory_utilization=1.5)


def test_large_gpu_gets_serving_limits_unless_given() -> None:
    assert scheduler_config(LARGE_GPU_MIN_GIB + 70) == SchedulerConfig(**LARGE_GPU_SCHEDULER)
    assert scheduler_config(LARGE_GPU_MIN_GIB - 1) == SchedulerConfig()
    assert scheduler_config(None, max_num_seqs=None) == SchedulerConfig()
    mine = scheduler_config(140.0, max_num_seqs=8, enable_chunked_prefill=False)
    assert mine.max_num_seqs == 8 and not mine.enable_chunked_prefill
    assert mine.max_num_batched_tokens == LARGE_GPU_SCHEDULER["max_num_batched_tokens"]


def test_cli_on_the_cpu_keeps_the_small_limits_and_pool() -> None:
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    config = engine_config_from_args(parser.parse_args(["--model", "tiny-llama"]))
    assert config.scheduler == SchedulerConfig()
    assert config.cache.kv_cache_memory_gib is None
    given = ["--model", "m", "--max-num-seqs", "3", "--gpu-memory-utilization", "0.5"]
    config = engine_config_from_args(parser.parse_args(given))
    assert config.scheduler.max_num_seqs == 3 and config.cache.gpu_memory_utilization == 0.5
    assert total_memory_gib("cpu") is None


@pytest.mark.parametrize("tokens,max_len", [(100, 40), (80, 40), (16, 512)])
def test_probe_step_splits_at_the_context_limit(tokens: int, max_len: int) -> None:
    rows = ProbeStep(tokens, 4, max_len, 16).rows()
    assert sum(r.query_len for r in rows) == tokens
    assert all(r.query_len == r.seq_len <= max_len for r in rows)


def test_probe_runs_on_a_one_block_pool_and_stores_nothing(tiny_llama) -> None:
    engine = LLM(str(tiny_llama), dtype="float32").engine
    probe = allocate_kv_pool(1, engine.kv_shape, engine.dtype, engine.device)
    probe.normal_()
    before = probe.clone()
    step = ProbeStep(engine.max_model_len + 7, 4, engine.max_model_len, engine.block_size)
    run_probe(engine.model, probe, step)
    assert torch.equal(probe, before)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_unsized_gpu_pool_takes_its_share_and_a_second_is_refused(tiny_llama) -> None:
    share = 0.3
    free, total = torch.cuda.mem_get_info()
    if free < 2 * share * total:
        pytest.skip("the GPU is in use by another process")
    engine = LLM(str(tiny_llama), dtype="float32", device="cuda", gpu_memory_utilization=share)
    pool_bytes = engine.engine.kv_cache.numel() * engine.engine.kv_cache.element_size()
    # The tiny model's weights and steps are small: nearly the whole share is the pool.
    assert 0.8 * share * total < pool_bytes < share * total
    with pytest.raises(ValueError, match="another engine or process holds the rest"):
        LLM(str(tiny_llama), dtype="float32", device="cuda", gpu_memory_utilization=0.9)
