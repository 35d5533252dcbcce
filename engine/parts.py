"""The engine's long-lived parts, built once at start-up: the model (with the kernels the
registry picks from configuration), the KV pool (on CUDA, when no size is given, sized by
profiling the device's memory: engine/device_memory.py), the block pool and block manager, and
the decode CUDA graphs; on CUDA the kernels are then warmed up (`engine/warmup.py`), so
that no request waits on a compile, and the piecewise graphs of prefill and mixed steps
are captured (`engine/piecewise_graphs.py`). `EngineCore.__init__` calls
`build_parts(config, kernels)`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.block_pool import BlockPool
from splitserve.engine.config import EngineConfig
from splitserve.engine.cuda_graphs import capture_decode_graphs
from splitserve.engine.device_memory import MemoryStart, ProbeStep, profile_kv_budget
from splitserve.engine.hashing import seed_hash
from splitserve.engine.kv_pool import KVShape, allocate_kv_pool, needs_profile, num_blocks_for
from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.loader import LoadedModel, load_model
from splitserve.engine.model_runner import ModelRunner
from splitserve.engine.piecewise_graphs import capture_piecewise_graphs
from splitserve.engine.warmup import WarmupLimits, warm_up
from splitserve.kernels.registry import ModelKernels, select_kernels

logger = logging.getLogger(__name__)


class EngineParts(NamedTuple):
    loaded: LoadedModel
    kv_shape: KVShape
    kv_cache: torch.Tensor
    pool: BlockPool
    blocks: BlockManager
    runner: ModelRunner
    kernels: ModelKernels

    @property
    def arch(self) -> ModelArchConfig:
        return self.loaded.arch

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer


def build_parts(config: EngineConfig, kernels: ModelKernels | None) -> EngineParts:
    device = torch.device(config.model.device)
    if device.type == "cpu" and config.model.cpu_threads is not None:
        torch.set_num_threads(config.model.cpu_threads)  # process-wide, as torch has it
    if kernels is None:
        model_config = config.model
        kernels = select_kernels(
            device.type,
            model_config.kernel_backend,
            model_config.attention_backend,
            overlap_decode_attention=model_config.overlap_decode_attention,
            fused_decode_merge=model_config.fused_decode_merge,
            short_rest_rows=model_config.short_rest_rows,
            split_context_prefill=model_config.split_context_prefill,
            cudnn_ragged_prompts=model_config.cudnn_ragged_prompts,
        )
    start = MemoryStart.take(device) if needs_profile(config.cache, device) else None
    loaded = load_model(config.model, kernels)
    arch, block_size = loaded.arch, config.cache.block_size
    kv_shape = KVShape(arch.num_layers, arch.num_kv_heads, arch.head_dim, block_size)
    num_blocks = _num_blocks(config, loaded, kv_shape, start)
    kv_cache = allocate_kv_pool(num_blocks, kv_shape, loaded.dtype, device)
    pool = BlockPool(num_blocks, config.cache.enable_prefix_caching)
    blocks = BlockManager(pool, block_size, seed_hash(config.model.model_id, block_size))
    graphs = capture_decode_graphs(loaded.model, kv_cache, config, block_size, loaded.max_model_len)
    if device.type == "cuda":
        limits = WarmupLimits(loaded.max_model_len, config.scheduler.max_num_batched_tokens)
        warm_up(loaded.model, kv_cache, block_size, limits, kernels.draw)
    step_tokens = config.scheduler.max_num_batched_tokens
    pieces = capture_piecewise_graphs(
        loaded.model,
        kv_cache,
        min(config.model.piecewise_graph_max_tokens, step_tokens),
        config.model.enforce_eager,
        step_tokens,
    )
    runner = ModelRunner(
        loaded.model, kv_cache, block_size, device, graphs, pieces, kernels.attention.prefill_runs
    )
    logger.info(
        "engine ready: %s (%s, %s), %d KV blocks of %d tokens, context %d, kernels %s/%s",
        config.model.model_id,
        arch.architecture,
        loaded.dtype,
        num_blocks,
        block_size,
        loaded.max_model_len,
        kernels.backend,
        kernels.attention_backend,
    )
    return EngineParts(loaded, kv_shape, kv_cache, pool, blocks, runner, kernels)


def _num_blocks(
    config: EngineConfig, loaded: LoadedModel, kv_shape: KVShape, start: MemoryStart | None
) -> int:
    """The pool's blocks: as configured, or what a profiled step leaves (`start` given)."""
    if start is None:
        return num_blocks_for(config.cache, kv_shape, loaded.dtype)
    sched = config.scheduler
    step = ProbeStep(
        sched.max_num_batched_tokens, sched.max_num_seqs, loaded.max_model_len, kv_shape.block_size
    )
    probe = allocate_kv_pool(1, kv_shape, loaded.dtype, start.device)
    budget = profile_kv_budget(
        loaded.model, start, probe, step, config.cache.gpu_memory_utilization
    )
    del probe
    return num_blocks_for(config.cache, kv_shape, loaded.dtype, budget)
