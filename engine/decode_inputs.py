"""Static input buffers of a graph-replayed decode step, filled from host staging.

A CUDA graph reads its inputs from fixed device addresses, so a decode step's token ids,
positions, KV slots, context lengths and block tables are written into `StaticDecodeInputs`
rather than into fresh tensors. The runner (`engine/cuda_graphs.py`) calls, once per step:

    inputs.fill(chunks, padded_batch)   # host staging rows, then one async copy per buffer

Rows past the real batch (up to the captured batch size) are padding: slot -1 (nothing is
stored), context length 0 (nothing is read), so their outputs are garbage that nobody reads.

The staging tensors are pinned on CUDA, and every copy is issued `non_blocking` from a
contiguous staging region (a strided one would be staged again in pageable memory). Before the
staging is overwritten the previous step's copies are awaited through an event, so a copy
in flight never reads a half-written row. Block-table rows are written incrementally: a
request's `block_ids` list only grows until the request is preempted, when the block
manager replaces it with a new list, so a row whose list is the same object as last step's
only needs the ids appended since.
"""

from __future__ import annotations

import torch

from splitserve.engine.scheduler import ScheduledChunk


class StaticDecodeInputs:
    """Device buffers for up to `max_batch` one-token sequences of context <= `max_seq_len`."""

    def __init__(
        self, max_batch: int, max_seq_len: int, block_size: int, device: torch.device
    ) -> None:
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.block_size = block_size
        self.device = device
        self.max_blocks = -(-max_seq_len // block_size)
        pin = device.type == "cuda"

        def buffers(*shape: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(*shape, dtype=dtype, pin_memory=pin)
            return host, torch.zeros(*shape, dtype=dtype, device=device)

        # int64 rows: token id, position, slot; int32 rows: context length.
        self._host_long, self._long = buffers(3, max_batch, dtype=torch.int64)
        self._host_lens, self.seq_lens = buffers(max_batch, dtype=torch.int32)
        self._host_tables, self.block_tables = buffers(
            max_batch, self.max_blocks, dtype=torch.int32
        )
        self.input_ids, self.positions, self.slot_mapping = self._long.unbind(0)
        # One query per sequence: query_start_loc is 0..max_batch whatever the step.
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)
        # Per staging row: the block-id list last written there and how many of its ids.
        self._rows: list[tuple[list[int] | None, int]] = [(None, 0)] * max_batch
        self._copied: torch.cuda.Event | None = None

    def fits(self, chunks: list[ScheduledChunk]) -> bool:
        """Whether every chunk is one new token and the batch fits the buffers."""
        if not 0 < len(chunks) <= self.max_batch:
            return False
        return all(c.num_new_tokens == 1 and c.start < self.max_seq_len for c in chunks)

    def fill(self, chunks: list[ScheduledChunk], padded_batch: int) -> None:
        """Write the step's rows, pad to `padded_batch`, and copy them to the device."""
        if not self.fits(chunks) or not len(chunks) <= padded_batch <= self.max_batch:
            raise ValueError(
                f"{len(chunks)} chunks do not fit a decode graph of batch {padded_batch} "
                f"(max batch {self.max_batch}, max context {self.max_seq_len}); run them eagerly"
            )
        if self._copied is not None:
            self._copied.synchronize()
        bs = self.block_size
        host_long, host_lens = self._host_long, self._host_lens
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        lens: list[int] = []
        for row, chunk in enumerate(chunks):
            request, pos = chunk.request, chunk.start
            block_ids = request.block_ids
            ids.append(request.token_ids_slice(pos, pos + 1)[0])
            positions.append(pos)
            slots.append(block_ids[pos // bs] * bs + pos % bs)
            lens.append(pos + 1)
            self._write_table_row(row, block_ids)
        num_pad = padded_batch - len(chunks)
        host_long[0, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        host_long[1, : len(ids)] = torch.tensor(positions, dtype=torch.int64)
        host_long[2, : len(ids)] = torch.tensor(slots, dtype=torch.int64)
        if num_pad:
            host_long[:2, len(ids) : padded_batch] = 0
            host_long[2, len(ids) : padded_batch] = -1
        host_lens[: len(ids)] = torch.tensor(lens, dtype=torch.int32)
        host_lens[len(ids) : padded_batch] = 0
        # Whole rows: a slice of every row is strided, which torch would copy through a
        # pageable temporary and a device kernel. Columns past the batch are not read.
        self._long.copy_(host_long, non_blocking=True)
        self.seq_lens[:padded_batch].copy_(host_lens[:padded_batch], non_blocking=True)
        self.block_tables[:padded_batch].copy_(self._host_tables[:padded_batch], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def _write_table_row(self, row: int, block_ids: list[int]) -> None:
        # Blocks past max_blocks (allocated ahead of the context) are never read.
        count = min(len(block_ids), self.max_blocks)
        last, written = self._rows[row]
        if last is not block_ids or written > count:
            written = 0
        if written < count:
            self._host_tables[row, written:count] = torch.tensor(
                block_ids[written:count], dtype=torch.int32
            )
        self._rows[row] = (block_ids, count)
