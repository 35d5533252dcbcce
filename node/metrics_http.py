"""MetricsServer: a node's `/metrics` over HTTP (Prometheus text format), on a thread.

NodeRuntime.start calls `start()` once the node's metrics exist and before it registers in
Redis (the record carries `url`); NodeRuntime.stop calls `stop()` after the gRPC server
stopped, so a draining node stays observable. Each scrape runs on the server's own thread
(prometheus_client's threading WSGI server) and reads the node's CollectorRegistry: no
global registry is shared between the nodes of one process.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


def url_host(host: str) -> str:
    """`host` as it goes into a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.requested_port = port
        self.port = 0
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            self._httpd, self._thread = start_http_server(
                self.requested_port, addr=self.host, registry=self.registry
            )
        except OSError as exc:
            raise ValueError(
                f"cannot serve metrics on {self.host}:{self.requested_port} ({exc}); "
                "pick a free --metrics-port (0 picks one)"
            ) from exc
        self.port = self._httpd.server_port

    def url(self, public_host: str) -> str:
        """The scrape URL others use; `public_host` stands in for a wildcard bind."""
        host = public_host if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{url_host(host)}:{self.port}/metrics"

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._httpd = None
