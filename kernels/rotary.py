"""Rotary position embedding (neox style, rotate halves) applied in place to q and k.

For each token t with position p = positions[t] and every head, with h = head_dim / 2:

    out[:h] = x[:h] * cos[p, :h] - x[h:] * sin[p, :h]
    out[h:] = x[h:] * cos[p, h:] + x[:h] * sin[p, h:]

cos/sin come from the model's float32 table (`RotaryEmbedding.cos_sin`)
[max_position, 2, head_dim] and are cast to the activations' dtype first; every product
and sum is rounded to that dtype as the model's torch code does, and the kernel is
compiled without multiply-add fusion (which would fold a product's rounding into the sum,
e.g. `fma.rn.bf16` on sm_90), so results are bit-for-bit the reference's in every dtype.
Tokens with position -1 (padding) are left untouched. One program per token rotates all
of its q and k heads.
Reference: `kernels/torch_ops.py` (`rotary`), via `rotary_reference`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

from splitserve.kernels import torch_ops
from splitserve.kernels.checks import (
    FLOAT_DTYPES,
    check_launchable,
    check_shape,
    check_tensor,
    next_pow2,
)


class RopeTable(Protocol):
    """What the reference reads of a rope module (the model's `RotaryEmbedding`)."""

    cos_sin: torch.Tensor


@triton.jit
def rotated_halves(lo, hi, cos_lo, cos_hi, sin_lo, sin_hi):
    """The rotated halves of rows (lo, hi) in their dtype: each product, then the sum,
    rounded to that dtype (as torch does). cos/sin: fp32, already rounded through it."""
    dtype = lo.dtype
    lo_f, hi_f = lo.to(tl.float32), hi.to(tl.float32)
    a = (lo_f * cos_lo[None, :]).to(dtype).to(tl.float32)
    b = (-hi_f * sin_lo[None, :]).to(dtype).to(tl.float32)
    c = (hi_f * cos_hi[None, :]).to(dtype).to(tl.float32)
    d = (lo_f * sin_hi[None, :]).to(dtype).to(tl.float32)
    return (a + b).to(dtype), (c + d).to(dtype)


@triton.jit
def cos_sin_halves(
    cos_sin_ptr, pos, stride_cs_pos, stride_cs_kind, stride_cs_dim, dtype,
    HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Position `pos`'s cos and sin, each as its two halves, fp32 rounded through `dtype`."""
    dims = tl.arange(0, BLOCK_HALF)
    dmask = dims < HALF_DIM
    cos_ptrs = cos_sin_ptr + pos * stride_cs_pos + dims * stride_cs_dim
    sin_ptrs = cos_ptrs + stride_cs_kind
    hi = HALF_DIM * stride_cs_dim
    cos_lo = tl.load(cos_ptrs, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    cos_hi = tl.load(cos_ptrs + hi, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    sin_lo = tl.load(sin_ptrs, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    sin_hi = tl.load(sin_ptrs + hi, mask=dmask, other=0.0).to(dtype).to(tl.float32)
    return cos_lo, cos_hi, sin_lo, sin_hi


@triton.jit
def head_halves(
    x_ptr, num_heads, stride_head, HALF_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """A token's heads [BLOCK_H, 2 * HALF_DIM] at `x_ptr` as their two halves, with the
    pointers and mask of the low half."""
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads < num_heads)[:, None] & (dims < HALF_DIM)[None, :]
    lo_ptrs = x_ptr + heads[:, None] * stride_head + dims[None, :]
    lo = tl.load(lo_ptrs, mask=mask, other=0.0)
    hi = tl.load(lo_ptrs + HALF_DIM, mask=mask, other=0.0)
    return lo_ptrs, mask, lo, hi


@triton.jit
def rotate_heads(
    x_ptr,  # [T, num_heads, 2 * HALF_DIM] (this token's row is at `x_ptr`)
    num_heads,
    stride_head,
    cos_lo,  # [BLOCK_HALF] fp32, rounded through the activation dtype
    cos_hi,
    sin_lo,
    sin_hi,
    rotate,  # scalar: rotate (else leave the heads as they are)
    HALF_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate a token's heads in place where `rotate`; their halves as they now are, with
    the mask of the heads (for a caller that also stores them)."""
    lo_ptrs, mask, lo, hi = head_halves(
        x_ptr, num_heads, stride_head, HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF
    )
    new_lo, new_hi = rotated_halves(lo, hi, cos_lo, cos_hi, sin_lo, sin_hi)
    tl.store(lo_ptrs, new_lo, mask=mask & rotate)
    tl.store(lo_ptrs + HALF_DIM, new_hi, mask=mask & rotate)
    return mask, tl.where(rotate, new_lo, lo), tl.where(rotate, new_hi, hi)


@triton.jit
def _rotary_kernel(
    q_ptr,  # [T, num_heads, HEAD_DIM], rotated in place
    k_ptr,  # [T, num_kv_heads, HEAD_DIM], rotated in place
    cos_sin_ptr,  # [max_position, 2, HEAD_DIM] fp32
    positions_ptr,  # [T] int64, -1 = skip
    num_heads,
    num_kv_heads,
    stride_q_tok,
    stride_q_head,
    stride_k_tok,
    stride_k_head,
    stride_cs_pos,
    stride_cs_kind,
    stride_cs_dim,
    stride_pos,
    HALF_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + tok * stride_pos)
    if pos < 0:
        return
    cos_lo, cos_hi, sin_lo, sin_hi = cos_sin_halves(
        cos_sin_ptr, pos, stride_cs_pos, stride_cs_kind, stride_cs_dim, q_ptr.dtype.element_ty,
        HALF_DIM=HALF_DIM, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    rotate_heads(
        q_ptr + tok * stride_q_tok, num_heads, stride_q_head, cos_lo, cos_hi, sin_lo, sin_hi,
        True, HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HQ, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip
    rotate_heads(
        k_ptr + tok * stride_k_tok, num_kv_heads, stride_k_head, cos_lo, cos_hi, sin_lo, sin_hi,
        True, HALF_DIM=HALF_DIM, BLOCK_H=BLOCK_HK, BLOCK_HALF=BLOCK_HALF,
    )  # fmt: skip


def apply_rotary_(
    positions: torch.Tensor,  # [T] int64, -1 = padding (left untouched)
    q: torch.Tensor,  # [T, num_heads, head_dim], rotated in place
    k: torch.Tensor,  # [T, num_kv_heads, head_dim], rotated in place
    cos_sin: torch.Tensor,  # [max_position, 2, head_dim] fp32 (RotaryEmbedding.cos_sin)
) -> None:
    """Rotate q and k in place. Positions must be < max_position (not checked on device)."""
    check_launchable(q.device)
    check_rotary_args(positions, q, k, cos_sin)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        q_ptr=q, k_ptr=k, cos_sin_ptr=cos_sin, positions_ptr=positions,
        num_heads=num_heads, num_kv_heads=k.shape[1],
        stride_q_tok=q.stride(0), stride_q_head=q.stride(1),
        stride_k_tok=k.stride(0), stride_k_head=k.stride(1),
        stride_cs_pos=cos_sin.stride(0), stride_cs_kind=cos_sin.stride(1),
        stride_cs_dim=cos_sin.stride(2), stride_pos=positions.stride(0),
        HALF_DIM=half, BLOCK_HALF=next_pow2(half), BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HK=next_pow2(k.shape[1]), num_warps=4, enable_fp_fusion=False,
    )  # fmt: skip


def check_rotary_args(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """`apply_rotary_`'s argument checks (ValueError with what to pass instead)."""
    device = q.device
    check_tensor("q", q, 3, FLOAT_DTYPES, device)
    num_tokens, _, head_dim = q.shape
    check_tensor("k", k, 3, (q.dtype,), device)
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q shape {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    check_tensor("cos_sin", cos_sin, 3, (torch.float32,), device, inner_contiguous=False)
    if cos_sin.shape[1:] != (2, head_dim):
        raise ValueError(
            f"cos_sin must be [max_position, 2, {head_dim}], got {tuple(cos_sin.shape)}"
        )
    check_tensor("positions", positions, 1, (torch.int64,), device, inner_contiguous=False)
    check_shape("positions", positions, (num_tokens,))


def rotary_reference(
    rope: RopeTable, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's plain-torch rotary embedding (out of place)."""
    return torch_ops.rotary(positions, q, k, rope.cos_sin)
