"""--log-format json: one JSON object per line with time, level, logger and message, and the
request id, node id and role when known (launch/log_format.py, protocol/log_context.py)."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from splitserve.launch.log_format import JsonFormatter, make_formatter
from splitserve.protocol.log_context import REQUEST_ID, ProcessTag


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("splitserve.test_log_format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield logger, stream, handler
    logger.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_carry_request_node_and_role(captured) -> None:
    logger, stream, handler = captured
    logger.info("before the node id: %d", 1)
    handler.addFilter(ProcessTag("decode-127.0.0.1:5000-ab", "decode"))

    async def request(rid: str) -> None:
        REQUEST_ID.set(rid)
        await asyncio.sleep(0)
        logger.warning("in request %s", rid)

    async def two_requests() -> None:
        await asyncio.gather(request("req-1"), request("req-2"))  # a task each

    asyncio.run(two_requests())
    logger.info("no request", extra={"request_id": "req-3"})
    first, *during, last = lines(stream)
    assert set(first) == {"time", "level", "logger", "message"}
    assert first["message"] == "before the node id: 1" and first["level"] == "INFO"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["time"])
    assert first["logger"] == "splitserve.test_log_format"
    assert sorted(x["request_id"] for x in during) == ["req-1", "req-2"]
    assert all(x["message"] == f"in request {x['request_id']}" for x in during)
    assert all(x["node_id"] == "decode-127.0.0.1:5000-ab" for x in [*during, last])
    assert all(x["role"] == "decode" for x in [*during, last])
    assert last["request_id"] == "req-3" and REQUEST_ID.get() is None


def test_exceptions_and_text_format(captured) -> None:
    logger, stream, _ = captured
    try:
        raise RuntimeError("boom \u00e9")
    except RuntimeError:
        logger.exception("failed")
    (line,) = lines(stream)
    assert line["level"] == "ERROR" and "RuntimeError: boom \u00e9" in line["exception"]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello %s", ("you",), None)
    assert make_formatter("text").format(record).endswith(" INFO x: hello you")
    with pytest.raises(ValueError, match="--log-format must be one of text, json"):
        make_formatter("xml")
