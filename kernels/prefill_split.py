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
run's query tiles (at the split launch's rows, the unsplit launch's too) times heads
exceed `MAX_FILL_FRACTION` of the multiprocessors, otherwise as many as give every
multiprocessor `PROGRAMS_PER_SM` programs, each partition at least `MIN_PARTITION_TOKENS`
of the longest context. On an H100, Llama-3.1-8B heads, a chunk over 4,096 tokens
(`benchmarks/results/kernels/short_rest_split_h100_2026-12-06/`): the prefill kernel alone
(`benchmarks/split_tiles.py`, `tiles/`), µs unsplit against split at 128 x 64 tiles with 8
warps, 32 rows 160.9 against 64.5 (4 partitions) and 65.9 (9), 128 rows 158.8 against
62.7 and 67.4, 512 rows (128 programs, about one a multiprocessor) 160.5 against 183.6
(2); a layer's attention beside 12 decode rows on the side stream
(`benchmarks/short_rest.py`, `tiles_layer/`), 32 and 128 rows (32 programs) 131.7 and
140.8 against 193.3 and 194.7 (9 partitions), but 256 rows (64 programs, half the
multiprocessors) 190.2 against 174.3 (5). Hence a quarter. A split launch takes
`default_tiles` and `NUM_WARPS`. Pure host arithmetic.
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
# A split launch's warps at its 128 x 64 tiles (on sm_90, Triton 3.6, a spill of 80 bytes a
# thread: `compile_check`; 64 x 64 tiles spill 360 bytes with 4 warps).
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
    """(BLOCK_M, BLOCK_N) of a split launch: the unsplit launch's 128 x 64 on CUDA in 16-bit
    types (against 64 x 64 with 8 warps, level at 2 partitions and up to 1.7 times as fast
    at 4 and 9, `tiles/`); float32 and the interpreter 32 x 32."""
    if device.type != "cuda" or dtype == torch.float32 or head_dim > 128:
        return 32, 32
    return 128, 64
