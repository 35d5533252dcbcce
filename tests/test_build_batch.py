"""`build_batch` (engine/model_runner.py) against a per-token reference on random steps:
one-token chunks (decode rows) before prompt chunks that start anywhere in a request and
cross block boundaries, at several block sizes; every tensor and host list agrees."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
import torch

from splitserve.engine.model_runner import build_batch
from splitserve.engine.scheduler import ScheduledChunk


@dataclass
class _Request:
    """What build_batch reads of a request: its tokens, block ids and length."""

    token_ids: list[int]
    block_ids: list[int]
    num_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_tokens = len(self.token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        return self.token_ids[start:end]


def _reference(chunks: list[ScheduledChunk], block_size: int) -> dict[str, list]:
    """One token at a time: decode rows first, then the other chunks in their order."""
    rows = [c for c in chunks if c.num_new_tokens == 1]
    if len(rows) not in (0, len(chunks)):
        rows += [c for c in chunks if c.num_new_tokens != 1]
    else:
        rows = chunks
    ref: dict[str, list] = {"ids": [], "pos": [], "slots": [], "tables": [], "starts": [0]}
    last = {}
    for chunk in rows:
        request, start, num = chunk
        for p in range(start, start + num):
            ref["ids"].append(request.token_ids[p])
            ref["pos"].append(p)
            ref["slots"].append(request.block_ids[p // block_size] * block_size + p % block_size)
        ref["starts"].append(ref["starts"][-1] + num)
        last[id(chunk)] = ref["starts"][-1] - 1
    width = max(-(-(c.start + c.num_new_tokens) // block_size) for c in rows)
    for chunk in rows:
        ids = chunk.request.block_ids[:width]
        ref["tables"].append(ids + [-1] * (width - len(ids)))
    ref["sample"] = [last[id(c)] for c in chunks if c.samples]
    ref["seq_lens"] = [c.start + c.num_new_tokens for c in rows]
    return ref


def _random_step(rng: random.Random, block_size: int) -> list[ScheduledChunk]:
    chunks = []
    for _ in range(rng.randint(1, 10)):
        length = rng.randint(1, 200)
        blocks = rng.sample(range(10_000), -(-length // block_size) + rng.randint(0, 2))
        request = _Request([rng.randrange(50_000) for _ in range(length)], blocks)
        if rng.random() < 0.5:
            chunks.append(ScheduledChunk(request, length - 1, 1))  # type: ignore[arg-type]
        else:
            start = rng.randrange(length)
            num = rng.randint(1, length - start)
            chunks.append(ScheduledChunk(request, start, num))  # type: ignore[arg-type]
    return chunks


@pytest.mark.parametrize("block_size", [1, 4, 16, 32])
def test_build_batch_matches_a_per_token_reference(block_size: int) -> None:
    rng = random.Random(block_size)
    for _ in range(60):
        chunks = _random_step(rng, block_size)
        batch = build_batch(chunks, block_size, torch.device("cpu"))
        ref = _reference(chunks, block_size)
        meta = batch.meta
        assert batch.input_ids.dtype == batch.positions.dtype == torch.int64
        assert batch.input_ids.tolist() == ref["ids"]
        assert batch.positions.tolist() == ref["pos"]
        assert meta.slot_mapping.dtype == torch.int64
        assert meta.slot_mapping.tolist() == ref["slots"]
        assert meta.block_tables.dtype == torch.int32
        assert meta.block_tables.tolist() == ref["tables"]
        assert meta.query_start_loc.tolist() == ref["starts"]
        assert batch.logits_indices.tolist() == ref["sample"]
        assert meta.seq_lens.tolist() == meta.seq_lens_cpu == ref["seq_lens"]
        assert meta.num_decodes == sum(c.num_new_tokens == 1 for c in chunks)
