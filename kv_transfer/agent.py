"""A node's NIXL agent: registers its KV pool and pushes block runs into peers' pools.

Who calls what, in order:

1. Every node: ``agent = TransferAgent(config, kv_pool)`` registers the pool (DRAM or VRAM
   by the tensor's device) and publishes ``agent.metadata()`` (bytes) and
   ``agent.pool_descriptor.to_json()`` to its peers (gRPC `TransferMetadata`).
2. Prefill node, once per decode node: ``peer = agent.connect(metadata, descriptor)``
   (cached; a peer that restarted with new metadata is reconnected). A peer whose
   descriptor carries another KV compatibility hash (kv_transfer/compat.py) is refused
   with IncompatiblePeer before its metadata is loaded.
3. Prefill node, after each prefill chunk: ``agent.push(peer, src_ids, dst_ids,
   encode_tag(request_id, chunk_idx, is_last))`` WRITEs the chunk's blocks into the blocks
   the decode node allocated, coalesced into runs, and NIXL notifies the decode node with
   the tag once the bytes have landed. Many pushes may be in flight.
4. Prefill node, every loop turn: ``agent.poll()`` drives progress and returns the pushes
   that finished (`PushResult`, ok or failed: error, timeout, peer gone). Never blocks.
5. Decode node, every loop turn (idle too: connection set-up needs it):
   ``ArrivalTracker.poll()``, which reads this agent's notifications (`get_notifs`).
6. ``agent.disconnect(peer)`` when a peer leaves (fails its in-flight pushes);
   ``agent.close()`` at shutdown.

With the progress thread off (the CPU default) nothing moves unless both sides poll.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from splitserve.kv_transfer.compat import IncompatiblePeer
from splitserve.kv_transfer.config import TransferConfig, import_nixl
from splitserve.kv_transfer.layout import (
    PoolDescriptor,
    check_block_ids,
    coalesce_runs,
    describe_pool,
    run_descs,
    split_runs,
)
from splitserve.kv_transfer.tags import decode_tag
from splitserve.kv_transfer.types import Notification, PeerName, PushHandle, PushResult

logger = logging.getLogger(__name__)


@dataclass
class _InFlight:
    handle: PushHandle
    xfer: Any
    started: float
    deadline: float


@dataclass(frozen=True)
class _Peer:
    pool: PoolDescriptor
    metadata: bytes


class TransferAgent:
    def __init__(self, config: TransferConfig, pool: torch.Tensor) -> None:
        nixl_api, self._errors = import_nixl(config.debug)
        self.config = config
        self._pool = pool
        self._desc = describe_pool(pool, config.agent_name, config.compat_hash)
        is_gpu = self._desc.mem_type == "VRAM"
        nixl_conf = nixl_api.nixl_agent_config(
            enable_prog_thread=config.use_progress_thread(is_gpu), backends=[]
        )
        with torch.cuda.device(pool.device) if is_gpu else contextlib.nullcontext():
            self._agent = nixl_api.nixl_agent(config.agent_name, nixl_conf)
            plugins = self._agent.get_plugin_list()
            if config.backend not in plugins:
                raise ValueError(
                    f"NIXL backend {config.backend!r} is not available; installed: {plugins}"
                )
            self._agent.create_backend(config.backend, config.backend_params())
            region = [(self._desc.base_addr, self._desc.total_bytes, self._desc.device_id, "")]
            self._reg = self._agent.register_memory(
                region, self._desc.mem_type, backends=[config.backend]
            )
        self._peers: dict[PeerName, _Peer] = {}
        self._in_flight: dict[int, _InFlight] = {}
        self._finished: list[PushResult] = []
        self._unreleased: list[Any] = []
        self._push_ids = itertools.count()
        self._closed = False
        logger.info("NIXL agent %s registered its KV pool: %s", config.agent_name, self._desc)

    @property
    def name(self) -> PeerName:
        return PeerName(self.config.agent_name)

    @property
    def pool_descriptor(self) -> PoolDescriptor:
        return self._desc

    @property
    def peers(self) -> list[PeerName]:
        return list(self._peers)

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    def metadata(self) -> bytes:
        """This agent's NIXL metadata, for peers' `connect`."""
        return bytes(self._live().get_agent_metadata())

    def connect(self, peer_metadata: bytes, peer_pool: PoolDescriptor) -> PeerName:
        """Load a peer's metadata once (cached by name) so that `push` can target it."""
        agent = self._live()
        peer = PeerName(peer_pool.agent_name)
        known = self._peers.get(peer)
        if known is not None:
            if known.metadata == peer_metadata and known.pool == peer_pool:
                return peer
            logger.info("KV peer %s came back with new metadata; reconnecting", peer)
            self.disconnect(peer)
        if peer == self.name:
            raise ValueError(f"agent {peer!r} cannot connect to itself; give nodes unique names")
        self._check_compatible(peer, peer_pool)
        if peer_pool.block_bytes != self._desc.block_bytes:
            raise ValueError(
                f"peer {peer!r} has {peer_pool.block_bytes}-byte KV blocks, this node "
                f"{self._desc.block_bytes}: both nodes must run the same model, dtype and "
                "block size"
            )
        loaded = agent.add_remote_agent(peer_metadata)
        name = loaded.decode() if isinstance(loaded, bytes) else str(loaded)
        if name != peer:
            agent.remove_remote_agent(name)
            raise ValueError(
                f"peer metadata belongs to agent {name!r} but its pool descriptor names "
                f"{peer!r}; pass the metadata and descriptor of the same node"
            )
        self._peers[peer] = _Peer(peer_pool, bytes(peer_metadata))
        logger.info(
            "connected KV peer %s (%s, %d blocks)", peer, peer_pool.mem_type, peer_pool.num_blocks
        )
        return peer

    def _check_compatible(self, peer: PeerName, peer_pool: PoolDescriptor) -> None:
        """IncompatiblePeer unless the peer's KV compatibility hash equals this node's."""
        if peer_pool.compat_hash == self._desc.compat_hash:
            return
        theirs, ours = (
            peer_pool.compat_hash[:16] or "(none)",
            self._desc.compat_hash[:16] or "(none)",
        )
        logger.warning(
            "refused KV peer %s: compatibility hash %s, this node %s", peer, theirs, ours
        )
        raise IncompatiblePeer(
            f"KV peer {peer!r} is not compatible with this node (compatibility hash {theirs} "
            f"vs {ours}; this node: {self.config.compat_summary or 'no hash'}): run both nodes "
            "with the same model, --served-model-name, --dtype and --block-size"
        )

    def disconnect(self, peer: PeerName) -> None:
        """Forget a peer; its in-flight pushes are reported failed by the next poll()."""
        if peer not in self._peers:
            return
        now = time.perf_counter()
        for push_id, f in list(self._in_flight.items()):
            if f.handle.peer == peer:
                del self._in_flight[push_id]
                self._finish(f, f"peer {peer} disconnected", now)
        del self._peers[peer]
        try:
            self._live().remove_remote_agent(peer)
        except self._errors as e:
            logger.warning("removing NIXL peer %s failed: %s", peer, e)

    def push(
        self,
        peer: PeerName,
        src_block_ids: Sequence[int],
        dst_block_ids: Sequence[int],
        tag: str,
        timeout_s: float | None = None,
    ) -> PushHandle:
        """Start writing local blocks `src_block_ids` into the peer's `dst_block_ids`.

        Raises ValueError for caller errors (unknown peer, bad ids or tag); transfer
        failures are reported by poll() as a failed PushResult, never raised.
        """
        agent = self._live()
        remote = self._peers.get(peer)
        if remote is None:
            raise ValueError(f"KV peer {peer!r} is not connected; call connect() first")
        request_id = decode_tag(tag).request_id
        if timeout_s is not None and timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        check_block_ids(src_block_ids, self._desc.num_blocks, "source")
        check_block_ids(dst_block_ids, remote.pool.num_blocks, "destination", is_unique=True)
        runs = split_runs(
            coalesce_runs(src_block_ids, dst_block_ids),
            self.config.max_descriptor_blocks(self._desc.block_bytes),
        )
        num_bytes = len(src_block_ids) * self._desc.block_bytes
        handle = PushHandle(next(self._push_ids), peer, tag, request_id, num_bytes, len(runs))
        started = time.perf_counter()
        deadline = started + (timeout_s if timeout_s is not None else self.config.push_timeout_s)
        if not runs:
            self._notify_only(handle, started)
            return handle
        if self._pool.is_cuda and self.config.sync_cuda_before_push:
            torch.cuda.current_stream(self._pool.device).synchronize()
        xfer = None
        try:
            xfer = agent.initialize_xfer(
                "WRITE",
                agent.get_xfer_descs(run_descs(runs, self._desc, "src"), self._desc.mem_type),
                agent.get_xfer_descs(run_descs(runs, remote.pool, "dst"), remote.pool.mem_type),
                peer,
                tag.encode(),
            )
            state = agent.transfer(xfer)
        except self._errors as e:
            self._finish(_InFlight(handle, xfer, started, deadline), _describe(e), started)
            return handle
        f = _InFlight(handle, xfer, started, deadline)
        if state == "PROC":
            self._in_flight[handle.push_id] = f
        else:
            error = None if state == "DONE" else "transfer post failed"
            self._finish(f, error, time.perf_counter())
        return handle

    def poll(self) -> list[PushResult]:
        """Drive progress; return the pushes that finished since the last call."""
        agent = self._live()
        now = time.perf_counter()
        for push_id, f in list(self._in_flight.items()):
            try:
                state = agent.check_xfer_state(f.xfer)
                error = None if state in ("DONE", "PROC") else "transfer failed"
            except self._errors as e:
                state, error = "ERR", _describe(e)
            if state == "PROC" and now > f.deadline:
                error = f"timed out after {f.deadline - f.started:.3g} s"
            if state != "PROC" or error is not None:
                del self._in_flight[push_id]
                self._finish(f, error, time.perf_counter())
        self._retry_release()
        results, self._finished = self._finished, []
        return results

    def get_notifs(self) -> list[Notification]:
        """Notifications received since the last call (receiver side; drives progress)."""
        raw = self._live().get_new_notifs()
        return [
            Notification(PeerName(k.decode() if isinstance(k, bytes) else k), bytes(m))
            for k, messages in raw.items()
            for m in messages
        ]

    def send_notif(self, peer: PeerName, message: str) -> None:
        """A notification with no transfer attached."""
        if peer not in self._peers:
            raise ValueError(f"KV peer {peer!r} is not connected; call connect() first")
        self._live().send_notif(peer, message.encode())

    def close(self) -> None:
        """Fail in-flight pushes, drop peers, deregister the pool. Idempotent."""
        if self._closed:
            return
        now = time.perf_counter()
        for f in self._in_flight.values():
            self._finish(f, "transfer agent closed", now)
        self._in_flight.clear()
        for peer in list(self._peers):
            self.disconnect(peer)
        self._retry_release()
        if self._unreleased:
            logger.error("%d NIXL transfer handles could not be released", len(self._unreleased))
        self._agent.deregister_memory(self._reg, backends=[self.config.backend])
        self._closed = True
        self._agent = None

    def __enter__(self) -> TransferAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _live(self) -> Any:
        if self._closed:
            raise RuntimeError(f"transfer agent {self.config.agent_name} is closed")
        return self._agent

    def _notify_only(self, handle: PushHandle, started: float) -> None:
        """A chunk with no blocks still counts: send its tag alone."""
        f = _InFlight(handle, None, started, started)
        try:
            self._agent.send_notif(handle.peer, handle.tag.encode())
        except self._errors as e:
            self._finish(f, _describe(e), started)
            return
        self._finish(f, None, time.perf_counter())

    def _finish(self, f: _InFlight, error: str | None, now: float) -> None:
        h = f.handle
        if f.xfer is not None:
            self._release(f.xfer)
        if error is not None:
            logger.warning("KV push %r to %s failed: %s", h.tag, h.peer, error)
        ok = error is None
        self._finished.append(PushResult(*h[:4], ok, error, h.num_bytes, now - f.started))

    def _release(self, xfer: Any) -> None:
        try:
            xfer.release()
        except self._errors as e:
            logger.warning("NIXL transfer handle not released yet (%s); will retry", e)
            self._unreleased.append(xfer)

    def _retry_release(self) -> None:
        pending, self._unreleased = self._unreleased, []
        for xfer in pending:
            try:
                xfer.release()
            except self._errors:
                self._unreleased.append(xfer)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"
