"""RouterConfig: everything the router process is started with, built once from the CLI."""

from __future__ import annotations

from dataclasses import dataclass, field

from splitserve.node.registry import DEFAULT_CLUSTER
from splitserve.protocol.security import TransportSecurity
from splitserve.protocol.tracing import check_endpoint
from splitserve.router.policy import PolicyConfig
from splitserve.router.tool_parsers import TOOL_CALL_PARSERS

# Body limit derived from the context: room for a full context of the most verbose encoding
# (a token id list, or text escaped as \uXXXX: about 6-12 bytes a token) four times over,
# plus the rest of the request. 128k tokens: about 7 MiB.
BODY_BASE_BYTES = 1 << 20
BODY_BYTES_PER_TOKEN = 48
UNKNOWN_CONTEXT_BODY_BYTES = 8 << 20

_POSITIVE_FIELDS = (
    "redis_timeout_s",
    "node_cache_s",
    "gc_interval_s",
    "node_rpc_timeout_s",
    "keepalive_interval_s",
    "keepalive_timeout_s",
    "stream_idle_timeout_s",
    "first_message_timeout_s",
    "suspect_s",
    "http_keep_alive_s",
)


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
    # Bearer token required on /v1/*, /tokenize and /detokenize (everything but /health,
    # /live, /ready and, unless protect_metrics, /metrics); empty: no auth.
    api_key: str = field(default="", repr=False)
    # /metrics needs the API key too.
    protect_metrics: bool = False
    # HTTPS: PEM certificate and key (uvicorn's --ssl-certfile/--ssl-keyfile); empty: HTTP.
    ssl_certfile: str = ""
    ssl_keyfile: str = ""
    # PEM CA bundle: HTTPS clients must present a certificate signed by it.
    ssl_ca_certs: str = ""
    # gRPC towards the nodes: TLS, client certificate and cluster token (protocol/security.py).
    security: TransportSecurity = field(default_factory=TransportSecurity)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # Socket timeout of every Redis call (s): a dead or hung Redis never holds a request longer.
    redis_timeout_s: float = 0.15
    # How long a node list read from Redis is reused (s); heartbeats come every second.
    node_cache_s: float = 0.5
    # Period of the prefix-index garbage collection (s).
    gc_interval_s: float = 30.0
    # Timeout of Stats/Abort calls to nodes (s).
    node_rpc_timeout_s: float = 0.5
    # gRPC keepalive towards nodes: a ping every interval, the connection (and every stream
    # on it) fails when one is not answered within the timeout. A frozen node is noticed
    # within the sum (s).
    keepalive_interval_s: float = 1.0
    keepalive_timeout_s: float = 2.0
    # Longest silence of a decode stream after its first message (s): a decode step takes
    # milliseconds to a second, so this is a stalled engine, not a slow one.
    stream_idle_timeout_s: float = 10.0
    # Longest wait for a stream's first message (s): prefill of a long prompt, remote or
    # local (the decode node falls back to local prefill within its --prefill-timeout-s).
    first_message_timeout_s: float = 120.0
    # How long a decode node that failed a liveness check is left out of routing (s).
    suspect_s: float = 5.0
    # How long an idle HTTP/1.1 client connection is kept open (s). Longer than clients keep
    # idle connections pooled (httpx and the openai client 5 s, aiohttp 15 s, load balancers
    # 60 s), so a client never sends on a connection the router is closing at that instant:
    # uvicorn's default of 5 s equals httpx's, and a request then fails at random with
    # "Server disconnected without sending a response".
    http_keep_alive_s: int = 75
    # Largest request body (bytes); 0: derived from the model's context length
    # (body_limit_for). A larger one is a 413 before it is parsed.
    max_body_bytes: int = 0
    # Threads that parse, template and tokenize requests off the event loop; 0: one per core.
    num_tokenizer_threads: int = 0
    # Reject unknown request fields with a 400 (vLLM and the default: ignore and log them).
    strict_fields: bool = False
    # Origins allowed by CORS ("*" for any); empty: no CORS headers, no preflight answers.
    cors_origins: tuple[str, ...] = ()
    # Ask nodes for per-message timestamps and export where streaming time goes
    # (splitserve_router_stream_stage_seconds); only for nodes on the router's host.
    trace_stream_timing: bool = False
    # Carry every request to a decode node over one Decode.GenerateMany stream per node
    # (one message per engine step for all of them); False: one Generate stream each,
    # which measured slower on one H200 (docs/performance.md).
    multiplex_streams: bool = True
    # OTLP/gRPC collector for the router's spans (protocol/tracing.py); empty: tracing off.
    otlp_traces_endpoint: str = ""
    # How tool_choice "auto" reads the model's calls (router/tool_parsers: llama3_json,
    # hermes); empty: "auto" is a 400 naming --tool-call-parser, as in vLLM.
    tool_call_parser: str = ""

    def __post_init__(self) -> None:
        if not self.redis_url:
            raise ValueError("RouterConfig.redis_url is required, e.g. redis://127.0.0.1:6379/0")
        if not (self.tokenizer or self.model):
            raise ValueError("pass --tokenizer (a local directory or dummy:<preset>) or --model")
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 0 or self.num_tokenizer_threads < 0:
            raise ValueError("max_body_bytes and num_tokenizer_threads must be >= 0 (0: auto)")
        if self.otlp_traces_endpoint:
            check_endpoint(self.otlp_traces_endpoint)
        if self.tool_call_parser and self.tool_call_parser not in TOOL_CALL_PARSERS:
            known = ", ".join(TOOL_CALL_PARSERS)
            message = f"unknown --tool-call-parser {self.tool_call_parser!r}; pick one of {known}"
            raise ValueError(message)
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ValueError("pass --ssl-certfile and --ssl-keyfile together (HTTPS)")
        if self.ssl_ca_certs and not self.ssl_certfile:
            raise ValueError("--ssl-ca-certs (client certificates) needs HTTPS: --ssl-certfile")
        if self.protect_metrics and not self.api_key:
            raise ValueError("--protect-metrics needs --api-key (the key /metrics then requires)")
        for name in _POSITIVE_FIELDS:
            if getattr(self, name) <= 0:
                raise ValueError(f"RouterConfig.{name} must be > 0, got {getattr(self, name)}")

    @property
    def is_https(self) -> bool:
        return bool(self.ssl_certfile)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.model

    def body_limit_for(self, max_model_len: int) -> int:
        """The request body limit (bytes) for a model of `max_model_len` tokens (0: unknown)."""
        if self.max_body_bytes:
            return self.max_body_bytes
        if max_model_len <= 0:
            return UNKNOWN_CONTEXT_BODY_BYTES
        return BODY_BASE_BYTES + BODY_BYTES_PER_TOKEN * max_model_len
