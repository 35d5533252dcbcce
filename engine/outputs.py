"""What the engine hands back: per-request outputs, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenLogprob:
    """Log-probability of one sampled token and the top alternatives at its position.

    Log-probabilities are those of the model's raw distribution (log-softmax of the
    logits, before penalties, temperature or truncation), as the OpenAI API reports them.
    """

    token_id: int
    logprob: float
    # 1-based rank of the sampled token in the raw distribution.
    rank: int
    # (token_id, logprob) of the top alternatives, best first.
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    # The stop string or stop token id that ended generation, when one did.
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprob] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """One prompt's result. In streaming (delta) mode, text/token_ids hold only what is new."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    # Prompt tokens served from the prefix cache (or received from a prefill node).
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def num_tokens(out: RequestOutput) -> int:
    """Tokens `out` carries, its completions together (one per step and completion in a
    streamed delta)."""
    outputs = out.outputs
    if len(outputs) == 1:
        return len(outputs[0].token_ids)
    return sum(len(c.token_ids) for c in outputs)


def _merge_completion(a: CompletionOutput, b: CompletionOutput) -> CompletionOutput:
    logprobs = None
    if a.logprobs is not None or b.logprobs is not None:
        logprobs = (a.logprobs or []) + (b.logprobs or [])
    return CompletionOutput(
        a.index,
        a.text + b.text,
        a.token_ids + b.token_ids,
        b.finish_reason,
        b.stop_reason,
        logprobs,
    )


def merge_deltas(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One delta holding what `a` then `b` (two consecutive deltas of one request) hold.
    Completions keep the order they first appear in; the state (finished, cached tokens,
    metrics) is `b`'s, except `metrics["step_end_s"]`, which stays the oldest."""
    merged = {c.index: c for c in a.outputs}
    for comp in b.outputs:
        prev = merged.get(comp.index)
        merged[comp.index] = comp if prev is None else _merge_completion(prev, comp)
    metrics = dict(b.metrics)
    if "step_end_s" in a.metrics:
        metrics["step_end_s"] = a.metrics["step_end_s"]
    return RequestOutput(
        b.request_id,
        b.prompt,
        b.prompt_token_ids,
        list(merged.values()),
        b.finished,
        b.num_cached_tokens,
        metrics,
    )
