"""Coalescing decode-node messages that queued up in the router.

When the router's event loop falls behind its node streams (many streams, a slow client),
several `GenerateResponse`s of one prompt wait in the `PromptStreams` mailbox. The handler
takes everything queued at once and merges each prompt's messages into one, so the client
gets one SSE frame (one chunk, every token in it) instead of a frame per token: catching
up costs one frame, not many. The merged message reads as if the node had sent it:
deltas concatenated per completion index, and the state (finished, usage, metrics) of the
last one. vLLM's server does the same with the outputs that queued up for a request.
"""

from __future__ import annotations

from typing import NamedTuple

from splitserve.protocol import node_pb2 as pb
from splitserve.router.errors import APIError


class StreamItem(NamedTuple):
    prompt_index: int
    message: pb.GenerateResponse | None
    error: APIError | None  # raised by the consumer
    # time.monotonic() when the router took the message off its node stream; 0: untimed.
    received_s: float = 0.0


def merge_responses(a: pb.GenerateResponse, b: pb.GenerateResponse) -> pb.GenerateResponse:
    """One message saying what `a` then `b` (consecutive messages of one stream) say."""
    out = pb.GenerateResponse()
    out.CopyFrom(a)
    by_index = {d.index: d for d in out.deltas}
    for delta in b.deltas:
        prev = by_index.get(delta.index)
        if prev is None:
            new = out.deltas.add()
            new.CopyFrom(delta)
            by_index[delta.index] = new
            continue
        prev.token_ids.extend(delta.token_ids)
        prev.text += delta.text
        prev.logprobs.extend(delta.logprobs)
        if delta.HasField("finish_reason"):
            prev.finish_reason = delta.finish_reason
        which = delta.WhichOneof("stop_reason")
        if which is not None:
            setattr(prev, which, getattr(delta, which))
    out.finished = b.finished
    for field in ("usage", "metrics"):
        if b.HasField(field):
            getattr(out, field).CopyFrom(getattr(b, field))
    return out


def coalesce(items: list[StreamItem]) -> list[StreamItem]:
    """Merge the messages of each prompt, in the order prompts first appear. An error item
    ends the list: what came before it is kept, what came after is moot."""
    merged: dict[int, StreamItem] = {}
    for item in items:
        if item.error is not None:
            return [*merged.values(), item]
        prev = merged.get(item.prompt_index)
        if prev is None or prev.message is None or item.message is None:
            merged[item.prompt_index] = item
        else:
            message = merge_responses(prev.message, item.message)
            merged[item.prompt_index] = prev._replace(message=message)
    return list(merged.values())
