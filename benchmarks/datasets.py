"""File-based workloads: ShareGPT-format JSON and Mooncake-style JSONL traces.

ShareGPT: a JSON list of ``{"conversations": [{"from": "human"|"gpt", "value": str}, ...]}``.
With ``turns="first"`` each conversation becomes one request (first human message; the
token count of the first gpt answer is the output length unless one is given). With
``turns="all"`` it becomes a multi-turn session of every human/gpt pair.

Mooncake: one JSON object per line with ``timestamp`` (ms since the first request),
``input_length``, ``output_length`` and ``hash_ids``. Each hash id stands for one block of
`block_size` tokens (512 in the Mooncake release). Block contents are drawn from a generator
seeded by (seed, hash id), so equal ids give equal blocks in every request, hence equal
prefixes. The prompt is the blocks concatenated and cut to `input_length`; when the ids
cover fewer than `input_length` tokens the rest is filled with request-unique tokens.
"""

from __future__ import annotations

import itertools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from splitserve.benchmarks.workloads import PromptSynth, Session, Turn

logger = logging.getLogger(__name__)

_ROLE_KEYS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


def _pairs(conversation: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(user, assistant) message pairs of a ShareGPT conversation, in order."""
    msgs = [
        (
            _ROLE_KEYS.get(str(m.get("from", m.get("role", "")))),
            str(m.get("value", m.get("content", ""))),
        )
        for m in conversation
    ]
    pairs = []
    for (role_a, text_a), (role_b, text_b) in itertools.pairwise(msgs):
        if role_a == "user" and role_b == "assistant" and text_a.strip():
            pairs.append((text_a, text_b))
    return pairs


def sharegpt_sessions(
    path: str,
    synth: PromptSynth,
    num: int | None,
    turns: str,
    output_len: int | None,
    seed: int,
    skip: int = 0,
) -> list[Session]:
    """Sessions from a ShareGPT JSON file shuffled with `seed`: at most `num` of them, after
    the first `skip` (earlier load points and warm-ups take disjoint slices; when the file
    runs out it starts over, with a warning, and prompts repeat)."""
    if turns not in ("first", "all"):
        raise ValueError(f"--sharegpt-turns {turns!r}: choose first or all")
    if synth.prompt_format != "text":
        raise ValueError("ShareGPT prompts are text; use --prompt-format text")
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} is not a ShareGPT JSON list of {{'conversations': [...]}}")
    rng = np.random.default_rng(seed)
    usable = []
    for i in rng.permutation(len(data)):
        pairs = _pairs(data[int(i)].get("conversations") or data[int(i)].get("conversation") or [])
        if pairs:
            usable.append((int(i), pairs[:1] if turns == "first" else pairs))
    if not usable:
        raise ValueError(f"{path} has no conversation with a human turn followed by a gpt turn")
    want = len(usable) if num is None else num
    if skip + want > len(usable):
        logger.warning(
            "%s: %d conversations, %d already sent by earlier points or warm-ups; prompts "
            "repeat from here and a prefix-caching server will serve them from its cache",
            path, len(usable), skip,
        )  # fmt: skip
    tok = synth.tokenizer
    sessions: list[Session] = []
    for k in range(skip, skip + want):
        i, pairs = usable[k % len(usable)]
        session_turns = tuple(
            Turn(user, None, output_len or max(1, len(tok.encode(answer))), len(tok.encode(user)))
            for user, answer in pairs
        )
        sessions.append(Session(f"g{i}", session_turns))
    return sessions


@dataclass
class MooncakeExpander:
    """Turns hash-id lists into token ids; equal hash ids always give equal blocks."""

    synth: PromptSynth
    block_size: int = 512
    seed: int = 0
    num_padded: int = 0  # requests whose hash ids covered fewer than input_length tokens
    num_truncated: int = 0  # requests whose hash ids covered a whole block too many
    _blocks: dict[int, list[int]] = field(default_factory=dict)

    def block(self, hash_id: int) -> list[int]:
        if hash_id not in self._blocks:
            rng = np.random.default_rng([self.seed, int(hash_id)])
            self._blocks[hash_id] = self.synth.ids(self.block_size, rng)
        return self._blocks[hash_id]

    def expand(self, hash_ids: list[int], input_length: int, request_index: int) -> list[int]:
        ids: list[int] = []
        for h in hash_ids:
            if len(ids) >= input_length:
                self.num_truncated += 1
                break
            ids.extend(self.block(h))
        if len(ids) < input_length:
            self.num_padded += 1
            rng = np.random.default_rng([self.seed, 1 << 40, request_index])
            ids.extend(self.synth.ids(input_length - len(ids), rng))
        return ids[:input_length]


def read_mooncake(path: str) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = {"timestamp", "input_length", "output_length", "hash_ids"} - row.keys()
        if missing:
            raise ValueError(
                f"{path}:{n} lacks {sorted(missing)}; each line needs "
                "timestamp, input_length, output_length, hash_ids"
            )
        rows.append(row)
    return rows


def _num_seen_blocks(hash_ids: list[int], seen: set[tuple[int, ...]]) -> int:
    """Leading blocks of this request that an earlier one had as its own prefix; records
    this request's prefixes in `seen`."""
    num_seen = 0
    for j in range(1, len(hash_ids) + 1):
        prefix = tuple(hash_ids[:j])
        if prefix in seen and num_seen == j - 1:
            num_seen = j
        seen.add(prefix)
    return num_seen


def mooncake_sessions(
    path: str,
    synth: PromptSynth,
    num: int | None,
    block_size: int,
    timestamp_unit_s: float,
    seed: int,
) -> list[Session]:
    """One session per trace line (the first `num`), with trace arrival times in seconds."""
    if block_size < 1:
        raise ValueError(f"--block-size must be >= 1 token, got {block_size}")
    rows = read_mooncake(path)[:num]
    if not rows:
        raise ValueError(f"{path} has no trace lines")
    expander = MooncakeExpander(synth, block_size, seed)
    t0 = min(float(r["timestamp"]) for r in rows)
    sessions = []
    seen: set[tuple[int, ...]] = set()
    for i, row in enumerate(rows):
        hash_ids = [int(h) for h in row["hash_ids"]]
        ids = expander.expand(hash_ids, int(row["input_length"]), i)
        shared = min(len(ids), _num_seen_blocks(hash_ids, seen) * block_size)
        if synth.prompt_format == "token-ids":
            turn = Turn(None, tuple(ids), int(row["output_length"]), len(ids), 0.0, shared)
        else:
            text = synth.tokenizer.decode(ids)
            count = len(synth.tokenizer.encode(text))
            turn = Turn(text, None, int(row["output_length"]), count, 0.0, shared)
        arrival = (float(row["timestamp"]) - t0) * timestamp_unit_s
        sessions.append(Session(f"m{i}", (turn,), arrival_s=arrival))
    if expander.num_padded or expander.num_truncated:
        logger.warning(
            "mooncake: %d requests had too few hash ids for their input_length (padded with "
            "unique tokens), %d had too many (cut); is --block-size %d right?",
            expander.num_padded,
            expander.num_truncated,
            block_size,
        )
    return sessions
