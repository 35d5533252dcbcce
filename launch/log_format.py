"""--log-format text|json: how every splitserve process writes its log lines (stderr).

text: `time level logger: message`, for people. json: one JSON object per line, for log
shippers (Loki, Elasticsearch, Cloud Logging), with the keys

    time        ISO 8601 UTC with milliseconds      "2026-12-02T01:55:00.123Z"
    level       DEBUG, INFO, WARNING, ERROR, CRITICAL
    logger      the module logger's name           "splitserve.node.runtime"
    message     the formatted message
    request_id  when the line is written for a request (router, decode and prefill alike)
    node_id     node processes: the node's id (its Redis and NIXL name)
    role        "router", "prefill" or "decode"
    exception   the traceback, when there is one

request_id, node_id and role come from protocol/log_context.py; a key whose value is
unknown is left out. launch/cli.py calls `configure_logging` once per process, before the
command runs; `splitserve up` passes its --log-format (and --log-level) to every child.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from splitserve.protocol.log_context import REQUEST_ID

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring for its keys)."""

    def format(self, record: logging.LogRecord) -> str:
        when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line: dict[str, Any] = {
            "time": f"{when}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        for key, value in (
            ("request_id", request_id),
            ("node_id", getattr(record, "node_id", None)),
            ("role", getattr(record, "role", None)),
        ):
            if value:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False, default=str)


def make_formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")


def configure_logging(level: str, log_format: str) -> None:
    """The root logger writes `log_format` lines at `level` to stderr. A process that set
    up logging before (a test runner calling the CLI in-process) keeps its handlers."""
    handler = logging.StreamHandler()
    handler.setFormatter(make_formatter(log_format))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
