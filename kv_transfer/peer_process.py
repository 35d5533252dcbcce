"""A KV transfer peer in a child process, driven over a pipe (tests and benchmarks).

Who calls what, in order (parent process):

1. ``peer = PeerProcess(config, PoolSpec(...))`` spawns the child, which builds the pool
   and a `TransferAgent` + `ArrivalTracker` and answers with its metadata
   (``peer.metadata``, ``peer.descriptor``).
2. ``peer.call(command, *args, pump=...)`` runs one command in the child and returns its
   answer; while waiting it calls ``pump()`` so the parent's own agent keeps making
   progress (with the progress thread off both sides must poll).
3. Events the child reports on its own (``"arrival"``: a `RequestArrival`; ``"pushed"``: a
   `PushResult`) are collected by ``peer.wait_event(kind, predicate, pump=...)``, which
   also sets ``peer.last_event_time``: the child's `time.perf_counter()` when it saw it.
4. ``peer.close()`` (or ``peer.kill()`` for a SIGKILL).

Between commands the child polls its agent and tracker non-stop, so it receives KV and
notifications and finishes its own pushes without being asked.

Commands: connect(metadata, descriptor_json) -> peer name; push(peer, src, dst, tag) ->
push id; notify(peer, message); expect(request_id, timeout_s); forget(request_id);
fill(seed); poison(value); snapshot() -> raw pool bytes; digest(block_ids) -> sha256 hex;
untouched(written_ids, value) -> bool (every other block still holds the poison value).
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import torch

from splitserve.kv_transfer.agent import TransferAgent
from splitserve.kv_transfer.arrivals import ArrivalTracker
from splitserve.kv_transfer.config import TransferConfig
from splitserve.kv_transfer.layout import PoolDescriptor
from splitserve.kv_transfer.types import PeerName

logger = logging.getLogger(__name__)

Pump = Callable[[], None]


@dataclass(frozen=True)
class PoolSpec:
    shape: tuple[int, ...]
    dtype: str = "float32"
    device: str = "cpu"

    def make(self) -> torch.Tensor:
        return torch.empty(self.shape, dtype=getattr(torch, self.dtype), device=self.device)


def fill_pool(pool: torch.Tensor, seed: int) -> None:
    """Deterministic random contents, identical for the same shape, dtype and seed."""
    gen = torch.Generator().manual_seed(seed)
    pool.copy_(torch.randn(pool.shape, generator=gen).to(pool.dtype))


def pool_digest(pool: torch.Tensor, block_ids: Sequence[int]) -> str:
    """sha256 of the blocks' bytes, in the order given."""
    ids = torch.tensor(list(block_ids), dtype=torch.long, device=pool.device)
    data = pool.index_select(0, ids).contiguous().cpu()
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def is_untouched(pool: torch.Tensor, written_ids: Sequence[int], value: float) -> bool:
    keep = torch.ones(pool.shape[0], dtype=torch.bool, device=pool.device)
    keep[list(written_ids)] = False
    return bool((pool[keep] == value).all())


