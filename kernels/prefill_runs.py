"""Which attention path each of a step's prefill sequences takes.

A step's prefill sequences come in scheduler order: chunks of prompts already running
(their earlier chunks are in the pool: they have context), then prompts admitted this step
(fresh when nothing of them was cached). Each path suits one kind:

- `CONTEXT`: the Triton prefill kernel (kernels/prefill_attention.py) reads the pool
  through the block tables; it takes any sequence, with or without context.
- `FLASH`: torch's FlashAttention-2 over the sequences' own k/v rows, in one ragged call
  (kernels/fresh_prefill.py); fresh sequences only.
- `CUDNN`: cuDNN's fused attention, one call per prompt (kernels/cudnn_prefill.py); fresh
  prompts long enough for it (`cudnn_prefill.takes`).
- `ROWS`: the split-K decode kernel (kernels/decode_attention.py), each query row as a
  sequence of its own that ends at the row's position; a run `CONTEXT` would take whose
  chunks are all at most `rows_max` rows (the rest of a prompt chunked at the step's
  token budget is often as short as the step's decode rows). The Triton prefill kernel
  gives such a chunk one program a query head, each walking the whole cached context
  (on an H100, 205 µs a layer for a 12-row rest over 4,084 cached tokens:
  benchmarks/results/serving_h100_sweep_0cc9f30/steps/); the decode kernel splits the
  context across programs, and the rows of one chunk read the same blocks side by side.

`plan_runs` splits the sequences into maximal runs of one kind (fresh or not), each run
attended by its own path over its rows. On an H200 (Llama-3.1-8B heads, one layer,
docs/kernels.md) a 4,096-token prompt takes 287 µs on cuDNN, 500 µs on FlashAttention-2
and 633 µs on the Triton kernel: a step that carries the rest of one prompt and the whole
of the next would otherwise attend both with the Triton kernel. More than `MAX_RUNS` runs
(only where prefix-cache hits interleave with fresh prompts) go to the Triton kernel as
one run, so that a step launches at most `MAX_RUNS` prefill calls a layer.

Who calls it: `TritonPagedAttention._plan` (kernels/backend.py), once per step, with the
step's host lengths. Pure host arithmetic: tested on plain lists.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from splitserve.kernels import cudnn_prefill
from splitserve.kernels.fresh_prefill import is_fresh

CONTEXT, FLASH, CUDNN, ROWS = "context", "flash", "cudnn", "rows"
# The most runs a step is split into; past it, every sequence takes the Triton kernel.
MAX_RUNS = 3


class PrefillRun(NamedTuple):
    """Consecutive prefill sequences attended by one path."""

    kind: str  # CONTEXT, FLASH, CUDNN or ROWS
    first_seq: int  # its first sequence, counted among the step's prefill sequences
    first_row: int  # its first row, counted among the step's prefill rows
    query_lens: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def rows(self) -> int:
        return sum(self.query_lens)


def _fresh_groups(fresh: list[bool]) -> list[tuple[bool, int, int]]:
    """(fresh, first sequence, end) of each maximal run of sequences alike."""
    groups, start = [], 0
    for alike, members in itertools.groupby(fresh):
        end = start + sum(1 for _ in members)
        groups.append((alike, start, end))
        start = end
    return groups


def plan_runs(
    query_lens: list[int],  # the prefill sequences' new rows, host copy
    seq_lens: list[int],  # their context after this step, host copy
    flash: bool,  # fresh sequences may leave the Triton kernel (dtype and device allow)
    cudnn: bool,  # cuDNN's plans are built (kernels/cudnn_prefill.py)
    rows_max: int = 0,  # chunks over context of at most this many rows take ROWS; 0: none
) -> list[PrefillRun]:
    """The step's prefill sequences as runs, in order, each with its path."""
    if len(query_lens) != len(seq_lens):
        raise ValueError(f"{len(query_lens)} query lengths for {len(seq_lens)} sequences")
    if not query_lens:
        return []
    fresh = [flash and is_fresh(q, s) for q, s in zip(query_lens, seq_lens, strict=True)]
    groups = _fresh_groups(fresh)
    if len(groups) > MAX_RUNS:
        groups = [(False, 0, len(query_lens))]
    runs = []
    for fresh_run, start, end in groups:
        lens = query_lens[start:end]
        kind = CONTEXT
        if fresh_run:
            kind = CUDNN if cudnn and cudnn_prefill.takes(lens) else FLASH
        elif max(lens) <= rows_max:
            kind = ROWS
        runs.append(PrefillRun(kind, start, sum(query_lens[:start]), lens))
    return runs
