"""Gathers a request's StepOutputs into RequestOutputs: cumulative (offline `LLM`) or
as deltas (streaming, `AsyncEngine`)."""

from __future__ import annotations

from splitserve.engine.core import StepOutput
from splitserve.engine.outputs import CompletionOutput, RequestOutput


class OutputCollector:
    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        n: int,
        cumulative: bool = True,
    ):
        """`cumulative=False` (streaming) keeps each completion's state, not its text and
        tokens so far: only the deltas are handed on."""
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.completions = [CompletionOutput(i, "", []) for i in range(n)]
        self.cumulative = cumulative
        self.num_cached_tokens = 0
        self.first_scheduled_time: float | None = None
        self._num_finished = 0

    @property
    def finished(self) -> bool:
        return self._num_finished == len(self.completions)

    def add(self, out: StepOutput) -> CompletionOutput:
        """Fold one step into the cumulative completion; returns the delta."""
        comp = self.completions[out.completion_index]
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.first_scheduled_time is not None:
            self.first_scheduled_time = out.first_scheduled_time
        if self.cumulative:
            comp.text += out.text_delta
            comp.token_ids.extend(out.new_token_ids)
            if out.new_logprobs is not None:
                comp.logprobs = (comp.logprobs or []) + out.new_logprobs
        self._num_finished += (out.finish_reason is not None) - (comp.finish_reason is not None)
        comp.finish_reason = out.finish_reason
        comp.stop_reason = out.stop_reason
        return CompletionOutput(
            out.completion_index,
            out.text_delta,
            list(out.new_token_ids),
            out.finish_reason,
            out.stop_reason,
            None if out.new_logprobs is None else list(out.new_logprobs),
        )

    def result(self) -> RequestOutput:
        return self.make(self.completions)

    def make(self, completions: list[CompletionOutput]) -> RequestOutput:
        """`metrics["first_scheduled_s"]`: when the request was first scheduled, once it was."""
        metrics = {}
        if self.first_scheduled_time is not None:
            metrics["first_scheduled_s"] = self.first_scheduled_time
        return RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_token_ids,
            completions,
            self.finished,
            self.num_cached_tokens,
            metrics,
        )