class PeerProcess:
    def __init__(self, config: TransferConfig, spec: PoolSpec, start_timeout_s: float = 60.0):
        ctx = mp.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, config, spec), daemon=True)
        self._proc.start()
        child_conn.close()
        self._next_id = 0
        # (kind, payload, perf_counter() in the child when it saw the event); on Linux
        # perf_counter is CLOCK_MONOTONIC, comparable across processes.
        self.events: list[tuple[str, Any, float]] = []
        self.last_event_time = 0.0
        self._replies: dict[int, tuple[bool, Any]] = {}
        try:
            ready = self._wait(lambda: -1 in self._replies, None, start_timeout_s, "start")
        except (TimeoutError, RuntimeError):
            self.kill()
            raise
        _, (metadata, descriptor_json) = ready
        self.metadata: bytes = metadata
        self.descriptor = PoolDescriptor.from_json(descriptor_json)

    @property
    def pid(self) -> int:
        if self._proc.pid is None:
            raise RuntimeError("peer process has not started")
        return self._proc.pid

    @property
    def name(self) -> PeerName:
        return PeerName(self.descriptor.agent_name)

    def call(
        self, command: str, *args: Any, pump: Pump | None = None, timeout_s: float = 60.0
    ) -> Any:
        self._next_id += 1
        cmd_id = self._next_id
        self._conn.send((cmd_id, command, args))
        ok, value = self._wait(
            lambda: cmd_id in self._replies, pump, timeout_s, command, reply_id=cmd_id
        )
        if not ok:
            raise RuntimeError(f"peer command {command} failed: {value}")
        return value

    def wait_event(
        self,
        kind: str,
        predicate: Callable[[Any], bool] = lambda _: True,
        pump: Pump | None = None,
        timeout_s: float = 60.0,
    ) -> Any:
        """Remove and return the first event of `kind` matching `predicate`."""

        def match() -> int | None:
            for i, (k, payload, _) in enumerate(self.events):
                if k == kind and predicate(payload):
                    return i
            return None

        self._wait(lambda: match() is not None, pump, timeout_s, f"event {kind}")
        index = match()
        if index is None:
            raise RuntimeError(f"event {kind} vanished")
        _, payload, self.last_event_time = self.events.pop(index)
        return payload

    def kill(self) -> None:
        """SIGKILL, as a crash would (no clean-up in the child)."""
        self._proc.kill()
        self._proc.join(10)

    def close(self) -> None:
        if self._proc.is_alive():
            try:
                self._conn.send((0, "close", ()))
            except (BrokenPipeError, OSError) as e:
                logger.debug("peer pipe already closed: %s", e)
            self._proc.join(10)
        if self._proc.is_alive():
            self.kill()
        self._conn.close()

    def _wait(
        self,
        done: Callable[[], bool],
        pump: Pump | None,
        timeout_s: float,
        what: str,
        reply_id: int = -1,
    ) -> tuple[bool, Any]:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"peer process: no {what} within {timeout_s} s")
            if pump is not None:
                pump()
            if self._conn.poll(0 if pump is not None else 0.01):
                self._receive()
            elif not self._proc.is_alive():
                raise RuntimeError(f"peer process died (exit code {self._proc.exitcode})")
        return self._replies.pop(reply_id, (True, None))

    def _receive(self) -> None:
        try:
            kind, key, value = self._conn.recv()
        except EOFError as e:
            raise RuntimeError(f"peer process exited (exit code {self._proc.exitcode})") from e
        if kind == "reply":
            self._replies[key] = (True, value)
        elif kind == "error":
            self._replies[key] = (False, value)
        else:
            self.events.append((key, *value))


def _child_main(conn: Connection, config: TransferConfig, spec: PoolSpec) -> None:
    logging.basicConfig(level=logging.WARNING, format="peer %(levelname)s %(name)s: %(message)s")
    if spec.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(spec.device))
    pool = spec.make()
    agent = TransferAgent(config, pool)
    tracker = ArrivalTracker(agent, config.arrival_timeout_s)
    conn.send(("reply", -1, (agent.metadata(), agent.pool_descriptor.to_json())))
    try:
        while True:
            for result in agent.poll():
                conn.send(("event", "pushed", (result, time.perf_counter())))
            for arrival in tracker.poll():
                conn.send(("event", "arrival", (arrival, time.perf_counter())))
            if not conn.poll(0 if agent.num_in_flight or tracker.num_expected else 0.0005):
                continue
            cmd_id, command, args = conn.recv()
            if command == "close":
                return
            try:
                conn.send(("reply", cmd_id, _run(command, args, agent, tracker, pool)))
            except (ValueError, RuntimeError) as e:
                conn.send(("error", cmd_id, f"{type(e).__name__}: {e}"))
    finally:
        agent.close()


def _run(
    command: str,
    args: tuple[Any, ...],
    agent: TransferAgent,
    tracker: ArrivalTracker,
    pool: torch.Tensor,
) -> Any:
    if command == "connect":
        return agent.connect(args[0], PoolDescriptor.from_json(args[1]))
    if command == "push":
        return agent.push(*args).push_id
    if command == "notify":
        return agent.send_notif(*args)
    if command == "expect":
        return tracker.expect(*args)
    if command == "forget":
        return tracker.forget(*args)
    if command == "fill":
        fill_pool(pool, args[0])
    elif command == "poison":
        pool.fill_(args[0])
    elif command == "snapshot":
        return pool.cpu().view(torch.uint8).numpy().tobytes()
    elif command == "digest":
        return pool_digest(pool, args[0])
    elif command == "untouched":
        return is_untouched(pool, args[0], args[1])
    else:
        raise ValueError(f"unknown peer command {command!r}")
    if pool.is_cuda:
        torch.cuda.synchronize(pool.device)
    return None
