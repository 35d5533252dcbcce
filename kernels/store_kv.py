"""Store a step's new K/V rows into one layer of the paged KV pool.

Token t goes to pool slot `slot_mapping[t]` (block `slot // block_size`, offset
`slot % block_size`); slot -1 is a padding row and writes nothing. One program per token
copies all of its KV heads (K and V). The plain-torch reference is
`splitserve.kernels.attention_torch.store_kv`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels.attention_torch import store_kv as store_kv_reference
from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_launchable,
    check_shape,
    check_tensor,
    next_pow2,
)

__all__ = ["store_kv", "store_kv_reference"]


@triton.jit
def _store_kv_kernel(
    k_ptr,  # [T, num_kv_heads, HEAD_DIM]
    v_ptr,  # [T, num_kv_heads, HEAD_DIM]
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, HEAD_DIM]
    slot_ptr,  # [T] int64, -1 = skip
    num_kv_heads,
    stride_slot,
    stride_k_tok,
    stride_k_head,
    stride_k_dim,
    stride_v_tok,
    stride_v_head,
    stride_v_dim,
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_kv_dim,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + tok * stride_slot)
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]
    dst = (
        kv_ptr
        + (slot // KV_BLOCK_SIZE) * stride_kv_block
        + (slot % KV_BLOCK_SIZE) * stride_kv_tok
        + heads[:, None] * stride_kv_head
        + dims[None, :] * stride_kv_dim
    )
    k = tl.load(
        k_ptr + tok * stride_k_tok + heads[:, None] * stride_k_head + dims[None, :] * stride_k_dim,
        mask=mask,
    )
    v = tl.load(
        v_ptr + tok * stride_v_tok + heads[:, None] * stride_v_head + dims[None, :] * stride_v_dim,
        mask=mask,
    )
    tl.store(dst, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(dst + stride_kv_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, 2, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = skip
) -> None:
    """Write k/v rows into `kv_cache` at `slot_mapping` (cast to the pool's dtype)."""
    device = kv_cache.device
    check_launchable(device)
    check_tensor("kv_cache", kv_cache, 5, FLOAT_DTYPES, device)
    _, two, block_size, num_kv_heads, head_dim = kv_cache.shape
    if two != 2:
        raise ValueError(f"kv_cache dim 1 must be 2 (K, V), got shape {tuple(kv_cache.shape)}")
    num_tokens = k.shape[0]
    check_tensor("k", k, 3, FLOAT_DTYPES, device)
    check_tensor("v", v, 3, FLOAT_DTYPES, device)
    check_shape("k", k, (num_tokens, num_kv_heads, head_dim))
    check_shape("v", v, (num_tokens, num_kv_heads, head_dim))
    check_tensor("slot_mapping", slot_mapping, 1, (torch.int64,), device, inner_contiguous=False)
    check_shape("slot_mapping", slot_mapping, (num_tokens,))
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k_ptr=k,
        v_ptr=v,
        kv_ptr=kv_cache,
        slot_ptr=slot_mapping,
        num_kv_heads=num_kv_heads,
        stride_slot=slot_mapping.stride(0),
        stride_k_tok=k.stride(0),
        stride_k_head=k.stride(1),
        stride_k_dim=k.stride(2),
        stride_v_tok=v.stride(0),
        stride_v_head=v.stride(1),
        stride_v_dim=v.stride(2),
        stride_kv_block=kv_cache.stride(0),
        stride_kv_kv=kv_cache.stride(1),
        stride_kv_tok=kv_cache.stride(2),
        stride_kv_head=kv_cache.stride(3),
        stride_kv_dim=kv_cache.stride(4),
        HEAD_DIM=head_dim,
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        KV_BLOCK_SIZE=block_size,
        num_warps=4,
    )
