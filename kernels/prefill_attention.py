"""Paged prefill / extend attention over a varlen batch.

Sequence b owns query rows query_start_loc[b]:query_start_loc[b+1] (a chunk of
query_len_b tokens whose K/V are already stored in the pool) and attends to its first
seq_lens[b] pooled tokens: the cached prefix plus, causally, the chunk itself (query row i
sits at position seq_lens[b] - query_len_b + i). Decode rows (query_len 1) are just short
chunks. Grid (query tile, sequence, query head); tiles past a sequence's chunk exit at
once. Each program runs an online softmax in fp32 over KV tiles gathered through the
block table: first the tiles every row of the query tile sees in full, then the tiles on
the causal diagonal with the mask. float32 inputs use full-precision dots.

With `num_splits` > 1 the grid's last axis is (query head, partition): each program folds
only its partition of the context and stores its rows' partials, which the decode merge
combines (kernels/prefill_split.py says when and how a run is split).

Reference: `splitserve.kernels.attention_torch.TorchPagedAttention` (via
`prefill_attention_reference`).
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from splitserve.kernels import prefill_split
from splitserve.kernels.attention import AttentionMetadata
from splitserve.kernels.attention_torch import TorchPagedAttention
from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_launchable,
    check_shape,
    check_tensor,
    check_tile,
    dot_precision,
    next_pow2,
)
from splitserve.kernels.decode_reduce import partition_tokens, prepare_merge
from splitserve.kernels.paged import attend_kv_tile

LOG2E = 1.4426950408889634


# What varies step to step is not specialised on, so that no step compiles a new variant
# mid-serving (engine/warmup.py compiles the kernels at start-up): the block-table row
# stride (the batch's widest table), the alignment of the table and context-length
# pointers (a mixed step passes views that start after its decode rows; an unsplit launch
# passes the context lengths as the rows' too), the split count and the partial max and
# sum's strides, which follow it (a count or heads times it may be a multiple of 16 in one
# step and not in the next).
@triton.jit(
    do_not_specialize=["stride_table_seq", "num_splits", "stride_pml_tok", "stride_pml_head"],
    do_not_specialize_on_alignment=["table_ptr", "seq_lens_ptr", "row_seq_lens_ptr"],
)
def _prefill_kernel(
    q_ptr,  # [T, num_heads, HEAD_DIM]
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    table_ptr,  # [B, max_blocks] int32, -1 padded
    seq_lens_ptr,  # [B] int32
    query_start_ptr,  # [B + 1] int32
    out_ptr,  # [T, num_heads, HEAD_DIM] (written when IS_SINGLE_SPLIT)
    part_acc_ptr,  # [T, num_heads, num_splits, HEAD_DIM] fp32 (otherwise)
    part_m_ptr,  # [T, num_heads, num_splits] fp32
    part_l_ptr,  # [T, num_heads, num_splits] fp32
    row_seq_lens_ptr,  # [T] int32, zeros: each row's sequence length, written here
    qk_scale_log2,
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_q_dim,
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_kv_dim,
    stride_table_seq,
    stride_table_blk,
    stride_seq_lens,
    stride_query_start,
    stride_out_tok,
    stride_out_head,
    stride_out_dim,
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
    IS_SINGLE_SPLIT: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits  # this program's partition (0 when unsplit)
    q_begin = tl.load(query_start_ptr + seq * stride_query_start)
    query_len = tl.load(query_start_ptr + (seq + 1) * stride_query_start) - q_begin
    tile_begin = tile * BLOCK_M
    if tile_begin >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq * stride_seq_lens)
    cached_len = seq_len - query_len
    kv_head = head // GROUP_SIZE
    # This program's keys: all of them, or its partition of the context.
    part_begin = 0
    part_end = seq_len
    if not IS_SINGLE_SPLIT:
        partition = partition_tokens(seq_len, num_splits, BLOCK_N, 1)
        part_begin = split * partition
        if part_begin >= seq_len:
            return
        part_end = tl.minimum(part_begin + partition, seq_len)

    rows = tile_begin + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < query_len)[:, None] & (dims < HEAD_DIM)[None, :]
    tok = (q_begin + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_q_tok + head * stride_q_head + dims[None, :] * stride_q_dim,
        mask=mask,
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    q_pos = cached_len + rows
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    table = table_ptr + seq.to(tl.int64) * stride_table_seq

    # Keys before the tile's first query position are visible to every row.
    full_end = ((cached_len + tile_begin) // BLOCK_N) * BLOCK_N
    for start in range(part_begin, tl.minimum(part_end, full_end), BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, q_pos, kv_ptr, table, kv_head, seq_len, start, qk_scale_log2,
            stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_kv_dim,
            stride_table_blk,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            CAUSAL=False, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip
    # The diagonal: up to the tile's last query position, masked causally.
    kv_end = cached_len + tl.minimum(tile_begin + BLOCK_M, query_len)
    for start in range(tl.maximum(part_begin, full_end), tl.minimum(part_end, kv_end), BLOCK_N):
        acc, m_i, l_i = attend_kv_tile(
            q, acc, m_i, l_i, q_pos, kv_ptr, table, kv_head, seq_len, start, qk_scale_log2,
            stride_kv_block, stride_kv_kv, stride_kv_tok, stride_kv_head, stride_kv_dim,
            stride_table_blk,
            HEAD_DIM=HEAD_DIM, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, KV_BLOCK_SIZE=KV_BLOCK_SIZE,
            CAUSAL=True, DOT_PRECISION=DOT_PRECISION,
        )  # fmt: skip

    if IS_SINGLE_SPLIT:
        # A row that saw no visible key has acc = 0 and l = 0: it gets 0.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr
            + tok[:, None] * stride_out_tok
            + head * stride_out_head
            + dims[None, :] * stride_out_dim,
            out.to(out_ptr.dtype.element_ty),
            mask=mask,
        )
    else:
        pacc = part_acc_ptr + tok[:, None] * stride_pacc_tok + head * stride_pacc_head
        tl.store(pacc + split * stride_pacc_split + dims[None, :], acc, mask=mask)
        pml = tok * stride_pml_tok + head * stride_pml_head + split
        in_rows = rows < query_len
        tl.store(part_m_ptr + pml, m_i, mask=in_rows)
        tl.store(part_l_ptr + pml, l_i, mask=in_rows)
        if (split == 0) & (head == 0):
            tl.store(row_seq_lens_ptr + tok, seq_len, mask=in_rows)


def default_tiles(dtype: torch.dtype, head_dim: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N). On sm_90 (Triton 3.6, head_dim 128, bf16) 128 x 64 tiles with 8
    warps compile to wgmma with no register spills; float32 (exact dots, no tensor
    cores) is a correctness path and takes smaller tiles. The interpreter takes 32 x 32."""
    if device.type != "cuda":
        return 32, 32
    if dtype == torch.float32 or head_dim > 128:
        return 64, 32
    return 128, 64


