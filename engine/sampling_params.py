"""SamplingParams: what a request asks of the sampler, validated once at creation.

Torch-free: the router builds these (and their `GrammarSpec`) and sends them over gRPC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

# Bounds that keep one request from monopolising the engine or the sampler.
MAX_LOGPROBS = 20
MAX_N = 16
# OpenAI's range of a logit_bias value.
MAX_LOGIT_BIAS = 100.0
# Temperatures below this sample greedily (as vLLM has it): dividing by one would overflow
# float32 logits into inf and NaN, and argmax is the limit they approach.
GREEDY_BELOW_TEMPERATURE = 1e-5

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar"]
GRAMMAR_KINDS: tuple[str, ...] = get_args(GrammarKind)


@dataclass(frozen=True)
class GrammarSpec:
    """What constrains a request's output (engine/grammar.py compiles it with xgrammar).

    kind "json": `source` is a JSON schema (text); "json_object": any JSON object (`source`
    empty); "regex": a regular expression; "choice": a JSON array of the allowed strings;
    "grammar": an EBNF grammar (GBNF, as vLLM's `guided_grammar`) whose start rule is `root`.
    """

    kind: GrammarKind
    source: str = ""
    # "json": no properties beyond those the schema lists (OpenAI's `strict`, xgrammar's
    # strict mode, vLLM's default); False follows JSON Schema (additionalProperties: true).
    strict: bool = True

    def __post_init__(self) -> None:
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar kind must be one of {GRAMMAR_KINDS}, got {self.kind!r}")
        if self.kind != "json_object" and not self.source:
            raise ValueError(f"a {self.kind!r} grammar needs a non-empty source")


@dataclass(frozen=True)
class SamplingParams:
    # Completions per prompt.
    n: int = 1
    # 0 (or below GREEDY_BELOW_TEMPERATURE) means greedy.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 or -1 disables top-k.
    top_k: int = 0
    min_p: float = 0.0
    # Per-request seed: the same seed gives the same tokens whatever else is batched.
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    # None: up to the model's context.
    max_tokens: int | None = 16
    min_tokens: int = 0
    ignore_eos: bool = False
    # Number of top alternatives returned with each sampled token's log-probability;
    # None returns no log-probabilities at all.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Constrained decoding: every sampled token keeps the output inside this grammar.
    grammar: GrammarSpec | None = None
    # (token id, bias) pairs, by id (a {id: bias} dict is taken too), added to the logits
    # before penalties and sampling (OpenAI's logit_bias); log-probabilities stay those of
    # the unbiased logits, as in vLLM.
    logit_bias: tuple[tuple[int, float], ...] = ()
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        pairs = sorted((int(t), float(b)) for t, b in bias)
        object.__setattr__(self, "logit_bias", tuple(pairs))
        self._validate()

    def _validate(self) -> None:
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be between 1 and {MAX_N}, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or >= 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not -2 <= self.presence_penalty <= 2:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not -2 <= self.frequency_penalty <= 2:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative token ids")
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        token_ids = [t for t, _ in self.logit_bias]
        if any(t < 0 for t in token_ids) or len(set(token_ids)) != len(token_ids):
            raise ValueError("logit_bias keys must be distinct non-negative token ids")
        if not all(-MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for _, b in self.logit_bias):
            raise ValueError(
                f"logit_bias values must be between {-MAX_LOGIT_BIAS:g} and {MAX_LOGIT_BIAS:g}"
            )

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE
