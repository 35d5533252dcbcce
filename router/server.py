"""Run the router app under uvicorn: in the foreground (the CLI) or in a thread (tests, tools).

    server = RouterServer(config)            # loads the tokenizer, binds host:port (0: free)
                                             # HTTPS with config.ssl_certfile/ssl_keyfile
    await server.serve(on_ready=callback)    # until SIGINT/SIGTERM (main thread) or stop()
    # or
    server.start_in_thread(); server.url; server.stop_thread()

The socket is bound in the constructor, so `server.port` is known before serving starts.
Stopping is graceful: in-flight requests get `graceful_timeout_s`, the lifespan closes Redis
and the gRPC channels. Signals set a flag; the process then exits normally (code 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import ssl
import threading
from collections.abc import Callable, Generator
from typing import Any

import uvicorn

from splitserve.router.app import build_app
from splitserve.router.config import RouterConfig
from splitserve.router.tokenizer import RouterTokenizer


class _Server(uvicorn.Server):
    """uvicorn.Server that leaves signals to RouterServer (no re-raise after shutdown)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc}): pick another --port") from exc
    return sock


def _ssl_options(config: RouterConfig) -> dict[str, Any]:
    """uvicorn's HTTPS settings; client certificates required when a CA is given."""
    if not config.is_https:
        return {}
    options: dict[str, Any] = {
        "ssl_certfile": config.ssl_certfile,
        "ssl_keyfile": config.ssl_keyfile,
    }
    if config.ssl_ca_certs:
        options.update(ssl_ca_certs=config.ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED)
    return options


class RouterServer:
    def __init__(
        self,
        config: RouterConfig,
        tokenizer: RouterTokenizer | None = None,
        log_level: str = "info",
        graceful_timeout_s: int = 5,
    ) -> None:
        self.config = config
        self.app = build_app(config, tokenizer)
        self._sock = bind_socket(config.host, config.port)
        self.port = int(self._sock.getsockname()[1])
        uv_config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level=log_level,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=graceful_timeout_s,
            timeout_keep_alive=config.http_keep_alive_s,
            **_ssl_options(config),
        )
        self._server = _Server(uv_config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        scheme = "https" if self.config.is_https else "http"
        return f"{scheme}://{host}:{self.port}"

    async def serve(self, on_ready: Callable[[str], None] | None = None) -> None:
        """Serve until stop() or, in the main thread, SIGINT/SIGTERM."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop)
        task = loop.create_task(self._server.serve(sockets=[self._sock]))
        while not self._server.started and not task.done():
            await asyncio.sleep(0.02)
        if self._server.started and on_ready is not None:
            on_ready(self.url)
        await task
        if not self._server.started:
            raise RuntimeError("the router did not start; see the log above")

    def stop(self) -> None:
        self._server.should_exit = True

    def start_in_thread(self, timeout_s: float = 30.0) -> RouterServer:
        ready = threading.Event()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self.serve(lambda _: ready.set())),
            name="router-server",
            daemon=True,
        )
        self._thread.start()
        if not ready.wait(timeout_s):
            self.stop_thread()
            raise RuntimeError(f"router did not start within {timeout_s} s")
        return self

    def stop_thread(self, timeout_s: float = 15.0) -> None:
        self.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self._sock.close()