def default_num_warps(block_m: int, dtype: torch.dtype) -> int:
    return 8 if block_m >= 128 or dtype == torch.float32 else 4


def check_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """The prefill kernels' arguments checked (a ValueError naming what is off); `out`,
    allocated like q when None."""
    device = q.device
    check_launchable(device)
    check_tensor("q", q, 3, FLOAT_DTYPES, device)
    check_tensor("kv_cache", kv_cache, 5, (q.dtype,), device)
    num_heads, head_dim = q.shape[1:]
    _, two, _, num_kv_heads, _ = kv_cache.shape
    if two != 2 or kv_cache.shape[4] != head_dim:
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not match q {tuple(q.shape)}: "
            "expected [num_blocks, 2, block_size, num_kv_heads, head_dim]"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads}")
    check_tensor("block_tables", block_tables, 2, (torch.int32,), device, inner_contiguous=False)
    batch = block_tables.shape[0]
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device, inner_contiguous=False)
    check_shape("seq_lens", seq_lens, (batch,))
    check_tensor("query_start_loc", query_start_loc, 1, (torch.int32,), device, False)
    check_shape("query_start_loc", query_start_loc, (batch + 1,))
    if out is None:
        out = torch.empty_like(q)
    check_tensor("out", out, 3, (q.dtype,), device)
    check_shape("out", out, q.shape)
    return out


