"""What a log line knows about where it was written: the request id (per request) and the
process's node id and role (once, at start). launch/log_format.py writes them into every
JSON log line; the plain text format leaves them out.

Who sets what:
  - the router's RequestIdMiddleware sets `REQUEST_ID` for each HTTP request (the task that
    serves it, and the tasks it starts, see it);
  - the decode and prefill services set it at the top of each Generate / Prefill RPC (each
    RPC runs in a task of its own);
  - node/runtime.py calls `tag_process(node_id, role)` once the node id is known; the
    router calls it with role "router" when it starts.
`tag_process` attaches a filter to the root logger's handlers (logging's configuration is
the one process-wide state this needs), so lines from every thread carry the identity.
"""

from __future__ import annotations

import contextvars
import logging

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "splitserve_request_id", default=None
)


class ProcessTag(logging.Filter):
    """Stamps `node_id` and `role` on every record that passes a handler."""

    def __init__(self, node_id: str, role: str) -> None:
        super().__init__()
        self.node_id = node_id
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.node_id = self.node_id
        record.role = self.role
        return True


def tag_process(node_id: str, role: str) -> None:
    """Every later log line of this process names `node_id` and `role` (replacing a tag set
    before: a node learns its id once its port is bound)."""
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, ProcessTag)]:
            handler.removeFilter(old)
        handler.addFilter(ProcessTag(node_id, role))
