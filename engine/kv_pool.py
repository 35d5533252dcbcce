"""The node's KV pool: one block-major tensor

    kv[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]

so that one block of all layers is one contiguous region (one transfer descriptor; runs
of adjacent blocks merge into one). Sized from a block count or a memory budget (given,
or on CUDA profiled: engine/device_memory.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from splitserve.engine.config import CPU_KV_CACHE_MEMORY_GIB, CacheConfig

GIB = 1 << 30


class KVShape(NamedTuple):
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int

    def block_numel(self) -> int:
        return self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim


def block_bytes(shape: KVShape, dtype: torch.dtype) -> int:
    return shape.block_numel() * torch.empty((), dtype=dtype).element_size()


def needs_profile(cache: CacheConfig, device: torch.device) -> bool:
    """Whether the pool's size comes from profiling the device's memory."""
    return cache.num_blocks is None and cache.kv_cache_memory_gib is None and device.type == "cuda"


def num_blocks_for(
    cache: CacheConfig, shape: KVShape, dtype: torch.dtype, profiled_bytes: int | None = None
) -> int:
    """Blocks the config asks for: an exact count, else as many as the budget holds (the
    given GiB, else `profiled_bytes` when profiled, else CPU_KV_CACHE_MEMORY_GIB)."""
    if cache.num_blocks is not None:
        return cache.num_blocks
    if cache.kv_cache_memory_gib is not None:
        budget, source = int(cache.kv_cache_memory_gib * GIB), "kv_cache_memory_gib"
    elif profiled_bytes is not None:
        budget, source = profiled_bytes, "gpu_memory_utilization"
    else:
        budget, source = int(CPU_KV_CACHE_MEMORY_GIB * GIB), "the CPU default"
    num = budget // block_bytes(shape, dtype)
    if num < 1:
        raise ValueError(
            f"{budget / GIB:.3f} GiB for the KV pool ({source}) holds no KV block of "
            f"{block_bytes(shape, dtype)} bytes; raise it or set num_blocks"
        )
    return num


def allocate_kv_pool(
    num_blocks: int, shape: KVShape, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    return torch.zeros(
        (num_blocks, shape.num_layers, 2, shape.block_size, shape.num_kv_heads, shape.head_dim),
        dtype=dtype,
        device=device,
    )
