"""KVConnector: the engine's one interface to KV that crosses the node's boundary.

Modelled on the scheduler side of vLLM v1's `KVConnectorBase_V1`, adapted to push
transfers (the prefill node WRITEs into blocks the decode node allocated first). The
engine knows no roles: a node with no connector is aggregated, a prefill node installs
`prefill/connector.py`, a decode node `decode/remote_prefill.py`; later ones (CPU offload,
pull transfers) implement the same hooks. All hooks run on the engine thread.

What the engine calls, in order, for one request:

    on_admission(request_id, kv_params) -> bool
        in `add_request`, after validation: whether the prompt's KV arrives from another
        node (`kv_params` is what the caller passed, opaque to the engine). When True, the
        engine allocates the prompt's blocks (reusing its own cached prefix) and calls
    on_remote_plan(request_id, plan | None)
        the blocks to fill (`RemotePlan`: how many leading blocks are cached here, so how
        many prompt tokens arrive remotely); None when the pool is short right now, and
        the engine then computes the prompt itself.
    on_blocks_final(FinalBlocks)
        after a step, for the prompt blocks whose KV that step made final (the last report
        of a prompt carries its first sampled token).
    on_finish(request_id) -> bool
        the request ended (any reason): True delays freeing its blocks until a later
        `poll` names the request in `released` (a transfer may still read or write them).
    poll() -> KVEvents
        before every step and while idle: remote KV that arrived (the request joins the
        batch with the first token the other node sampled), transfers that failed (the
        engine computes the prompt itself, into fresh blocks, and holds the ones the other
        node was given under the request's id until a later `released` names it), requests
        to abort, and held blocks that may go now.

Class attributes say what the node kind needs of the engine: `max_new_tokens` caps what a
request generates here (a prefill node samples one token), `reserves_prompt` makes
admission allocate the whole prompt at once (blocks under transfer are never preempted),
`supports_overlap` is False when blocks must be reported as each step ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from splitserve.engine.intake import Sequence
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.request import RequestId
from splitserve.engine.sampler import SamplerOutput
from splitserve.engine.scheduler import RemotePlan, ScheduledChunk


class FinalBlocks(NamedTuple):
    """Blocks of a request's prompt whose KV is final after this step."""

    request_id: str
    # Block ids in the pool, and the index of the first one within the request.
    block_ids: list[int]
    first_block_index: int
    is_last: bool
    # Set with the last report of the prompt.
    first_token_id: int | None
    first_logprob: TokenLogprob | None
    # Prompt tokens found in this engine's prefix cache.
    num_cached_tokens: int = 0
    # Seconds the request waited before its first chunk was scheduled.
    queue_time_s: float = 0.0


class RemoteKV(NamedTuple):
    """Every block of a request's prompt landed; the other node sampled its first token."""

    request_id: str
    first_token_id: int
    first_logprob: TokenLogprob | None


@dataclass
class KVEvents:
    """What one `poll` found. The engine applies aborts, then releases, then failures,
    then arrivals."""

    arrived: list[RemoteKV] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    to_abort: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    # Transfers still in flight: the idle engine polls again soon.
    is_busy: bool = False


class KVConnector(Protocol):
    max_new_tokens: int | None
    reserves_prompt: bool
    supports_overlap: bool

    def on_admission(self, request_id: str, kv_params: object | None) -> bool: ...

    def on_remote_plan(self, request_id: str, plan: RemotePlan | None) -> None: ...

    def on_blocks_final(self, blocks: FinalBlocks) -> None: ...

    def on_finish(self, request_id: str) -> bool: ...

    def poll(self) -> KVEvents: ...


def final_blocks(
    chunk: ScheduledChunk,
    seq: Sequence,
    first: tuple[int, TokenLogprob | None] | None,
    block_size: int,
) -> FinalBlocks | None:
    """The prompt blocks `chunk` made final and not yet reported (None: nothing new). A
    prompt's last block is final once the whole prompt is computed, full or not."""
    req = chunk.request
    if seq.is_prompt_reported or chunk.start >= req.num_prompt_tokens:
        return None  # reported before, or arrived from another node
    end = min(chunk.start + chunk.num_new_tokens, req.num_prompt_tokens)
    is_last = end == req.num_prompt_tokens
    upto = -(-end // block_size) if is_last else end // block_size
    if upto <= seq.num_blocks_reported and not is_last:
        return None
    report = FinalBlocks(
        seq.parent_id,
        req.block_ids[seq.num_blocks_reported : upto],
        seq.num_blocks_reported,
        is_last,
        None if first is None else first[0],
        None if first is None else first[1],
        req.num_cached_tokens,
        (req.first_scheduled_time or req.arrival_time) - req.arrival_time,
    )
    seq.num_blocks_reported = upto
    seq.is_prompt_reported = is_last
    return report


def first_tokens(
    sampling: list[ScheduledChunk], result: SamplerOutput
) -> dict[RequestId, tuple[int, TokenLogprob | None]]:
    """The tokens sampled for requests with no output yet (read before appending)."""
    sampled = zip(sampling, result.token_ids, result.logprobs, strict=True)
    return {
        chunk.request.request_id: (token, logprob)
        for chunk, token, logprob in sampled
        if not chunk.request.output_token_ids
    }


def report_final_blocks(
    connector: KVConnector,
    chunks: list[ScheduledChunk],
    sequences: dict[RequestId, Sequence],
    firsts: dict[RequestId, tuple[int, TokenLogprob | None]],
    block_size: int,
) -> None:
    """Hand the connector the prompt blocks this step made final."""
    for chunk in chunks:
        rid = chunk.request.request_id
        report = final_blocks(chunk, sequences[rid], firsts.get(rid), block_size)
        if report is not None:
            connector.on_blocks_final(report)


def overlap_with(connector: KVConnector, overlap: bool, requested: bool | None) -> bool:
    """Whether the engine overlaps output processing under `connector`; ValueError when
    overlap was asked for explicitly and the connector cannot have it."""
    if not overlap or connector.supports_overlap:
        return overlap
    if requested:
        raise ValueError(
            f"overlap_output_processing does not apply with {type(connector).__name__} "
            "(it reports blocks as each step ends); leave it unset or false"
        )
    return False
