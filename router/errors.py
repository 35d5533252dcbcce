"""OpenAI error objects: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

Handlers raise `APIError`; the app turns it (and malformed bodies, and anything unexpected)
into a JSON response of this shape, so a client never sees a stack trace. Types follow
OpenAI: 4xx are `invalid_request_error` (401 with code `invalid_api_key`, 404 with code
`model_not_found`), 5xx are `server_error` (503: no node can serve right now).
"""

from __future__ import annotations

from typing import Any

import grpc
from pydantic import ValidationError

# gRPC status codes that mean "this node cannot serve now": try later or elsewhere.
UNAVAILABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


class APIError(Exception):
    """An error the client should see as an OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        err_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.err_type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def from_validation_error(exc: ValidationError) -> APIError:
    """400 naming the first offending field (pydantic's location, dotted)."""
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(part) for part in first["loc"])
    kind = first["type"]
    if kind == "json_invalid":
        return bad_request(f"request body is not valid JSON: {first['msg']}")
    if kind == "extra_forbidden":
        return bad_request(
            f"unknown field {loc!r}: this server rejects fields it does not implement "
            "(see docs/router.md for the accepted ones)",
            param=loc,
        )
    if kind == "missing":
        return bad_request(f"field {loc!r} is required", param=loc)
    given = first.get("input")
    shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
    return bad_request(f"invalid value for {loc!r} ({shown}): {first['msg']}", param=loc or None)


def from_grpc_error(exc: grpc.aio.AioRpcError, node: str) -> APIError:
    """503 when the node is unreachable or overloaded, 400 when it rejected the request."""
    code = exc.code()
    detail = exc.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return bad_request(f"the decode node rejected the request: {detail}")
    if code in UNAVAILABLE_CODES:
        message = f"decode node {node} is unavailable ({code.name}: {detail})"
        return APIError(503, message, code="node_unavailable")
    return APIError(500, f"decode node {node} failed ({code.name}: {detail})", code="node_error")


def param_of_value_error(message: str, fields: frozenset[str]) -> str | None:
    """The field a SamplingParams ValueError starts with ("n must be ..." -> "n")."""
    head = message.split(" ", 1)[0].strip("()")
    return head if head in fields else None
