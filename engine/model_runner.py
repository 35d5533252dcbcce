"""Model runner: turns a step's scheduled chunks into one flattened batch, runs the model,
and returns logits for the rows that sample (the last token of each chunk that reaches
its request's last known token).

The engine core calls `execute(chunks)` once per step. On CUDA a batch of one-token
chunks replays a captured graph (`engine/cuda_graphs.py`); every other batch is built by
`build_batch` and, on CUDA, replays the piecewise graphs of its token count around an
eager attention (`engine/piecewise_graphs.py`), else runs eagerly. Host-built index
tensors go to the device through pinned memory with asynchronous copies, so the forward
pass never waits on the host; `build_batch` packs its seven index arrays, and the rows
of the chunks that take a pending token (the previous step's draw, still on the device)
with their sources, into one staging buffer and one copy (`device_copy.arrays_to_device`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from splitserve.engine.cuda_graphs import DecodeGraphs
from splitserve.engine.forward_times import DECODE, PREFILL, ForwardTimes
from splitserve.engine.piecewise_graphs import PiecewiseGraphs
from splitserve.engine.request import RequestId
from splitserve.engine.scheduler import ScheduledChunk
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.device_copy import arrays_to_device, to_device


class PendingTokens(NamedTuple):
    """Tokens the previous step sampled, still on the device (engine/overlap.py): a chunk
    that ends on its request's pending token reads it from here."""

    token_ids: torch.Tensor  # [N] int64, on the model's device
    rows: dict[RequestId, int]  # request -> its row in token_ids


class Patch(NamedTuple):
    """Input rows to overwrite with pending tokens: which chunk (in the step's order and
    among its sampling chunks), and each one's row in the pending tokens (host lists; the
    step's input copy takes them to the device)."""

    chunk_index: list[int]
    sampling_index: list[int]
    source: list[int]
    pending_ids: torch.Tensor  # PendingTokens.token_ids


def _patch(chunks: list[ScheduledChunk], pending: PendingTokens | None) -> Patch | None:
    if pending is None:
        return None
    chunk_index: list[int] = []
    sampling_index: list[int] = []
    source: list[int] = []
    num_sampling = 0
    for i, chunk in enumerate(chunks):
        if not chunk.samples:
            continue
        row = pending.rows.get(chunk.request.request_id)
        if row is not None and chunk.request.num_pending_tokens:
            chunk_index.append(i)
            sampling_index.append(num_sampling)
            source.append(row)
        num_sampling += 1
    if not source:
        return None
    return Patch(chunk_index, sampling_index, source, pending.token_ids)


class BatchInputs(NamedTuple):
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    meta: AttentionMetadata
    # Row of each sampling chunk's last token, in chunk order.
    logits_indices: torch.Tensor  # [N] int64


class _Rows(NamedTuple):
    """A step's per-token host arrays, filled chunk by chunk (`_fill_rows`)."""

    token_ids: np.ndarray  # [T] int64
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64


