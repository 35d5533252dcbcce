"""Paged prefill attention with each sequence's context split across programs.

`prefill_attention` (kernels/prefill_attention.py) gives a query tile of a sequence one
program a query head, which walks the whole context: a short chunk over a long cached
context (the rest of a prompt chunked at the step's token budget, or a new turn over a
cached conversation) runs a few dozen programs on a device of 132 multiprocessors, each
reading thousands of keys. Here each (query tile, sequence, query head) is cut further
into `num_splits` partitions of the sequence's context, as the decode kernel cuts a
sequence (kernels/decode_attention.py): partition s holds positions
[s * P, (s + 1) * P), P = `partition_tokens(seq_len, num_splits, BLOCK_N)`. Each program
folds its partition's keys into an online softmax (the keys every row of its tile sees in
full, then those on the causal diagonal, masked) and stores its rows' running max, sum and
unnormalised output; the decode kernel's merge (kernels/decode_reduce.py) then combines
each row's partitions, reading the row's sequence length from `row_seq_lens`, which the
split-0 programs write (rows outside every sequence keep 0 and are left unwritten).

`plan_context_splits` picks the split count for a run from host lengths: none when the
unsplit grid already gives every multiprocessor `PROGRAMS_PER_SM` programs, otherwise as
many as fill them, each partition at least `MIN_PARTITION_TOKENS` of the longest context.

Reference: `prefill_attention_reference` (kernels/prefill_attention.py).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import check_tensor, check_tile, dot_precision, next_pow2
from splitserve.kernels.decode_reduce import partition_tokens, prepare_merge
from splitserve.kernels.paged import attend_kv_tile
from splitserve.kernels.prefill_attention import LOG2E, check_prefill

# Programs a multiprocessor should get; the fewest context tokens worth a partition; the
# most partitions (each row's merge reads all of its sequence's).
PROGRAMS_PER_SM = 2
MIN_PARTITION_TOKENS = 256
MAX_SPLITS = 32


def plan_context_splits(
    query_lens: list[int], seq_lens: list[int], num_heads: int, block_m: int, sms: int
) -> int:
    """Partitions of each sequence's context for a run of these chunks (host lengths):
    1 when the run's query tiles times heads fill `PROGRAMS_PER_SM` programs a
    multiprocessor, else the count that fills them, bounded by the longest context."""
    programs = num_heads * sum(math.ceil(q / block_m) for q in query_lens)
    wanted = PROGRAMS_PER_SM * sms
    if programs == 0 or programs >= wanted:
        return 1
    by_length = max(seq_lens, default=0) // MIN_PARTITION_TOKENS
    return max(1, min(math.ceil(wanted / programs), by_length, MAX_SPLITS))


@triton.jit(
    do_not_specialize=["stride_table_seq", "num_splits"],
    do_not_specialize_on_alignment=["table_ptr", "seq_lens_ptr"],
)
def _prefill_split_kernel(
    q_ptr,  # [T, num_heads, HEAD_DIM]
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    table_ptr,  # [B, max_blocks] int32, -1 padded
    seq_lens_ptr,  # [B] int32
    query_start_ptr,  # [B + 1] int32
    part_acc_ptr,  # [T, num_heads, num_splits, HEAD_DIM] fp32
    part_m_ptr,  # [T, num_heads, num_splits] fp32
    part_l_ptr,  # [T, num_heads, num_splits] fp32
    row_seq_lens_ptr,  # [T] int32, zeros: each row's sequence length, written here
    qk_scale_log2,
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_kv_dim,
    stride_table_seq,
    stride_pacc_tok,
    stride_pacc_head,
    stride_pacc_split,
    stride_pml_tok,
    stride_pml_head,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
    q_begin = tl.load(query_start_ptr + seq)
    query_len = tl.load(query_start_ptr + seq + 1) - q_begin
    tile_begin = tile * BLOCK_M
    if tile_begin >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    cached_len = seq_len - query_len
    partition = partition_tokens(seq_len, num_splits, BLOCK_N)
    part_begin = split * partition
    if part_begin >= seq_len:
        return
    part_end = tl.minimum(part_begin + partition, seq_len)

    rows = tile_begin + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    in_rows = rows < query_len
    mask = in_rows[:, None] & (dims < HEAD_DIM)[None, :]
    tok = (q_begin + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_q_tok + head * stride_q_head + dims[None, :],
        mask=mask,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = cached_len + rows
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table = table_ptr + seq.to(tl.int64) * stride_table_seq
    kv_head = head // GROUP_SIZE

    # The partition's keys before the tile's first query position: every row sees them.
    full_end = ((cached_len + tile_begin) // BLOCK_N) * BLOCK_N
    for start in range(part_begin, tl.minimum(part_end, full_end), BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, q_pos, kv_ptr, table, kv_head, seq_len, start, qk_scale_log2,
            stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_kv_dim, 1,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            CAUSAL=False, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    # Its keys on the diagonal, up to the tile's last query position, masked causally.
    kv_end = cached_len + tl.minimum(tile_begin + BLOCK_M, query_len)
    for start in range(tl.maximum(part_begin, full_end), tl.minimum(part_end, kv_end), BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, q_pos, kv_ptr, table, kv_head, seq_len, start, qk_scale_log2,
            stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_kv_dim, 1,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            CAUSAL=True, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    pacc = part_acc_ptr + tok[:, None] * stride_pacc_tok + head * stride_pacc_head
    tl.store(pacc + split * stride_pacc_split + dims[None, :], acc, mask=mask)
    pml = tok * stride_pml_tok + head * stride_pml_head + split
    tl.store(part_m_ptr + pml, m_i, mask=in_rows)
    tl.store(part_l_ptr + pml, l_i, mask=in_rows)
    if (split == 0) & (head == 0):
        tl.store(row_seq_lens_ptr + tok, seq_len, mask=in_rows)


def default_tiles(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): 64-row query tiles (the chunks this path takes are short) over
    64-token KV tiles; float32 32 x 32. The interpreter takes 32 x 32."""
    if device.type != "cuda" or dtype == torch.float32 or head_dim > 128:
        return 32, 32
    return 64, 64


