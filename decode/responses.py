"""Building `GenerateResponse` messages from the engine's RequestOutput deltas."""

from __future__ import annotations

import time

from splitserve.decode.remote_prefill import TransferMetrics
from splitserve.engine.outputs import CompletionOutput, RequestOutput, merge_deltas, num_tokens
from splitserve.protocol import node_pb2 as pb
from splitserve.protocol.messages import token_logprob_to_proto


def add_completion_delta(msg: pb.GenerateResponse, comp: CompletionOutput) -> None:
    """`comp` as one of `msg`'s deltas (built in place: no message copied)."""
    delta = msg.deltas.add(index=comp.index, token_ids=comp.token_ids, text=comp.text)
    if comp.logprobs:
        delta.logprobs.extend(token_logprob_to_proto(lp) for lp in comp.logprobs)
    if comp.finish_reason is not None:
        delta.finish_reason = comp.finish_reason
    if isinstance(comp.stop_reason, str):
        delta.stop_str = comp.stop_reason
    elif isinstance(comp.stop_reason, int):
        delta.stop_token_id = comp.stop_reason


def generate_response(
    out: RequestOutput,
    stream_options: pb.StreamOptions,
    num_prompt_tokens: int,
    num_completion_tokens: int,
    ttft_s: float | None = None,
    transfer: TransferMetrics | None = None,
    first_token_time: float | None = None,
    queue_time_s: float = 0.0,
) -> pb.GenerateResponse:
    """One stream message; usage on the final one (always: the router needs the counts)
    or on every one with continuous_usage_stats; metrics on the final one."""
    msg = pb.GenerateResponse(request_id=out.request_id, finished=out.finished)
    for comp in out.outputs:
        add_completion_delta(msg, comp)
    cached = out.num_cached_tokens
    if transfer is not None and transfer.is_prefill_remote:
        cached = max(cached, transfer.info.num_cached_tokens)
    if out.finished or stream_options.continuous_usage_stats:
        msg.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=num_prompt_tokens,
                cached_tokens=cached,
                completion_tokens=num_completion_tokens,
            )
        )
    if out.finished:
        metrics = pb.RequestMetrics(ttft_s=ttft_s or 0.0, queue_time_s=queue_time_s)
        if transfer is not None:
            metrics.transfer_time_s = transfer.transfer_time_s
            metrics.is_prefill_remote = transfer.is_prefill_remote
            metrics.is_prefill_fallback = transfer.is_prefill_fallback
            metrics.prefill_node_id = transfer.prefill_node_id
            metrics.num_remote_cached_tokens = transfer.info.num_cached_tokens
            metrics.prefill_queue_time_s = transfer.info.queue_time_s
            metrics.prefill_compute_time_s = transfer.info.compute_time_s
            metrics.push_tail_time_s = transfer.info.push_tail_time_s
            if transfer.is_prefill_remote and first_token_time is not None:
                metrics.admission_time_s = max(0.0, first_token_time - transfer.landed_at)
        msg.metrics.CopyFrom(metrics)
    return msg


def stamp_timing(msg: pb.GenerateResponse, out: RequestOutput) -> None:
    """Set `msg.timing` from the engine's stamps on `out`; sent_s is now."""
    msg.timing.step_end_s = out.metrics.get("step_end_s", 0.0)
    msg.timing.step_time_s = out.metrics.get("step_time_s", 0.0)
    msg.timing.sent_s = time.monotonic()


class DeltaBuffer:
    """Holds one request's deltas until `stream_interval` tokens have gathered, so that a
    node sends one message per that many tokens (SGLang's --stream-interval): the first
    tokens and the last message go at once, so TTFT and the end are unchanged."""

    def __init__(self, stream_interval: int) -> None:
        self.stream_interval = stream_interval
        self._pending: RequestOutput | None = None
        self._has_sent_tokens = False

    def add(self, out: RequestOutput) -> RequestOutput | None:
        """The delta to send now (everything held, merged), or None to wait."""
        pending = out if self._pending is None else merge_deltas(self._pending, out)
        num = num_tokens(pending)
        is_due = num >= self.stream_interval or (num and not self._has_sent_tokens)
        if not (pending.finished or is_due):
            self._pending = pending
            return None
        self._pending = None
        self._has_sent_tokens = self._has_sent_tokens or num > 0
        return pending
