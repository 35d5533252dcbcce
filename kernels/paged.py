"""Device functions shared by the paged attention kernels (decode and prefill).

`attend_kv_tile` gathers one tile of BLOCK_N context tokens of one KV head through a
sequence's block table and folds it into a running (flash-attention style) softmax:
scores in the log2 domain, fp32 running max `m`, running sum `l`, unnormalised output
`acc`. Tokens at or past `seq_len`, and tokens whose block id is -1, are masked out and
never read, so stale or non-finite pool contents cannot reach the output.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_kv_tile(
    q,  # [ROWS, BLOCK_D] tile of queries (already loaded), input dtype
    acc,  # [ROWS, BLOCK_D] fp32 unnormalised output
    m_i,  # [ROWS] fp32 running max of the log2-domain scores
    l_i,  # [ROWS] fp32 running sum of exp2(score - m_i)
    q_pos,  # [ROWS] int32 position of each query row (read only when CAUSAL)
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, HEAD_DIM] pool layer view
    table_ptr,  # [max_blocks] int32 this sequence's block table row, -1 padded
    kv_head,
    seq_len,
    start,  # first context position of this tile
    qk_scale_log2,  # softmax scale * log2(e)
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_kv_dim,
    stride_table,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pos = start + tl.arange(0, BLOCK_N)
    in_seq = pos < seq_len
    block = tl.load(table_ptr + (pos // KV_BLOCK_SIZE) * stride_table, mask=in_seq, other=-1)
    valid = in_seq & (block >= 0)
    row = (
        kv_ptr
        + block.to(tl.int64) * stride_kv_block
        + (pos % KV_BLOCK_SIZE) * stride_kv_tok
        + kv_head * stride_kv_head
    )
    dims = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (dims < HEAD_DIM)[None, :]
    k_ptrs = row[:, None] + dims[None, :] * stride_kv_dim
    k = tl.load(k_ptrs, mask=mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(k_ptrs + stride_kv_kv, mask=mask, other=0.0)  # [BLOCK_N, BLOCK_D]

    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale_log2
    keep = valid[None, :]
    if CAUSAL:
        keep = keep & (pos[None, :] <= q_pos[:, None])
    scores = tl.where(keep, scores, float("-inf"))  # [ROWS, BLOCK_N]

    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A row that has seen no visible key yet keeps m = -inf; shift by 0 instead so that
    # exp2 gives 0 rather than NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_shift)
    p = tl.exp2(scores - m_shift[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i