def default_num_warps(block_m: int, dtype: torch.dtype) -> int:
    """8: at 64 x 64 tiles on sm_90 (Triton 3.6) 4 warps spill 552 bytes a thread, 8 warps
    120 (`compile_check`)."""
    return 8


def prefill_attention_split(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32, -1 padded, unit stride per row
    seq_lens: torch.Tensor,  # [B] int32, contiguous
    query_start_loc: torch.Tensor,  # [B + 1] int32, contiguous
    max_query_len: int,  # host upper bound of the query lengths (sizes the grid)
    scale: float,
    num_splits: int,  # partitions of each sequence's context
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim], q's dtype
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
) -> torch.Tensor:  # [T, num_heads, head_dim]; rows outside every sequence are not written
    """`prefill_attention` with the context of each sequence cut into `num_splits`."""
    out = check_prefill(q, kv_cache, block_tables, seq_lens, query_start_loc, out)
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens),
                    ("query_start_loc", query_start_loc)):  # fmt: skip
        check_tensor(name, t, t.dim(), (torch.int32,), q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    batch = block_tables.shape[0]
    tokens, num_heads, head_dim = q.shape
    if batch == 0 or max_query_len <= 0:
        return out
    default_m, default_n = default_tiles(q.dtype, head_dim, q.device)
    block_m, block_n = block_m or default_m, block_n or default_n
    check_tile("block_m", block_m)
    check_tile("block_n", block_n)

    def scratch(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.float32, device=q.device)

    part_acc = scratch(tokens, num_heads, num_splits, head_dim)
    part_m, part_l = scratch(tokens, num_heads, num_splits), scratch(tokens, num_heads, num_splits)
    row_seq_lens = torch.zeros(tokens, dtype=torch.int32, device=q.device)
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads * num_splits)
    _prefill_split_kernel[grid](
        q_ptr=q, kv_ptr=kv_cache, table_ptr=block_tables, seq_lens_ptr=seq_lens,
        query_start_ptr=query_start_loc, part_acc_ptr=part_acc, part_m_ptr=part_m,
        part_l_ptr=part_l, row_seq_lens_ptr=row_seq_lens, qk_scale_log2=scale * LOG2E,
        num_splits=num_splits, stride_q_tok=q.stride(0), stride_q_head=q.stride(1),
        stride_kv_block=kv_cache.stride(0), stride_kv_kv=kv_cache.stride(1),
        stride_kv_tok=kv_cache.stride(2), stride_kv_head=kv_cache.stride(3),
        stride_kv_dim=kv_cache.stride(4), stride_table_seq=block_tables.stride(0),
        stride_pacc_tok=part_acc.stride(0), stride_pacc_head=part_acc.stride(1),
        stride_pacc_split=part_acc.stride(2), stride_pml_tok=part_m.stride(0),
        stride_pml_head=part_m.stride(1),
        GROUP_SIZE=num_heads // kv_cache.shape[3], HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=next_pow2(head_dim, 16), KV_BLOCK_SIZE=kv_cache.shape[2],
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=num_warps or default_num_warps(block_m, q.dtype), num_stages=num_stages,
    )  # fmt: skip
    prepare_merge(part_acc, part_m, part_l, row_seq_lens, out, block_n, skip_empty=True)(out)
    return out
