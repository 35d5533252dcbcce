"""Engine statistics, as the nodes' Stats RPC and Prometheus scrapes read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from splitserve.engine.block_manager import BlockManager
from splitserve.engine.forward_times import DECODE, PREFILL
from splitserve.engine.scheduler import Scheduler
from splitserve.kernels.prefill_runs import CONTEXT, CUDNN, FLASH, ROWS

if TYPE_CHECKING:
    from splitserve.engine.model_runner import ModelRunner


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_for_remote_kv: int
    num_held: int
    num_blocks: int
    num_free_blocks: int
    num_cached_blocks: int
    # Fraction of KV blocks owned by requests.
    kv_usage: float
    # Prompt tokens looked up in the prefix cache, and those found there.
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    # Prompt tokens this engine computed itself (not cached, not received).
    prompt_tokens_computed: int
    generation_tokens: int
    num_requests_finished: int
    num_steps: int
    # Steps that replayed a captured CUDA graph instead of launching kernels one by one.
    num_graph_steps: int = 0
    # Prefill and mixed steps that replayed piecewise CUDA graphs around eager attention.
    num_piecewise_steps: int = 0
    # Prefill runs attended since start, by path (kernels/prefill_runs.py): the Triton
    # kernel over cached context, FlashAttention-2, cuDNN, the decode kernel a row at a time
    # (short chunks over cached context); zero on the torch backend.
    # Named as the Stats RPC's extra keys (protocol/messages.py LABELLED_COUNTERS).
    prefill_runs_context: int = 0
    prefill_runs_flash: int = 0
    prefill_runs_cudnn: int = 0
    prefill_runs_rows: int = 0
    # Forward passes since start by kind (engine/forward_times.py: decode, every row one
    # token; prefill, any prompt tokens), their rows and their device seconds. Named as
    # the Stats RPC's extra keys (protocol/messages.py LABELLED_COUNTERS).
    forwards_decode: int = 0
    forwards_prefill: int = 0
    forward_rows_decode: int = 0
    forward_rows_prefill: int = 0
    forward_device_s_decode: float = 0.0
    forward_device_s_prefill: float = 0.0

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out


def collect_stats(
    scheduler: Scheduler,
    blocks: BlockManager,
    *,
    generation_tokens: int,
    num_finished: int,
    num_steps: int,
    runner: ModelRunner,
) -> EngineStats:
    pool = blocks.pool
    prefill_runs = runner.prefill_runs()
    forwards = runner.forward_times.totals()
    return EngineStats(
        num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting),
        num_waiting_for_remote_kv=len(scheduler.remote),
        num_held=len(scheduler.held),
        num_blocks=pool.num_blocks,
        num_free_blocks=pool.num_free_blocks,
        num_cached_blocks=pool.num_cached_blocks,
        kv_usage=pool.usage,
        prefix_cache_queries=blocks.num_query_tokens,
        prefix_cache_hits=blocks.num_hit_tokens,
        num_preemptions=scheduler.num_preemptions,
        prompt_tokens_computed=scheduler.num_prompt_tokens_computed,
        generation_tokens=generation_tokens,
        num_requests_finished=num_finished,
        num_steps=num_steps,
        num_graph_steps=runner.num_graph_steps,
        num_piecewise_steps=runner.num_piecewise_steps,
        prefill_runs_context=prefill_runs.get(CONTEXT, 0),
        prefill_runs_flash=prefill_runs.get(FLASH, 0),
        prefill_runs_cudnn=prefill_runs.get(CUDNN, 0),
        prefill_runs_rows=prefill_runs.get(ROWS, 0),
        forwards_decode=forwards[DECODE].num,
        forwards_prefill=forwards[PREFILL].num,
        forward_rows_decode=forwards[DECODE].rows,
        forward_rows_prefill=forwards[PREFILL].rows,
        forward_device_s_decode=forwards[DECODE].device_s,
        forward_device_s_prefill=forwards[PREFILL].device_s,
    )
