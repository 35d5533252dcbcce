"""Split-K merge of paged decode attention (stage 2 of `decode_attention`).

Stage 1 left, per (sequence, query head, partition s), the partition's running max `m_s`
(log2 domain), sum `l_s` and unnormalised output `acc_s`, all fp32; partitions at or past
the sequence's length were never written. One program per (sequence, head) merges the
partitions that hold tokens (a sequence of L tokens split S ways has partitions of
`partition_tokens(L, S, tile, min_tiles)` tokens, L / S rounded up to whole KV tiles and
at least `min_tiles` of them), in a loop over those partitions alone: one compiled kernel
serves every split count:

    out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s,   M = max_s m_s

A sequence with no visible key (all its l_s = 0) gets zeros. Reference:
`merge_partitions_reference`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from splitserve.kernels.checks import check_launchable, check_shape, check_tensor, next_pow2


@triton.jit
def partition_tokens(seq_len, num_splits, tile, min_tiles):
    """Tokens in each partition of a sequence's context: seq_len / num_splits rounded up
    to whole tiles, at least `min_tiles` tiles (a context too short for that many
    partitions of that length fills fewer)."""
    tiles = tl.cdiv(tl.cdiv(seq_len, num_splits), tile)
    return tl.maximum(tiles, min_tiles) * tile


# Arguments that vary with the split plan are not specialised on (engine/warmup.py).
@triton.jit(
    do_not_specialize=[
        "partition_tile", "partition_min_tiles", "num_splits", "stride_pml_seq",
        "stride_pml_head",
    ]
)  # fmt: skip
def _decode_reduce_kernel(
    part_acc_ptr,  # [B, num_heads, num_splits, HEAD_DIM] fp32
    part_m_ptr,  # [B, num_heads, num_splits] fp32
    part_l_ptr,  # [B, num_heads, num_splits] fp32
    seq_lens_ptr,  # [B] int32
    out_ptr,  # [B, num_heads, HEAD_DIM]
    partition_tile,
    partition_min_tiles,
    num_splits,
    stride_seq_lens,
    stride_pacc_seq,
    stride_pacc_head,
    stride_pacc_split,
    stride_pacc_dim,
    stride_pml_seq,
    stride_pml_head,
    stride_pml_split,
    stride_out_seq,
    stride_out_head,
    stride_out_dim,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SKIP_EMPTY: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq * stride_seq_lens)
    if SKIP_EMPTY and seq_len <= 0:
        return
    partition = partition_tokens(seq_len, num_splits, partition_tile, partition_min_tiles)
    num_active = tl.minimum(tl.cdiv(seq_len, partition), num_splits)
    dims = tl.arange(0, BLOCK_D)
    pml = part_m_ptr + seq * stride_pml_seq + head * stride_pml_head
    pll = part_l_ptr + seq * stride_pml_seq + head * stride_pml_head
    pacc = part_acc_ptr + seq * stride_pacc_seq + head * stride_pacc_head + dims * stride_pacc_dim
    # Two passes over the active partitions only (a loop, not a tile padded to the most
    # splits a plan may take): their max, then the weighted sums.
    m_max = tl.full([], float("-inf"), tl.float32)
    for split in range(0, num_active):
        m_max = tl.maximum(m_max, tl.load(pml + split * stride_pml_split))
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    numer = tl.zeros([BLOCK_D], dtype=tl.float32)
    denom = tl.zeros([], dtype=tl.float32)
    for split in range(0, num_active):
        weight = tl.exp2(tl.load(pml + split * stride_pml_split) - m_ref)
        denom += tl.load(pll + split * stride_pml_split) * weight
        acc = tl.load(pacc + split * stride_pacc_split, mask=dims < HEAD_DIM, other=0.0)
        numer += acc * weight
    out = numer / tl.where(denom > 0, denom, 1.0)
    tl.store(
        out_ptr + seq * stride_out_seq + head * stride_out_head + dims * stride_out_dim,
        out.to(out_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def merge_partitions(
    part_acc: torch.Tensor,  # [B, num_heads, num_splits, head_dim] fp32
    part_m: torch.Tensor,  # [B, num_heads, num_splits] fp32
    part_l: torch.Tensor,  # [B, num_heads, num_splits] fp32
    seq_lens: torch.Tensor,  # [B] int32
    out: torch.Tensor,  # [B, num_heads, head_dim], written
    partition_tile: int,  # partitions are whole multiples of this many tokens
    min_tiles: int,  # and at least this many tiles (`partition_tokens`)
) -> None:
    prepare_merge(part_acc, part_m, part_l, seq_lens, out, partition_tile, min_tiles)(out)


def prepare_merge(
    part_acc: torch.Tensor,
    part_m: torch.Tensor,
    part_l: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    partition_tile: int,
    min_tiles: int,
    skip_empty: bool = False,
) -> Callable[[torch.Tensor], None]:
    """`merge_partitions` checked once: the launch, taking an output of `out`'s shape and
    strides (each layer of a step its own). With `skip_empty`, rows whose length is 0
    are left unwritten (the split prefill's rows outside every sequence) where otherwise
    they get zeros."""
    device = out.device
    check_launchable(device)
    check_tensor("part_acc", part_acc, 4, (torch.float32,), device)
    batch, num_heads, num_splits, head_dim = part_acc.shape
    for name, t in (("part_m", part_m), ("part_l", part_l)):
        check_tensor(name, t, 3, (torch.float32,), device, inner_contiguous=False)
        check_shape(name, t, (batch, num_heads, num_splits))
    check_tensor("seq_lens", seq_lens, 1, (torch.int32,), device, inner_contiguous=False)
    check_shape("seq_lens", seq_lens, (batch,))
    check_tensor("out", out, 3, (torch.float32, torch.float16, torch.bfloat16), device)
    check_shape("out", out, (batch, num_heads, head_dim))
    if partition_tile < 1 or min_tiles < 1:
        raise ValueError(
            f"partition_tile and min_tiles must be >= 1, got {partition_tile} and {min_tiles}"
        )
    args = dict(
        part_acc_ptr=part_acc, part_m_ptr=part_m, part_l_ptr=part_l,
        seq_lens_ptr=seq_lens,
        partition_tile=partition_tile, partition_min_tiles=min_tiles, num_splits=num_splits,
        stride_seq_lens=seq_lens.stride(0),
        stride_pacc_seq=part_acc.stride(0), stride_pacc_head=part_acc.stride(1),
        stride_pacc_split=part_acc.stride(2), stride_pacc_dim=part_acc.stride(3),
        stride_pml_seq=part_m.stride(0), stride_pml_head=part_m.stride(1),
        stride_pml_split=part_m.stride(2),
        stride_out_seq=out.stride(0), stride_out_head=out.stride(1),
        stride_out_dim=out.stride(2),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim, 16), SKIP_EMPTY=skip_empty,
        num_warps=1,
    )  # fmt: skip
    grid = (batch, num_heads)

    def launch(out: torch.Tensor) -> None:
        if batch:
            _decode_reduce_kernel[grid](out_ptr=out, **args)

    return launch


def merge_partitions_reference(
    part_acc: torch.Tensor,  # [B, num_heads, num_splits, head_dim] fp32
    part_m: torch.Tensor,  # [B, num_heads, num_splits] fp32
    part_l: torch.Tensor,  # [B, num_heads, num_splits] fp32
    seq_lens: torch.Tensor,  # [B] int32
    partition_tile: int,
    min_tiles: int,
) -> torch.Tensor:  # [B, num_heads, head_dim] fp32
    num_splits = part_m.shape[2]
    splits = torch.arange(num_splits, device=part_m.device)
    lens = seq_lens.long()[:, None]
    tiles = ((lens + num_splits - 1) // num_splits + partition_tile - 1) // partition_tile
    partition = tiles.clamp_min(min_tiles) * partition_tile
    active = splits[None, :] < (lens + partition - 1) // partition
    active = active[:, None, :]  # [B, 1, S]
    m = torch.where(active, part_m, float("-inf"))
    m_max = m.amax(-1, keepdim=True)
    weight = torch.exp2(m - torch.where(m_max == float("-inf"), 0.0, m_max))
    acc = torch.where(active[..., None], part_acc, 0.0)
    numer = (weight[..., None] * acc).sum(2)
    denom = (weight * torch.where(active, part_l, 0.0)).sum(2)
    return numer / torch.where(denom > 0, denom, 1.0)[..., None]
