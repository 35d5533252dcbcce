"""Scheduler: each step spends a token budget over running requests, then waiting ones.

One step (`schedule`):
1. Running requests in admission order get their next tokens (1 for a decode, the rest of
   the prompt or a chunk of it for a prefill in progress), capped by the remaining
   budget. When the pool has no blocks left, the most recently admitted running request is
   preempted (recompute: its blocks are freed and it goes back to the head of the queue).
2. If nothing was preempted, waiting requests are admitted FCFS while budget and
   `max_num_seqs` allow: each reuses its cached prefix and gets a first chunk. A request
   marked `reserves_prompt` (a prefill node's) takes blocks for its whole prompt at
   admission, so such requests never preempt one another (their blocks may be under
   transfer).

The engine runs the model on the chunks, then calls `advance` (KV now computed, full blocks
enter the prefix cache) and `finish` for requests that ended. For KV from another node
(engine/kv_connector.py), `admit_remote` allocates blocks for a prompt that node will
write, then `remote_kv_arrived` or `remote_kv_failed`; `finish(hold=True)` keeps a
request's blocks until `release_held` (a transfer may still read or write them).

No sockets or tensors here: the scheduler is tested with plain objects.
"""

from __future__ import annotations

import copy
import time
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from splitserve.engine.block_manager import NO_PREFIX, BlockManager, CachedPrefix
from splitserve.engine.config import SchedulerConfig
from splitserve.engine.request import Request, RequestId, RequestStatus


class ScheduledChunk(NamedTuple):
    request: Request
    # Tokens [start, start + num_new_tokens) of the request are computed this step.
    start: int
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the request's last known token (so it samples)."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class RemotePlan(NamedTuple):
    """Blocks a decode node allocated for a prompt whose KV comes from a prefill node."""

    block_ids: list[int]
    # Leading blocks already cached here: the prefill node need not send them.
    num_cached_blocks: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.remote: dict[RequestId, Request] = {}
        self.held: dict[RequestId, Request] = {}
        self.num_preemptions = 0
        # Prompt tokens computed here (not cached, not received), all requests together.
        self.num_prompt_tokens_computed = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.remote)

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self, skip: frozenset[RequestId] = frozenset()) -> SchedulerOutput:
        """The next step; running requests in `skip` (about to finish) get no chunk."""
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        idx = 0
        while idx < len(self.running) and budget > 0:
            request = self.running[idx]
            if request.request_id in skip:
                idx += 1
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if num_new <= 0:
                raise RuntimeError(f"running request {request.request_id} has nothing to compute")
            if not self._allocate_or_preempt(request, num_new, out.preempted):
                break
            out.chunks.append(ScheduledChunk(request, request.num_computed_tokens, num_new))
            budget -= num_new
            idx += 1
        if not out.preempted:
            self._admit_waiting(budget, out)
        return out

    def _allocate_or_preempt(
        self, request: Request, num_new: int, preempted: list[Request]
    ) -> bool:
        while not self.blocks.allocate_slots(request, num_new):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.blocks.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        bs = self.blocks.block_size
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            prefix = NO_PREFIX if request.block_ids else self.blocks.find_cached_prefix(request)
            num_computed = request.num_computed_tokens + prefix.num_tokens(bs)
            num_new = request.num_tokens - num_computed
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            # A request whose blocks a transfer reads as they fill (a prefill node's) reserves
            # its whole prompt at admission: it never needs a block later, so it is never
            # preempted while a push reads its blocks.
            num_reserved = request.num_tokens - num_computed if request.reserves_prompt else num_new
            if not self.blocks.allocate_slots(request, num_reserved, prefix):
                break
            self.waiting.popleft()
            self._record_prefix_hit(request, prefix)
            request.num_computed_tokens = num_computed
            request.status = RequestStatus.RUNNING
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(ScheduledChunk(request, num_computed, num_new))
            budget -= num_new

    def _record_prefix_hit(self, request: Request, prefix: CachedPrefix) -> None:
        """Count the first admission of a request in the prefix-cache statistics."""
        if request.is_prefix_recorded:
            return
        request.is_prefix_recorded = True
        request.num_cached_tokens = prefix.num_tokens(self.blocks.block_size)
        self.blocks.record_query(request.num_prompt_tokens, request.num_cached_tokens)

    def advance(self, out: SchedulerOutput) -> None:
        """The model computed every scheduled chunk: account the new KV."""
        for chunk in out.chunks:
            request = chunk.request
            request.num_computed_tokens += chunk.num_new_tokens
            prompt_end = min(chunk.start + chunk.num_new_tokens, request.num_prompt_tokens)
            num_prompt = max(0, prompt_end - chunk.start)
            request.num_prompt_tokens_computed += num_prompt
            self.num_prompt_tokens_computed += num_prompt
            self.blocks.cache_full_blocks(request)

    def finish(self, request: Request, status: RequestStatus, hold: bool = False) -> None:
        """End a request in any state; its blocks are freed, or held when `hold`."""
        if not status.is_finished:
            raise ValueError(f"finish needs a FINISHED_* status, got {status.name}")
        previous = request.status
        request.status = status
        if previous == RequestStatus.RUNNING:
            self.running.remove(request)
        elif previous == RequestStatus.WAITING_FOR_REMOTE_KV:
            del self.remote[request.request_id]
        elif previous in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        if hold and request.block_ids:
            self.held[request.request_id] = request
        else:
            self.blocks.free(request)

    def release_held(self, request_id: RequestId) -> bool:
        request = self.held.pop(request_id, None)
        if request is None:
            return False
        self.blocks.free(request)
        return True

    # Decode role: prompt KV written by a prefill node.

    def admit_remote(self, request: Request) -> RemotePlan | None:
        """Allocate every block of the prompt now; None when the pool is short."""
        prefix = self.blocks.find_cached_prefix(request)
        num_new = request.num_prompt_tokens - prefix.num_tokens(self.blocks.block_size)
        if not self.blocks.allocate_slots(request, num_new, prefix):
            return None
        self._record_prefix_hit(request, prefix)
        request.num_computed_tokens = prefix.num_tokens(self.blocks.block_size)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.remote[request.request_id] = request
        return RemotePlan(list(request.block_ids), len(prefix.block_ids))

    def remote_kv_arrived(self, request_id: RequestId) -> Request:
        """All prompt KV landed: the request joins the queue with its prompt computed."""
        request = self.remote.pop(request_id)
        request.num_computed_tokens = request.num_prompt_tokens
        self.blocks.cache_full_blocks(request)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return request

    def remote_kv_failed(self, request_id: RequestId) -> Request | None:
        """The transfer failed: prefill locally into fresh blocks. The blocks the prefill
        node was given are set aside under the request's id (in `held`) until the connector
        releases them: that node may resume and still write them, and a late write into a
        block the request is decoding into would corrupt its output. None when the request
        no longer waits for remote KV (it finished meanwhile)."""
        request = self.remote.pop(request_id, None)
        if request is None:
            return None
        aside = copy.copy(request)
        aside.block_ids = list(request.block_ids)
        self.held[request_id] = aside
        request.block_ids = []
        request.num_blocks_offered = 0
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return request

    def check_invariants(self) -> None:
        """Every block free, cached-free or owned, with refcounts matching the requests."""
        expected: dict[int, int] = {}
        live = [*self.running, *self.waiting, *self.remote.values(), *self.held.values()]
        for request in live:
            for block_id in request.block_ids:
                expected[block_id] = expected.get(block_id, 0) + 1
        self.blocks.pool.check_invariants(expected)