def _fill_rows(chunks_in_rows: list[ScheduledChunk], num_decodes: int, block_size: int) -> _Rows:
    """Token ids, positions and pool slots of every row. The leading `num_decodes`
    one-token chunks are written from one list each; a longer chunk as slices, its slots
    through numpy (block id of the position's block, times the block size, plus the
    offset in it)."""
    total = sum(c.num_new_tokens for c in chunks_in_rows)
    rows = _Rows(*(np.empty(total, dtype=np.int64) for _ in range(3)))
    decodes = chunks_in_rows[:num_decodes]
    rows.positions[:num_decodes] = [c.start for c in decodes]
    rows.token_ids[:num_decodes] = [
        c.request.token_ids_slice(c.start, c.start + 1)[0] for c in decodes
    ]
    rows.slots[:num_decodes] = [
        c.request.block_ids[c.start // block_size] * block_size + c.start % block_size
        for c in decodes
    ]
    row = num_decodes
    for request, start, num_new in chunks_in_rows[num_decodes:]:
        end = start + num_new
        positions = np.arange(start, end, dtype=np.int64)
        first, last = start // block_size, (end - 1) // block_size
        blocks = np.asarray(request.block_ids[first : last + 1], dtype=np.int64)
        rows.token_ids[row : row + num_new] = request.token_ids_slice(start, end)
        rows.positions[row : row + num_new] = positions
        rows.slots[row : row + num_new] = (
            blocks[positions // block_size - first] * block_size + positions % block_size
        )
        row += num_new
    return rows


def _block_tables(chunks_in_rows: list[ScheduledChunk], max_blocks: int) -> np.ndarray:
    """[rows, max_blocks] int32: each row's first `max_blocks` block ids, -1 padded
    (written through one mask, in row-major order, from one flat array of ids)."""
    tables = [c.request.block_ids[:max_blocks] for c in chunks_in_rows]
    lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    flat = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int32, count=int(lengths.sum())
    )
    out = np.full((len(tables), max_blocks), -1, dtype=np.int32)
    out[np.arange(max_blocks) < lengths[:, None]] = flat
    return out


def build_batch(
    chunks: list[ScheduledChunk],
    block_size: int,
    device: torch.device,
    patch: Patch | None = None,
) -> BatchInputs:
    """The flattened batch, one-token chunks first (`meta.num_decodes` of them) so that a
    backend can give them its decode kernel; `logits_indices` stays in chunk order. With
    `patch`, the input rows of chunks ending on a pending token take it on the device
    (their rows and sources go in the same copy as the rest)."""
    decodes = [c for c in chunks if c.num_new_tokens == 1]
    if len(decodes) not in (0, len(chunks)):
        chunks_in_rows = decodes + [c for c in chunks if c.num_new_tokens != 1]
    else:
        chunks_in_rows = chunks
    query_lens = [c.num_new_tokens for c in chunks_in_rows]
    query_start = [0, *itertools.accumulate(query_lens)]
    seq_lens = [c.start + c.num_new_tokens for c in chunks_in_rows]
    last_row = {id(c): query_start[i + 1] - 1 for i, c in enumerate(chunks_in_rows)}
    sample_rows = [last_row[id(c)] for c in chunks if c.samples]
    rows = _fill_rows(chunks_in_rows, len(decodes), block_size)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    arrays = [
        rows.token_ids,
        rows.positions,
        rows.slots,
        np.asarray(query_start, dtype=np.int32),
        np.asarray(seq_lens, dtype=np.int32),
        _block_tables(chunks_in_rows, max_blocks),
        np.asarray(sample_rows, dtype=np.int64),
    ]
    if patch is not None:
        arrays.append(np.asarray([sample_rows[j] for j in patch.sampling_index], dtype=np.int64))
        arrays.append(np.asarray(patch.source, dtype=np.int64))
    ids, positions, slots, starts, lens, tables, logits_indices, *patched = arrays_to_device(
        arrays, device
    )
    if patch is not None:
        ids[patched[0]] = patch.pending_ids[patched[1]]
    meta = AttentionMetadata(
        slot_mapping=slots,
        query_start_loc=starts,
        seq_lens=lens,
        block_tables=tables,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        num_decodes=len(decodes),
    )
    return BatchInputs(ids, positions, meta, logits_indices)


class ModelRunner:
    def __init__(
        self,
        model: Any,
        kv_cache: torch.Tensor,
        block_size: int,
        device: torch.device,
        graphs: DecodeGraphs | None = None,
        pieces: PiecewiseGraphs | None = None,
        prefill_runs: Callable[[], dict[str, int]] = dict,
    ) -> None:
        """`model` is a CausalLM: forward(ids, positions, kv_cache, meta) and
        compute_logits. `graphs` and `pieces`, when given, must be captured over the same
        model and pool. `prefill_runs` reads the attention backend's prefill runs by path
        (AttentionBackend.prefill_runs) for the engine's statistics, as `forward_times`
        (engine/forward_times.py) gives every pass's device time."""
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = device
        self.graphs = graphs
        self.pieces = pieces
        self.num_graph_steps = 0
        self.num_piecewise_steps = 0
        self.prefill_runs = prefill_runs
        self.forward_times = ForwardTimes.for_device(device.type)

    def execute(
        self, chunks: list[ScheduledChunk], pending: PendingTokens | None = None
    ) -> torch.Tensor:
        """Run one step; returns float32 logits [num_sampling_chunks, vocab]. A chunk whose
        last token is still pending takes it from `pending`, on the device."""
        mark = self.forward_times.start()
        logits = self._forward(chunks, pending)
        kind = DECODE if all(c.num_new_tokens == 1 for c in chunks) else PREFILL
        self.forward_times.end(mark, kind, len(chunks))
        return logits

    @torch.inference_mode()
    def _forward(self, chunks: list[ScheduledChunk], pending: PendingTokens | None) -> torch.Tensor:
        patch = _patch(chunks, pending)
        if self.graphs is not None and self.graphs.can_run(chunks):
            self.graphs.inputs.fill(chunks, self.graphs.padded_batch(len(chunks)))
            if patch is not None:
                rows, source = arrays_to_device(
                    [np.asarray(patch.chunk_index, np.int64), np.asarray(patch.source, np.int64)],
                    self.device,
                )
                self.graphs.inputs.input_ids[rows] = patch.pending_ids[source]
            hidden = self.graphs.replay(len(chunks))
            self.num_graph_steps += 1
            if not all(c.samples for c in chunks):
                sample_rows = [i for i, c in enumerate(chunks) if c.samples]
                hidden = hidden[to_device(sample_rows, torch.int64, self.device)]
            return self.model.compute_logits(hidden)
        batch = build_batch(chunks, self.block_size, self.device, patch)
        num_tokens = batch.input_ids.shape[0]
        if self.pieces is not None and self.pieces.can_run(num_tokens):
            hidden = self.pieces.run(batch.input_ids, batch.positions, batch.meta)
            self.num_piecewise_steps += 1
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.kv_cache, batch.meta)
        return self.model.compute_logits(hidden[batch.logits_indices])
