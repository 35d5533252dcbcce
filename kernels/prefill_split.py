"""How the prefill kernel splits each sequence's context across programs.

`prefill_attention` (kernels/prefill_attention.py) gives a query tile of a sequence one
program a query head, which walks the whole context: a short chunk over a long cached
context (the rest of a prompt chunked at the step's token budget, or a new turn over a
cached conversation) runs a few dozen programs on a device of 132 multiprocessors, each
reading thousands of keys. With `num_splits` > 1 each (query tile, sequence, query head)
is cut further into partitions of the sequence's context, as the decode kernel cuts a
sequence (kernels/decode_attention.py): partition s holds positions [s * P, (s + 1) * P),
P = `partition_tokens(seq_len, num_splits, BLOCK_N)`. Each program stores its rows'
running max, sum and unnormalised output over its partition, and the decode kernel's merge
(kernels/decode_reduce.py) combines each row's partitions, reading the row's sequence
length, which the split-0 programs write (rows outside every sequence are left unwritten).

`plan_context_splits` picks the split count for a run from host lengths: none when the
run's query tiles (at the split launch's rows) times heads exceed `MAX_FILL_FRACTION` of
the multiprocessors, otherwise as many as give every multiprocessor
`PROGRAMS_PER_SM` programs, each partition at least `MIN_PARTITION_TOKENS` of the longest
context. A split launch's 64 x 64 tiles do the same work more slowly than the unsplit
kernel's, so it pays only where the unsplit grid leaves most of the device idle: one
layer of Llama-3.1-8B (32 query heads) on an H100 beside 12 decode rows
(`benchmarks/results/kernels/short_rest_split_h100_2026-12-06/`), a 32-row chunk over 4,096
tokens (32 programs, 9 partitions) 131.0 µs against 192.6 unsplit; 128 rows (64 programs)
181.5 against 193.6 over 4,096 tokens but 66.8 against 56.3 over 1,024; 512 rows (256
programs, 2 partitions) 384.8 against 224.2. A split launch takes `default_tiles` and
`NUM_WARPS`. Pure host arithmetic.
"""

from __future__ import annotations

import math

import torch

# Programs a multiprocessor should get; the split runs' largest unsplit grid, as a
# fraction of the multiprocessors; the fewest context tokens worth a partition; the most
# partitions (each row's merge reads all of its sequence's).
PROGRAMS_PER_SM = 2
MAX_FILL_FRACTION = 0.25
MIN_PARTITION_TOKENS = 256
MAX_SPLITS = 32
# A split launch's warps at its 64 x 64 tiles (on sm_90, Triton 3.6, a spill of 16 bytes a
# thread: `compile_check`).
NUM_WARPS = 8


def plan_context_splits(
    query_lens: list[int], seq_lens: list[int], num_heads: int, block_m: int, sms: int
) -> int:
    """Partitions of each sequence's context for a run of these chunks (host lengths):
    1 when the run's query tiles times heads exceed `MAX_FILL_FRACTION` of the
    multiprocessors, else the count that gives each `PROGRAMS_PER_SM` programs, bounded by
    the longest context."""
    programs = num_heads * sum(math.ceil(q / block_m) for q in query_lens)
    if programs == 0 or programs > MAX_FILL_FRACTION * sms:
        return 1
    wanted = PROGRAMS_PER_SM * sms
    by_length = max(seq_lens, default=0) // MIN_PARTITION_TOKENS
    return max(1, min(math.ceil(wanted / programs), by_length, MAX_SPLITS))


def default_tiles(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of a split launch: 64-row query tiles (the chunks it takes are
    short) over 64-token KV tiles; float32 and the interpreter 32 x 32."""
    if device.type != "cuda" or dtype == torch.float32 or head_dim > 128:
        return 32, 32
    return 64, 64
