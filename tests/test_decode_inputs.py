"""The static decode inputs a CUDA graph reads hold, row for row, what `build_batch` builds
for the same one-token chunks, across steps that grow, reorder, shrink and preempt the
batch; the padding rows neither store nor read KV."""

from __future__ import annotations

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from splitserve.engine.cuda_graphs import graph_batch_sizes
from splitserve.engine.decode_inputs import StaticDecodeInputs
from splitserve.engine.model_runner import build_batch
from splitserve.engine.request import Request, RequestId
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import ScheduledChunk

BLOCK = 4
MAX_SEQ = 40


def make_request(rng: random.Random, index: int, prompt_len: int) -> Request:
    request = Request(
        request_id=RequestId(f"r{index}"),
        prompt_token_ids=[rng.randrange(1000) for _ in range(prompt_len)],
        sampling_params=SamplingParams(),
        max_new_tokens=100,
    )
    request.block_ids = rng.sample(range(500), -(-prompt_len // BLOCK))
    return request


def decode_chunk(request: Request) -> ScheduledChunk:
    """The chunk of a request whose last token is not computed yet."""
    start = request.num_tokens - 1
    while len(request.block_ids) * BLOCK < start + 1:
        request.block_ids.append(500 + len(request.block_ids) + 7 * int(request.request_id[1:]))
    return ScheduledChunk(request, start, 1)


def check_matches(inputs: StaticDecodeInputs, chunks: list[ScheduledChunk], padded: int) -> None:
    ref = build_batch(chunks, BLOCK, torch.device("cpu"))
    n = len(chunks)
    assert inputs.input_ids[:n].tolist() == ref.input_ids.tolist()
    assert inputs.positions[:n].tolist() == ref.positions.tolist()
    assert inputs.slot_mapping[:n].tolist() == ref.meta.slot_mapping.tolist()
    assert inputs.seq_lens[:n].tolist() == ref.meta.seq_lens.tolist()
    for row, seq_len in enumerate(ref.meta.seq_lens_cpu):
        used = -(-seq_len // BLOCK)
        want = ref.meta.block_tables[row, :used].tolist()
        assert inputs.block_tables[row, :used].tolist() == want
    assert inputs.slot_mapping[n:padded].tolist() == [-1] * (padded - n)
    assert inputs.seq_lens[n:padded].tolist() == [0] * (padded - n)


def test_rows_match_build_batch_over_steps_with_reorder_and_preemption() -> None:
    rng = random.Random(0)
    inputs = StaticDecodeInputs(16, MAX_SEQ, BLOCK, torch.device("cpu"))
    requests = [make_request(rng, i, rng.randint(1, 20)) for i in range(12)]
    sizes = graph_batch_sizes(16)
    for step in range(30):
        batch = rng.sample(requests, rng.randint(1, len(requests)))
        if step % 7 == 3:
            # Preemption: the block manager replaces the list; new blocks come back.
            victim = batch[0]
            victim.block_ids = []
            victim.block_ids.extend(rng.sample(range(600, 900), 3))
        chunks = [decode_chunk(r) for r in batch if r.num_tokens < MAX_SEQ]
        if not chunks:
            continue
        assert inputs.fits(chunks)
        padded = next(s for s in sizes if s >= len(chunks))
        inputs.fill(chunks, padded)
        check_matches(inputs, chunks, padded)
        for chunk in chunks:  # the step's token joins the request
            chunk.request.output_token_ids.append(rng.randrange(1000))


def test_only_one_token_chunks_within_the_limits_fit() -> None:
    rng = random.Random(1)
    inputs = StaticDecodeInputs(4, MAX_SEQ, BLOCK, torch.device("cpu"))
    short = make_request(rng, 0, 10)
    assert inputs.fits([decode_chunk(short)])
    assert not inputs.fits([])
    assert not inputs.fits([ScheduledChunk(short, 0, 10)])  # a prefill chunk
    assert not inputs.fits([decode_chunk(make_request(rng, i, 5)) for i in range(5)])
    assert not inputs.fits([decode_chunk(make_request(rng, 9, MAX_SEQ + 1))])
    with pytest.raises(ValueError, match="run them eagerly"):
        inputs.fill([ScheduledChunk(short, 0, 10)], 4)


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert graph_batch_sizes(256)[-3:] == [240, 248, 256]
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_mixed_batch_lays_decode_rows_first_and_keeps_logits_in_chunk_order() -> None:
    rng = random.Random(2)
    requests = [make_request(rng, i, n) for i, n in enumerate([9, 5, 13, 7])]
    requests[1].output_token_ids.append(3)  # request 1 decodes; 0, 2 prefill; 3 decodes
    requests[3].output_token_ids.append(4)
    chunks = [
        ScheduledChunk(requests[0], 0, 9),
        decode_chunk(requests[1]),
        ScheduledChunk(requests[2], 4, 6),  # a middle chunk: does not sample
        decode_chunk(requests[3]),
    ]
    batch = build_batch(chunks, BLOCK, torch.device("cpu"))
    assert batch.meta.num_decodes == 2
    assert batch.meta.query_lens_cpu == [1, 1, 9, 6]
    assert batch.positions[:2].tolist() == [5, 7]
    # Sampling chunks in chunk order: request 0 (rows 2..10), 1 (row 0), 3 (row 1).
    assert batch.logits_indices.tolist() == [10, 0, 1]
    assert batch.input_ids[10].item() == requests[0].prompt_token_ids[8]


class _CopySources(TorchDispatchMode):
    """Records whether the source of each host-to-buffer copy is contiguous."""

    def __init__(self) -> None:
        super().__init__()
        self.contiguous: list[bool] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten.copy_.default:
            self.contiguous.append(args[1].is_contiguous())
        return func(*args, **(kwargs or {}))


def test_fill_copies_from_contiguous_staging() -> None:
    """A strided source is staged again by torch in pageable memory on CUDA (a copy the
    host waits for): every buffer is copied from a contiguous staging region."""
    rng = random.Random(3)
    inputs = StaticDecodeInputs(8, MAX_SEQ, BLOCK, torch.device("cpu"))
    chunks = [decode_chunk(make_request(rng, i, 5 + i)) for i in range(3)]
    with _CopySources() as copies:
        inputs.fill(chunks, 4)
    assert copies.contiguous and all(copies.contiguous)
    check_matches(inputs, chunks, 4)
