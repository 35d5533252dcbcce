"""Engine statistics, as the nodes' Stats RPC and Prometheus scrapes read them."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    @property
    def prefix_cache_hit_rate(self) -> float:
        return (
            self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0
        )

    def as_dict(self) -> dict[str, float]:
        out: dict[str, float] = {k: float(v) for k, v in asdict(self).items()}
        out["prefix_cache_hit_rate"] = self.prefix_cache_hit_rate
        return out
