"""Output processing: append sampled tokens, detokenize, check stops, make StepOutputs.

EngineCore calls, per sampled token: `add_token` (appends it, advances the sequence's
grammar matcher; returns the status its id alone ends the request with: eos, a stop token
id, a grammar that terminated, or a token the grammar refuses), then `emit` (detokenizes,
checks stop strings and length, finishes the request through the `finish` callback it was
built with, and returns the StepOutput); `append` does both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from splitserve.engine.grammar import advance
from splitserve.engine.intake import Sequence
from splitserve.engine.outputs import TokenLogprob
from splitserve.engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


class StepOutput(NamedTuple):
    """What one step produced for one sequence of a request."""

    request_id: str
    # Which of the request's n completions this is.
    completion_index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    text_delta: str
    finish_reason: str | None
    stop_reason: int | str | None
    # Prompt tokens of this sequence served from the prefix cache (or received).
    num_cached_tokens: int = 0
    # time.monotonic() when the request was first scheduled; None before that (a first
    # token received with remote KV).
    first_scheduled_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class OutputProcessor:
    def __init__(self, finish: Callable[[Sequence, RequestStatus], None]) -> None:
        self.finish = finish
        self.num_generation_tokens = 0

    def append(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> StepOutput:
        return self.emit(seq, token, logprob, self.add_token(seq, token))

    def add_token(self, seq: Sequence, token: int) -> RequestStatus | None:
        """Append a sampled token; the status it ends the request with by its id alone
        (eos, stop token); stop strings and length are checked in `emit`."""
        req = seq.request
        req.add_output(token)
        self.num_generation_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        status = _token_stop_status(req, token)
        if seq.grammar is not None:
            return _grammar_status(seq, token) or status
        return status

    def emit(
        self,
        seq: Sequence,
        token: int,
        logprob: TokenLogprob | None,
        status: RequestStatus | None,
    ) -> StepOutput:
        """Detokenize the token, check stop strings and length, finish the request if it
        ended. `status` is what `add_token` returned for the token."""
        req = seq.request
        if status is None or req.sampling_params.include_stop_str_in_output:
            delta = seq.detokenizer.step([token])
            text, stop_str = delta.text_delta, delta.stop_str
        else:
            text, stop_str = "", None  # a stop token's text is not part of the output
        if status is None and stop_str is not None:
            req.stop_reason = stop_str
            status = RequestStatus.FINISHED_STOPPED
        if status is None and req.num_output_tokens >= req.max_new_tokens:
            status = RequestStatus.FINISHED_LENGTH
        if status is not None:
            if stop_str is None:
                text += seq.detokenizer.flush()
            self.finish(seq, status)
        return StepOutput(
            seq.parent_id,
            seq.index,
            [token],
            None if logprob is None else [logprob],
            text,
            req.status.finish_reason,
            req.stop_reason,
            req.num_cached_tokens,
            req.first_scheduled_time,
        )


def _grammar_status(seq: Sequence, token: int) -> RequestStatus | None:
    """Advance the grammar: a grammar that terminated ends the request ("stop"); a token it
    refuses (only a first token sampled elsewhere without the grammar can be one) is an error."""
    state = advance(seq.grammar, token)
    if state is None:
        return None
    if state:
        return RequestStatus.FINISHED_STOPPED
    logger.error(
        "request %s: token %d breaks its grammar (was the first token sampled without it?)",
        seq.request.request_id,
        token,
    )
    return RequestStatus.FINISHED_ERROR


def _token_stop_status(req: Request, token: int) -> RequestStatus | None:
    """EOS (unless ignore_eos) and stop token ids end a request once min_tokens is met."""
    params = req.sampling_params
    if req.num_output_tokens < params.min_tokens:
        return None
    if token in req.eos_token_ids and not params.ignore_eos:
        return RequestStatus.FINISHED_STOPPED
    if token in params.stop_token_ids:
        req.stop_reason = token
        return RequestStatus.FINISHED_STOPPED
    return None
