"""Request and its lifecycle status, as the scheduler and block manager see them.

The lifecycle (docs/architecture.md): WAITING -> RUNNING -> FINISHED_*; a request whose
prompt KV comes from another node (engine/kv_connector.py) sits in WAITING_FOR_REMOTE_KV
until it lands; recompute preemption sends a RUNNING request back to PREEMPTED (waiting again).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import NewType

from splitserve.engine.hashing import BlockHash
from splitserve.engine.sampling_params import SamplingParams

RequestId = NewType("RequestId", str)

# Stands for a token sampled on the device and not yet read back (`num_pending_tokens`).
PENDING_TOKEN_ID = -1


class RequestStatus(enum.IntEnum):
    """Ordered: everything above PREEMPTED is finished."""

    WAITING = 0
    WAITING_FOR_REMOTE_KV = 1
    RUNNING = 2
    PREEMPTED = 3
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclass(eq=False)
class Request:
    """One sequence being generated (a prompt with n > 1 becomes n of these)."""

    request_id: RequestId
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    # Tokens the engine may generate at most (max_tokens capped by the context).
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the pool (computed here, hit in the prefix cache, or received).
    num_computed_tokens: int = 0
    # Prompt tokens this request found in the prefix cache (first admission).
    num_cached_tokens: int = 0
    # Prompt tokens this engine computed itself (what the nodes' stats report).
    num_prompt_tokens_computed: int = 0
    block_ids: list[int] = field(default_factory=list)
    # Tokens already sampled on the device but not yet appended (0 or 1): a step launched
    # ahead computes them (engine/overlap.py); they count in `num_tokens`.
    num_pending_tokens: int = 0
    # Hash chain of the request's full blocks, extended as blocks fill.
    block_hashes: list[BlockHash] = field(default_factory=list)
    # Leading blocks of block_ids already offered to the prefix cache.
    num_blocks_offered: int = 0
    num_preemptions: int = 0
    # Whether the first admission was counted in the prefix-cache statistics.
    is_prefix_recorded: bool = False
    # Take blocks for the whole prompt at admission (a transfer reads them as they fill).
    reserves_prompt: bool = False
    stop_reason: int | str | None = None
    # time.monotonic() of the first admission to the running batch, and of the first token.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending_tokens

    def add_output(self, token: int) -> None:
        """Append a sampled token (it takes the place of a pending one, if any)."""
        self.output_token_ids.append(token)
        if self.num_pending_tokens:
            self.num_pending_tokens -= 1

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole; a
        pending token reads as PENDING_TOKEN_ID."""
        num_known = len(self.prompt_token_ids) + len(self.output_token_ids)
        if end > num_known:
            known = self.token_ids_slice(start, num_known) if start < num_known else []
            return known + [PENDING_TOKEN_ID] * (end - max(start, num_known))
        num_prompt = len(self.prompt_token_ids)
        if end <= num_prompt:
            return self.prompt_token_ids[start:end]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt : end - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - num_prompt]
