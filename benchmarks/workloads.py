"""Synthetic workloads: what each session sends, before any timing is decided.

A workload is a list of `Session`s. A session is one or more `Turn`s sent in order; turn
k+1 is sent `think_time_s` after turn k's answer ends and resends the whole history
(previous prompts and the model's own answers). Single-turn workloads have one turn per
session. Arrival processes (`arrivals.py`) decide when sessions start.

Prompts are token-exact for the chosen tokenizer: random words are encoded, the ids cut to
the wanted length, and (for text prompts) decoded and re-checked so that the text encodes
to exactly that many tokens. With ``prompt_format="token-ids"`` the ids are sent as the
completions `prompt` and are exact by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np

from splitserve.benchmarks.tokenizer import WORDS, BenchTokenizer

LengthDist = Literal["fixed", "uniform", "normal"]
LENGTH_DISTS: tuple[str, ...] = get_args(LengthDist)
PromptFormat = Literal["text", "token-ids"]
PROMPT_FORMATS: tuple[str, ...] = get_args(PromptFormat)


@dataclass(frozen=True)
class Turn:
    text: str | None  # user message (chat) or prompt text (completions); None for token ids
    prompt_ids: tuple[int, ...] | None  # token-id prompt (completions only)
    max_tokens: int  # output tokens asked for
    num_prompt_tokens: int  # client-side token count of this turn's new content
    think_time_s: float = 0.0  # pause after the previous turn's answer before sending this one
    # Prompt tokens this turn shares by design with an earlier request of the same run (a
    # shared system prompt, a trace's repeated hash ids); what a prefix cache may serve.
    num_shared_prefix_tokens: int = 0


@dataclass(frozen=True)
class Session:
    session_id: str
    turns: tuple[Turn, ...]
    system: str | None = None  # shared system prompt (chat) / prompt prefix (completions)
    system_ids: tuple[int, ...] | None = None
    arrival_s: float | None = None  # trace timestamp (s after the first), when there is one


@dataclass(frozen=True)
class PromptSynth:
    """Makes token-exact prompts with one tokenizer; counts prompts that could not be exact."""

    tokenizer: BenchTokenizer
    prompt_format: PromptFormat = "text"

    def ids(self, length: int, rng: np.random.Generator) -> list[int]:
        """`length` token ids of random plain words."""
        ids: list[int] = []
        while len(ids) < length:
            words = rng.choice(len(WORDS), size=max(8, length - len(ids)))
            ids.extend(self.tokenizer.encode(" " + " ".join(WORDS[i] for i in words)))
        return ids[:length]

    def text(self, ids: list[int], rng: np.random.Generator) -> tuple[str, int]:
        """A text that encodes to len(ids) tokens (or as close as 4 corrections get)."""
        target = len(ids)
        current = list(ids)
        best = ("", -1)
        for _ in range(4):
            text = self.tokenizer.decode(current)
            count = len(self.tokenizer.encode(text))
            if best[1] < 0 or abs(count - target) < abs(best[1] - target):
                best = (text, count)
            if count == target:
                break
            if count > target:
                current = current[: len(current) - (count - target)]
            else:
                current = current + self.ids(target - count, rng)
        return best

    def make(
        self, length: int, rng: np.random.Generator
    ) -> tuple[str | None, tuple[int, ...] | None, int]:
        """(text, ids, token count) of a fresh random prompt in this synth's format."""
        ids = self.ids(length, rng)
        if self.prompt_format == "token-ids":
            return None, tuple(ids), len(ids)
        text, count = self.text(ids, rng)
        return text, None, count


def sample_lengths(
    mean: int, dist: LengthDist, spread: float, n: int, rng: np.random.Generator
) -> np.ndarray:
    """n integer lengths >= 1: fixed, uniform in [mean(1-s), mean(1+s)], or normal(mean, s*mean)."""
    if mean < 1:
        raise ValueError(f"lengths must be >= 1 token, got a mean of {mean}")
    if dist == "fixed":
        return np.full(n, mean, dtype=np.int64)
    if dist == "uniform":
        if not 0 <= spread < 1:
            raise ValueError(f"--length-spread for uniform lengths must be in [0, 1), got {spread}")
        low = max(1, round(mean * (1 - spread)))
        return rng.integers(low, round(mean * (1 + spread)) + 1, size=n)
    if dist == "normal":
        if spread < 0:
            raise ValueError(f"--length-spread for normal lengths must be >= 0, got {spread}")
        return np.maximum(1, np.rint(rng.normal(mean, spread * mean, size=n))).astype(np.int64)
    raise ValueError(f"--length-dist {dist!r}: choose one of {', '.join(LENGTH_DISTS)}")


def random_sessions(
    synth: PromptSynth,
    num: int,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    rng: np.random.Generator,
) -> list[Session]:
    """One single-turn session per request with the given prompt and output lengths."""
    sessions = []
    for i in range(num):
        text, ids, count = synth.make(int(input_lens[i]), rng)
        turn = Turn(text, ids, int(output_lens[i]), count)
        sessions.append(Session(f"r{i}", (turn,)))
    return sessions


def shared_prefix_sessions(
    synth: PromptSynth,
    num: int,
    num_prefixes: int,
    prefix_len: int,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    rng: np.random.Generator,
) -> list[Session]:
    """`num` requests over `num_prefixes` system prompts of `prefix_len` tokens, shuffled."""
    if num_prefixes < 1 or prefix_len < 1:
        raise ValueError(
            "--num-prefixes and --prefix-len must be >= 1 for --workload shared-prefix"
        )
    prefixes = [synth.make(prefix_len, rng) for _ in range(num_prefixes)]
    order = rng.permutation(num)
    sessions = []
    seen: set[int] = set()
    for i in range(num):
        which = int(order[i]) % num_prefixes
        p_text, p_ids, p_count = prefixes[which]
        text, ids, count = synth.make(int(input_lens[i]), rng)
        shared = p_count if which in seen else 0
        seen.add(which)
        turn = Turn(
            text, ids, int(output_lens[i]), p_count + count, num_shared_prefix_tokens=shared
        )
        sessions.append(Session(f"s{i}", (turn,), system=p_text, system_ids=p_ids))
    return sessions


def multi_turn_sessions(
    synth: PromptSynth,
    num: int,
    num_turns: int,
    think_time_s: float,
    input_lens: np.ndarray,
    output_lens: np.ndarray,
    rng: np.random.Generator,
) -> list[Session]:
    """`num` conversations of `num_turns` user turns each; input/output lens per turn."""
    if synth.prompt_format == "token-ids":
        raise ValueError("--workload multi-turn resends text history; use --prompt-format text")
    if num_turns < 1 or think_time_s < 0:
        raise ValueError("--num-turns must be >= 1 and --think-time-s >= 0")
    sessions = []
    for c in range(num):
        turns = []
        for t in range(num_turns):
            k = c * num_turns + t
            text, _, count = synth.make(int(input_lens[k]), rng)
            turns.append(Turn(text, None, int(output_lens[k]), count, think_time_s if t else 0.0))
        sessions.append(Session(f"c{c}", tuple(turns)))
    return sessions
