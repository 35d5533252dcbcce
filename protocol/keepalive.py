"""gRPC keepalive: how either end of a node connection notices that the other froze.

A process stopped (SIGSTOP, a debugger, a swapped-out host) keeps its TCP connections open,
so without pings a stream to it waits forever. Clients (the router towards decode nodes, a
decode node towards prefill nodes) ping every `interval_s` and fail every call on the
connection with UNAVAILABLE when a ping is not answered within `timeout_s`; servers (every
node) must accept pings that often, or they would close the connection as abusive.

    channel = security.open_channel(addr, [*other, *client_options(1.0, 2.0)], transport)
    server = grpc.aio.server(options=[*other, *SERVER_OPTIONS])
"""

from __future__ import annotations

# A node accepts a ping this often at most (ms), from clients with or without calls.
MIN_PING_INTERVAL_MS = 200

SERVER_OPTIONS: list[tuple[str, int]] = [
    ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
    ("grpc.http2.max_ping_strikes", 0),  # 0: never close a connection for its pings
    ("grpc.keepalive_permit_without_calls", 1),
]


def client_options(interval_s: float, timeout_s: float) -> list[tuple[str, int]]:
    """Channel options: ping every `interval_s`, declare the peer dead after `timeout_s`."""
    if interval_s * 1000 < MIN_PING_INTERVAL_MS or timeout_s <= 0:
        raise ValueError(
            f"keepalive interval must be >= {MIN_PING_INTERVAL_MS} ms and its timeout > 0, "
            f"got {interval_s} s and {timeout_s} s"
        )
    return [
        ("grpc.keepalive_time_ms", int(interval_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(timeout_s * 1000)),
        # Newer gRPC cores time a ping out by this one (default 60 s), not the above.
        ("grpc.http2.ping_timeout_ms", int(timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # Keep pinging while a stream waits for its first message (no data either way).
        ("grpc.http2.max_pings_without_data", 0),
    ]