def prefill_attention(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32, -1 padded
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    max_query_len: int,  # host upper bound of the query lengths (sizes the grid)
    scale: float,
    out: torch.Tensor | None = None,  # [T, num_heads, head_dim], q's dtype
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int = 2,
    num_splits: int = 1,  # partitions of each context across programs (kernels/prefill_split.py)
) -> torch.Tensor:  # [T, num_heads, head_dim]; rows outside every sequence are not written
    """Causal attention of every chunk's queries over its sequence's pooled context."""
    out = check_prefill(q, kv_cache, block_tables, seq_lens, query_start_loc, out)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    batch, (tokens, num_heads, head_dim) = block_tables.shape[0], q.shape
    if batch == 0 or max_query_len <= 0:
        return out
    split = num_splits > 1
    tiles = prefill_split.default_tiles if split else default_tiles
    default_m, default_n = tiles(q.dtype, head_dim, q.device)
    block_m, block_n = block_m or default_m, block_n or default_n
    check_tile("block_m", block_m)
    check_tile("block_n", block_n)
    if num_warps is None:
        num_warps = prefill_split.NUM_WARPS if split else default_num_warps(block_m, q.dtype)
    parts = _Partials.make(tokens, num_heads, num_splits, head_dim, q, out, seq_lens)
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads * num_splits)
    _prefill_kernel[grid](
        q_ptr=q, kv_ptr=kv_cache, table_ptr=block_tables, seq_lens_ptr=seq_lens,
        query_start_ptr=query_start_loc, out_ptr=out, part_acc_ptr=parts.acc,
        part_m_ptr=parts.max, part_l_ptr=parts.sum, row_seq_lens_ptr=parts.row_seq_lens,
        qk_scale_log2=scale * LOG2E, num_splits=num_splits,
        stride_q_tok=q.stride(0), stride_q_head=q.stride(1), stride_q_dim=q.stride(2),
        stride_kv_block=kv_cache.stride(0), stride_kv_kv=kv_cache.stride(1),
        stride_kv_tok=kv_cache.stride(2), stride_kv_head=kv_cache.stride(3),
        stride_kv_dim=kv_cache.stride(4),
        stride_table_seq=block_tables.stride(0), stride_table_blk=block_tables.stride(1),
        stride_seq_lens=seq_lens.stride(0), stride_query_start=query_start_loc.stride(0),
        stride_out_tok=out.stride(0), stride_out_head=out.stride(1), stride_out_dim=out.stride(2),
        stride_pacc_tok=parts.acc.stride(0), stride_pacc_head=parts.acc.stride(1),
        stride_pacc_split=parts.acc.stride(2), stride_pml_tok=parts.max.stride(0),
        stride_pml_head=parts.max.stride(1),
        GROUP_SIZE=num_heads // kv_cache.shape[3], HEAD_DIM=head_dim, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_D=next_pow2(head_dim, 16), KV_BLOCK_SIZE=kv_cache.shape[2],
        DOT_PRECISION=dot_precision(q.dtype), IS_SINGLE_SPLIT=not split,
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    if split:
        prepare_merge(
            parts.acc, parts.max, parts.sum, parts.row_seq_lens, out, block_n, 1, skip_empty=True
        )(out)
    return out


class _Partials(NamedTuple):
    """A split launch's scratch: each row's partitions and its sequence's length. A
    single-split launch passes its own tensors in their place (never read)."""

    acc: torch.Tensor  # [T, num_heads, num_splits, head_dim] fp32
    max: torch.Tensor  # [T, num_heads, num_splits] fp32
    sum: torch.Tensor  # [T, num_heads, num_splits] fp32
    row_seq_lens: torch.Tensor  # [T] int32, zeros

    @staticmethod
    def make(
        tokens: int, heads: int, splits: int, head_dim: int, q: torch.Tensor,
        out: torch.Tensor, seq_lens: torch.Tensor,
    ) -> _Partials:  # fmt: skip
        if splits == 1:
            return _Partials(out[:, :, None], out[:, :, :1], out[:, :, :1], seq_lens)

        def scratch(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=q.device)

        return _Partials(
            scratch(tokens, heads, splits, head_dim),
            scratch(tokens, heads, splits),
            scratch(tokens, heads, splits),
            torch.zeros(tokens, dtype=torch.int32, device=q.device),
        )


def prefill_attention_reference(
    q: torch.Tensor,  # [T, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32
    query_start_loc: torch.Tensor,  # [B + 1] int32
    scale: float,
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """The torch backend's per-sequence path on the same (already stored) pool."""
    starts = query_start_loc.tolist()
    query_lens = [b - a for a, b in itertools.pairwise(starts)]
    lens = seq_lens.tolist()
    meta = AttentionMetadata(
        slot_mapping=torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device),
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        block_tables=block_tables,
        max_query_len=max([*query_lens, 2]),  # never the all-decode path
        max_seq_len=max([*lens, 0]),
        query_lens_cpu=query_lens,
        seq_lens_cpu=lens,
    )
    empty_kv = q.new_empty(q.shape[0], kv_cache.shape[3], kv_cache.shape[4])
    return TorchPagedAttention().forward(q, empty_kv, empty_kv, kv_cache, meta, scale)
