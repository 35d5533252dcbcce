"""Builds the sessions of `--workload` from the CLI flags (seeded: one seed, one workload).

Every load point of a sweep (and every repeat) and every warm-up gets its own workload
seed, `draw_seed(--seed, stream, index)`, so no prompt is sent twice in one sweep and a
prefix-caching server serves from its cache only what the workload shares by design
(shared-prefix system prompts, a trace's repeated hash ids, a conversation's history).
ShareGPT prompts come from a file: points and warm-ups take disjoint slices of it.
`--reuse-prompts` brings back one workload for every point, warm-ups sending its first
prompts (the measured ones are then partly served from cache).
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

import numpy as np

from splitserve.benchmarks.datasets import mooncake_sessions, sharegpt_sessions
from splitserve.benchmarks.tokenizer import BenchTokenizer
from splitserve.benchmarks.workloads import (
    PromptSynth,
    Session,
    multi_turn_sessions,
    random_sessions,
    sample_lengths,
    shared_prefix_sessions,
)

DEFAULT_NUM_REQUESTS = 100
MEASURED_STREAM = 0  # draw_seed stream of the measured runs
WARMUP_STREAM = 1  # ... and of the warm-ups


def draw_seed(seed: int, stream: int, index: int) -> int:
    """The workload seed of one run (`index`: point x repeats + repeat) or its warm-up."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1)[0])


def build_sessions(
    args: argparse.Namespace,
    tokenizer: BenchTokenizer,
    seed: int | None = None,
    num: int | None = None,
    skip: int = 0,
) -> list[Session]:
    """The workload's sessions drawn with `seed` (default --seed): `num` of them (default
    --num-requests), after the first `skip` of a file's shuffled conversations (ShareGPT)."""
    seed = args.seed if seed is None else seed
    synth = PromptSynth(tokenizer, args.prompt_format)
    num = args.num_requests if num is None else num
    if num is not None and num < 1:
        raise ValueError(f"--num-requests must be >= 1, got {num}")
    if args.workload in ("sharegpt", "mooncake"):
        if not args.dataset:
            raise ValueError(f"--workload {args.workload} needs --dataset PATH")
        if args.workload == "sharegpt":
            return sharegpt_sessions(
                args.dataset, synth, num, args.sharegpt_turns, args.sharegpt_output_len,
                args.seed, skip,
            )  # fmt: skip
        unit_s = 1e-3 if args.trace_timestamp_unit == "ms" else 1.0
        return mooncake_sessions(args.dataset, synth, num, args.block_size, unit_s, seed)
    num = num or DEFAULT_NUM_REQUESTS
    rng = np.random.default_rng(seed)
    count = num * args.num_turns if args.workload == "multi-turn" else num
    ins = sample_lengths(args.input_len, args.length_dist, args.length_spread, count, rng)
    outs = sample_lengths(args.output_len, args.length_dist, args.length_spread, count, rng)
    if args.workload == "random":
        return random_sessions(synth, num, ins, outs, rng)
    if args.workload == "shared-prefix":
        return shared_prefix_sessions(
            synth, num, args.num_prefixes, args.prefix_len, ins, outs, rng
        )
    return multi_turn_sessions(synth, num, args.num_turns, args.think_time_s, ins, outs, rng)


def workload_section(args: argparse.Namespace, sessions: list[Session]) -> dict[str, Any]:
    """The `workload` section of a summary: the flags that shaped it and what came out."""
    turns = [t for s in sessions for t in s.turns]
    prompt = np.array([t.num_prompt_tokens for t in turns])
    output = np.array([t.max_tokens for t in turns])
    return {
        "kind": args.workload,
        "dataset": args.dataset,
        "prompt_format": args.prompt_format,
        "seed": args.seed,
        "reuse_prompts": getattr(args, "reuse_prompts", False),
        "num_sessions": len(sessions),
        "num_turns": len(turns),
        "turns_per_session": dict(Counter(len(s.turns) for s in sessions)),
        "num_shared_prefix_tokens": int(sum(t.num_shared_prefix_tokens for t in turns)),
        "prompt_tokens": {
            "mean": float(prompt.mean()),
            "min": int(prompt.min()),
            "max": int(prompt.max()),
        },
        "max_tokens": {
            "mean": float(output.mean()),
            "min": int(output.min()),
            "max": int(output.max()),
        },
        "flags": {
            k: getattr(args, k)
            for k in (
                "input_len",
                "output_len",
                "length_dist",
                "length_spread",
                "num_prefixes",
                "prefix_len",
                "num_turns",
                "think_time_s",
                "block_size",
                "sharegpt_turns",
            )
        },
    }
