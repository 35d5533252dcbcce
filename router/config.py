"""RouterConfig: everything the router process is started with, built once from the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.node.registry import DEFAULT_CLUSTER
from splitserve.router.policy import PolicyConfig


@dataclass(frozen=True)
class RouterConfig:
    redis_url: str
    # Local tokenizer directory or `dummy:<preset>`; empty: use `model`.
    tokenizer: str = ""
    # Served model name to expect; empty: whatever model the live decode nodes serve.
    model: str = ""
    cluster: str = DEFAULT_CLUSTER
    host: str = "127.0.0.1"
    port: int = 8000  # 0 picks a free port
    # Bearer token required on /v1/*, /tokenize and /detokenize; empty: no auth.
    api_key: str = ""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Socket timeout of every Redis call (s): a dead or hung Redis never holds a request longer.
    redis_timeout_s: float = 0.15
    # How long a node list read from Redis is reused (s); heartbeats come every second.
    node_cache_s: float = 0.5
    # Period of the prefix-index garbage collection (s).
    gc_interval_s: float = 30.0
    # Timeout of Stats/Abort calls to nodes (s).
    node_rpc_timeout_s: float = 0.5

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ValueError("RouterConfig.redis_url is required, e.g. redis://127.0.0.1:6379/0")
        if not (self.tokenizer or self.model):
            raise ValueError("pass --tokenizer (a local directory or dummy:<preset>) or --model")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("redis_timeout_s", "node_cache_s", "gc_interval_s", "node_rpc_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"RouterConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model
