"""What the engine hands back: per-request outputs, in the shape vLLM users know."""

from __future__ import annotations

from dataclasses import dataclass


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
