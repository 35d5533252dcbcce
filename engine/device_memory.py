"""How big the KV pool is on a GPU when no size is given, and how much memory the device has.

`build_parts` sizes the pool this way when CacheConfig gives neither `num_blocks` nor
`kv_cache_memory_gib` and the device is CUDA, in this order:

    start = MemoryStart.take(device)          # before the weights are loaded
    ... load the weights ...
    budget = profile_kv_budget(model, start, probe, utilization)

`profile_kv_budget` runs one eager forward pass over a full step (`max_num_batched_tokens`
prompt tokens, nothing stored: every slot is -1, on a one-block probe pool) and the logits
of `max_num_seqs` rows, then gives the pool what `gpu_memory_utilization` of the device
leaves once torch's peak allocation (weights and that step's activations) and the memory
the process took outside torch's allocator since `start` (cuBLAS workspaces, kernel
modules) are counted. What the utilization leaves out covers the CUDA graphs captured
next and the sampler's temporaries. The arithmetic is `kv_budget_bytes`, a pure function.
`vllm serve` sizes its KV cache the same way (its `gpu_memory_utilization`, 0.92 in
vLLM 0.26, this engine's default too).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from splitserve.engine.kv_pool import GIB
from splitserve.engine.warmup import Row, step_metadata

logger = logging.getLogger(__name__)


def total_memory_gib(device: str) -> float | None:
    """The CUDA device's memory in GiB; None for other devices (or none visible)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(dev).total_memory / GIB


@dataclass(frozen=True)
class MemoryUse:
    """What one engine's profiling found, in bytes."""

    total: int  # the device's memory
    free_at_start: int  # free before the weights were loaded
    torch_peak: int  # torch's peak allocation since the start (weights + one step)
    non_torch_growth: int  # taken outside torch's allocator since the start


def kv_budget_bytes(use: MemoryUse, utilization: float) -> int:
    """Bytes for the KV pool: `utilization` of the device less what the engine needs
    besides it. ValueError (with the fix) when the device cannot give that much."""
    wanted = int(utilization * use.total)
    if use.free_at_start < wanted:
        raise ValueError(
            f"{use.free_at_start / GIB:.1f} GiB of the device's {use.total / GIB:.1f} GiB "
            f"were free at start, less than gpu_memory_utilization={utilization} asks for "
            f"({wanted / GIB:.1f} GiB): another engine or process holds the rest; lower "
            "--gpu-memory-utilization or give --kv-cache-memory-gib"
        )
    budget = wanted - use.torch_peak - use.non_torch_growth
    if budget <= 0:
        raise ValueError(
            f"gpu_memory_utilization={utilization} ({wanted / GIB:.1f} GiB) leaves nothing "
            f"for the KV pool: the weights and one step take {use.torch_peak / GIB:.1f} GiB "
            f"and {use.non_torch_growth / GIB:.1f} GiB more outside torch; raise "
            "--gpu-memory-utilization, lower --max-num-batched-tokens or give "
            "--kv-cache-memory-gib"
        )
    return budget


class MemoryStart(NamedTuple):
    """The device's memory before the weights are loaded."""

    device: torch.device
    total: int
    free: int
    reserved: int

    @classmethod
    def take(cls, device: torch.device) -> MemoryStart:
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        free, total = torch.cuda.mem_get_info(device)
        return cls(device, total, free, torch.cuda.memory_reserved(device))

    def use_since(self) -> MemoryUse:
        """What the process has used since `take`, with torch's cache emptied first."""
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info(self.device)
        reserved = torch.cuda.memory_reserved(self.device)
        growth = (self.free - free) - (reserved - self.reserved)
        return MemoryUse(self.total, self.free, peak, max(0, growth))


class ProbeStep(NamedTuple):
    """The step the profile runs: `tokens` prompt tokens in sequences of at most
    `max_model_len`, and the logits of `logit_rows` rows."""

    tokens: int
    logit_rows: int
    max_model_len: int
    block_size: int

    def rows(self) -> list[Row]:
        full, rest = divmod(self.tokens, self.max_model_len)
        return [Row(self.max_model_len, self.max_model_len)] * full + (
            [Row(rest, rest)] if rest else []
        )


@torch.inference_mode()
def run_probe(model: Any, probe_pool: torch.Tensor, step: ProbeStep) -> None:
    """One eager forward pass over `step`, storing nothing, and its logits."""
    device = probe_pool.device
    rows = step.rows()
    meta = step_metadata(rows, step.block_size, device)
    positions = torch.cat([torch.arange(r.seq_len, device=device) for r in rows])
    ids = torch.zeros(len(positions), dtype=torch.int64, device=device)
    hidden = model(ids, positions, probe_pool, meta)
    model.compute_logits(hidden[: min(step.logit_rows, step.tokens)])


def profile_kv_budget(
    model: Any, start: MemoryStart, probe_pool: torch.Tensor, step: ProbeStep, utilization: float
) -> int:
    """Bytes for the KV pool (see the module docstring); `probe_pool` is a pool of one
    block, freed by the caller before the real one is allocated."""
    run_probe(model, probe_pool, step)
    use = start.use_since()
    budget = kv_budget_bytes(use, utilization)
    logger.info(
        "KV pool: %.1f GiB (%.0f%% of %.1f GiB, less %.1f GiB of weights and a %d-token "
        "step, %.2f GiB outside torch)",
        budget / GIB,
        utilization * 100,
        use.total / GIB,
        use.torch_peak / GIB,
        step.tokens,
        use.non_torch_growth / GIB,
    )
    return budget
