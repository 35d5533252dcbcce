"""Configuration of a node's KV transfer agent (built once from the CLI, passed down)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal, get_args

UcxErrorMode = Literal["peer", "none"]
UCX_ERROR_MODES: tuple[str, ...] = get_args(UcxErrorMode)


@dataclass(frozen=True)
class TransferConfig:
    # NIXL agent name; unique in the cluster, peers address this node by it.
    agent_name: str
    # NIXL backend plugin. UCX picks cma/shm/tcp on one host, cuda_ipc/NVLink or RDMA for GPUs.
    backend: str = "UCX"
    # NIXL's own progress thread. None: on for a GPU pool, off for a CPU pool (the thread
    # spins a core even when idle). When off, poll() drives progress, so BOTH sides must keep
    # polling while a transfer or a connection set-up is under way.
    enable_progress_thread: bool | None = None
    # Seconds a push may stay unfinished before poll() reports it failed.
    push_timeout_s: float = 30.0
    # Seconds the decode node waits for all chunks of a request it expects.
    arrival_timeout_s: float = 60.0
    # UCX endpoint error handling. "peer" notices a dead peer (needs a transport with active
    # messages, tcp qualifies) and fails its transfers; "none" also allows shared-memory-only
    # UCX_TLS, but a dead peer is then caught by push_timeout_s alone.
    ucx_error_handling_mode: UcxErrorMode = "peer"
    # UCX workers of the backend (UCX `num_workers`).
    num_ucx_workers: int = 1
    # Synchronise the pool device's current CUDA stream before posting a push, so the KV the
    # forward pass wrote is complete before NIXL reads it. Off only if the caller syncs.
    sync_cuda_before_push: bool = True
    # NIXL INFO logs; otherwise NIXL_LOG_LEVEL defaults to WARN.
    debug: bool = False
    # Largest transfer descriptor in bytes: longer runs of adjacent blocks are split so
    # that UCX can spread one push over several copy streams. 0: one descriptor per run.
    max_descriptor_bytes: int = 0
    # KV compatibility hash of this node's pool (kv_transfer/compat.py), sent in the pool
    # descriptor; `connect` refuses peers with another. Nodes always set it; bare agents
    # (transfer tests, benchmarks) leave it empty and so connect only to each other.
    compat_hash: str = ""
    # What the hash was made of, for the refusal message.
    compat_summary: str = ""

    def __post_init__(self) -> None:
        if not self.agent_name:
            raise ValueError("agent_name must be a non-empty str (unique in the cluster)")
        if not self.backend:
            raise ValueError("backend must name a NIXL plugin, e.g. 'UCX'")
        if self.push_timeout_s <= 0 or self.arrival_timeout_s <= 0:
            raise ValueError(
                f"timeouts must be > 0 s, got push_timeout_s={self.push_timeout_s} "
                f"arrival_timeout_s={self.arrival_timeout_s}"
            )
        if self.ucx_error_handling_mode not in UCX_ERROR_MODES:
            raise ValueError(
                f"ucx_error_handling_mode must be one of {UCX_ERROR_MODES}, "
                f"got {self.ucx_error_handling_mode!r}"
            )
        if self.max_descriptor_bytes < 0:
            raise ValueError(
                f"max_descriptor_bytes must be >= 0 (0: unlimited), got {self.max_descriptor_bytes}"
            )
        if self.num_ucx_workers < 1:
            raise ValueError(f"num_ucx_workers must be >= 1, got {self.num_ucx_workers}")

    def max_descriptor_blocks(self, block_bytes: int) -> int:
        """Blocks per descriptor at most (0: unlimited)."""
        if not self.max_descriptor_bytes:
            return 0
        return max(1, self.max_descriptor_bytes // block_bytes)

    def use_progress_thread(self, is_gpu_pool: bool) -> bool:
        if self.enable_progress_thread is None:
            return is_gpu_pool
        return self.enable_progress_thread

    def backend_params(self) -> dict[str, str]:
        """Initialisation parameters passed to NIXL's create_backend."""
        if self.backend != "UCX":
            return {}
        return {
            "ucx_error_handling_mode": self.ucx_error_handling_mode,
            "num_workers": str(self.num_ucx_workers),
        }


def import_nixl(debug: bool) -> tuple[Any, tuple[type[BaseException], ...]]:
    """Import nixl (its `_api` module and the exception types its bindings raise).

    NIXL is kept at WARN unless debugging: NIXL_LOG_LEVEL is read once, when nixl is first
    imported, so this sets it first. An explicit NIXL_LOG_LEVEL in the environment wins.
    """
    os.environ.setdefault("NIXL_LOG_LEVEL", "INFO" if debug else "WARN")
    import nixl._api as nixl_api
    import nixl._bindings as nixl_bindings

    errors = tuple(
        getattr(nixl_bindings, name) for name in dir(nixl_bindings) if name.endswith("Error")
    )
    return nixl_api, errors
