"""splitserve.node: what prefill and decode nodes share — the runtime (engine, gRPC server,
NIXL agent, drain), the RPCs both answer alike, and the Redis registry, prefix index and
publisher. The router reads the registry and the index through the same modules.

Nothing is imported here, so the router can import `node.registry` without torch."""
