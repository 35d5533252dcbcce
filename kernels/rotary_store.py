"""Rotary position embedding of q and k, and the rotated K with V stored into the paged
pool, in one kernel: what `apply_rotary_` and then `store_kv` do, in one launch that
reads each token's k and v rows once.

One program per token: with position p >= 0 it rotates the token's q and k heads in
place exactly as kernels/rotary.py does (the same products and sums rounded through the
activation dtype, no multiply-add fusion: bit for bit the reference's); with slot s >= 0
it writes the (rotated) K and the V rows at pool slot s (block `s // block_size`, offset
`s % block_size`), cast to the pool's dtype, as kernels/store_kv.py does. Position -1
leaves q and k untouched, slot -1 stores nothing (pad rows).

Who calls it: the model's rotary (engine/model/layers.py, `RotaryEmbedding.rotate_and_store`,
from `Attention.project` before every attention) when the Triton kernels are selected
(kernels/registry.py, `ModelKernels.rotary_store_`); with plain torch the model rotates,
then the attention backend stores. References: `rotary_reference` and
`store_kv_reference`, through `rotary_store_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from splitserve.kernels import torch_ops
from splitserve.kernels.attention_torch import store_kv as store_kv_reference
from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_launchable,
    check_shape,
    check_tensor,
    next_pow2,
)
from splitserve.kernels.rotary import (
    check_rotary_args,
    cos_sin_halves,
    head_halves,
    rotate_heads,
)


@triton.jit
def _store_heads(
    dst_ptr,  # this token's pool row for these heads (its K or its V)
    stride_dst_head,
    mask,  # the heads' mask (`head_halves`)
    lo,  # [BLOCK_H, BLOCK_HALF], the heads' halves
    hi,
    store,  # scalar: the token has a slot
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    dst = dst_ptr + heads[:, None] * stride_dst_head + dims[None, :]
    pool_ty = dst_ptr.dtype.element_ty
    tl.store(dst, lo.to(pool_ty), mask=mask & store)
    tl.store(dst + HALF_DIM, hi.to(pool_ty), mask=mask & store)


@triton.jit
def _rotary_store_kernel(
    q_ptr,  # [T, num_heads, 2 * HALF_DIM], rotated in place
    k_ptr,  # [T, num_kv_heads, 2 * HALF_DIM], rotated in place
    v_ptr,  # [T, num_kv_heads, 2 * HALF_DIM]
    kv_ptr,  # [num_blocks, 2, KV_BLOCK_SIZE, num_kv_heads, 2 * HALF_DIM]
    cos_sin_ptr,  # [max_position, 2, 2 * HALF_DIM] fp32
    positions_ptr,  # [T] int64, -1 = do not rotate
    slot_ptr,  # [T] int64, -1 = do not store
    num_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_kv_block,
    stride_kv_kv,
    stride_kv_tok,
    stride_kv_head,
    stride_cs_pos,
    stride_cs_kind,
    stride_cs_dim,
    stride_pos,
    stride_slot,
    HALF_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    KV_BLOCK_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok * stride_pos)
    slot = tl.load(slot_ptr + tok * stride_slot)
    rotate = pos >= 0
    store = slot >= 0
    cos_lo, cos_hi, sin_lo, sin_hi = cos_sin_halves(
        cos_sin_ptr, tl.maximum(pos, 0), stride_cs_pos, stride_cs_kind, stride_cs_dim,
        q_ptr.dtype.element_ty, HALF_DIM=HALF_DIM, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    rotate_heads(
        q_ptr + tok * stride_q_tok, num_heads, stride_q_head, cos_lo, cos_hi, sin_lo, sin_hi,
        rotate, HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    pool_row = (
        kv_ptr
        + (tl.maximum(slot, 0) // KV_BLOCK_SIZE) * stride_kv_block
        + (tl.maximum(slot, 0) % KV_BLOCK_SIZE) * stride_kv_tok
    )
    mask, k_lo, k_hi = rotate_heads(
        k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, cos_lo, cos_hi, sin_lo,
        sin_hi, rotate, HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    _store_heads(
        pool_row, stride_kv_head, mask, k_lo, k_hi, store,
        HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    _, mask, v_lo, v_hi = head_halves(
        v_ptr + tok * stride_v_tok, num_kv_heads, stride_v_head,
        HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    _store_heads(
        pool_row + stride_kv_kv, stride_kv_head, mask, v_lo, v_hi, store,
        HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip


def _check_pool(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slots: torch.Tensor):
    device = k.device
    check_tensor("v", v, 3, (k.dtype,), device)
    check_shape("v", v, k.shape)
    check_tensor("kv_cache", kv_cache, 5, FLOAT_DTYPES, device)
    _, two, _, kv_heads, head_dim = kv_cache.shape
    if two != 2 or kv_heads != k.shape[1] or head_dim != k.shape[2]:
        raise ValueError(
            f"kv_cache shape {tuple(kv_cache.shape)} does not match k {tuple(k.shape)}: "
            "expected [num_blocks, 2, block_size, num_kv_heads, head_dim]"
        )
    check_tensor("slot_mapping", slots, 1, (torch.int64,), device, inner_contiguous=False)
    check_shape("slot_mapping", slots, (k.shape[0],))


def rotary_store_(
    positions: torch.Tensor,  # [T] int64, -1 = not rotated
    q: torch.Tensor,  # [T, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], rotated in place
    v: torch.Tensor,  # [T, num_kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [max_position, 2, head_dim] fp32 (RotaryEmbedding.cos_sin)
    kv_cache: torch.Tensor,  # one layer's pool view [num_blocks, 2, block_size, kv_heads, dim]
    slot_mapping: torch.Tensor,  # [T] int64, -1 = not stored
) -> None:
    """Rotate q and k in place and store the rotated k and v at their slots. Positions
    must be < max_position and slots inside the pool (not checked on the device)."""
    check_launchable(q.device)
    check_rotary_args(positions, q, k, cos_sin)
    _check_pool(k, v, kv_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_store_kernel[(num_tokens,)](
        q_ptr=q, k_ptr=k, v_ptr=v, kv_ptr=kv_cache, cos_sin_ptr=cos_sin,
        positions_ptr=positions, slot_ptr=slot_mapping,
        num_heads=num_heads, num_kv_heads=k.shape[1],
        stride_q_tok=q.stride(0), stride_q_head=q.stride(1),
        stride_k_tok=k.stride(0), stride_k_head=k.stride(1),
        stride_v_tok=v.stride(0), stride_v_head=v.stride(1),
        stride_kv_block=kv_cache.stride(0), stride_kv_kv=kv_cache.stride(1),
        stride_kv_tok=kv_cache.stride(2), stride_kv_head=kv_cache.stride(3),
        stride_cs_pos=cos_sin.stride(0), stride_cs_kind=cos_sin.stride(1),
        stride_cs_dim=cos_sin.stride(2), stride_pos=positions.stride(0),
        stride_slot=slot_mapping.stride(0),
        HALF_DIM=half, BLOCK_HALF=next_pow2(half), BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HK=next_pow2(k.shape[1]), KV_BLOCK_SIZE=kv_cache.shape[2],
        num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip


def rotary_store_reference(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Plain torch: rotate q and k in place (rows with a position), then store."""
    rows = positions >= 0
    new_q, new_k = torch_ops.rotary(positions[rows], q[rows], k[rows], cos_sin)
    q[rows], k[rows] = new_q, new_k
    store_kv_reference(k, v, kv_cache, slot_mapping)
