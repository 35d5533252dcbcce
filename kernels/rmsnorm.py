"""Fused RMSNorm, optionally with the residual add in front of it.

    residual_out = x + residual            (when a residual is given, in x's dtype)
    out = weight * (h / rms(h)).to(dtype)  with h = residual_out or x, statistics in fp32

One program per row of the last dim. Rounding follows the model's `RMSNorm` exactly:
the normalised row is cast to x's dtype before the weight multiply. Inputs are 2-D or 3-D
with a contiguous last dim and any row strides (e.g. q/k head views of a fused qkv
output). Reference: `kernels/torch_ops.py` (`rms_norm`, `add_rms_norm`), via `rmsnorm_reference`.
"""

from __future__ import annotations

from typing import Protocol

import torch
import triton
import triton.language as tl

from splitserve.kernels import torch_ops
from splitserve.kernels.checks import FLOAT_DTYPES, check_launchable, check_shape, check_tensor


class NormParams(Protocol):
    """What the reference reads of a norm module (the model's `RMSNorm`)."""

    weight: torch.Tensor
    eps: float


@triton.jit
def _rmsnorm_kernel(
    x_ptr,  # [R0, R1, N]
    residual_ptr,  # [R0, R1, N] (read when HAS_RESIDUAL)
    weight_ptr,  # [N]
    out_ptr,  # [R0, R1, N]
    residual_out_ptr,  # [R0, R1, N] (written when HAS_RESIDUAL)
    num_rows_inner,  # R1
    n_cols,  # N
    eps,
    stride_x0,
    stride_x1,
    stride_r0,
    stride_r1,
    stride_w,
    stride_o0,
    stride_o1,
    stride_ro0,
    stride_ro1,
    BLOCK_N: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0)
    outer = (row // num_rows_inner).to(tl.int64)
    inner = (row % num_rows_inner).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + outer * stride_x0 + inner * stride_x1 + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        res = tl.load(
            residual_ptr + outer * stride_r0 + inner * stride_r1 + cols, mask=mask, other=0.0
        )
        x = (x.to(tl.float32) + res.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + outer * stride_ro0 + inner * stride_ro1 + cols, x, mask=mask)
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, 0) / n_cols
    normed = (xf * (1.0 / tl.sqrt(mean_sq + eps))).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols * stride_w, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(
        out_ptr + outer * stride_o0 + inner * stride_o1 + cols,
        out.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.dim() == 2 else t


def rmsnorm(
    x: torch.Tensor,  # [rows, N] or [R0, R1, N]
    weight: torch.Tensor,  # [N]
    eps: float,
    residual: torch.Tensor | None = None,  # like x
    residual_out: torch.Tensor | None = None,  # like x: where the new residual goes
) -> tuple[torch.Tensor, torch.Tensor | None]:  # (normed, new residual or None)
    """RMSNorm of x (or of x + residual). Returns fresh contiguous tensors, except that
    the new residual is written into `residual_out` when given (it may be `residual`
    itself); the normed output has dtype promote(x, weight), the new residual x's dtype."""
    device = x.device
    check_launchable(device)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be 2-D or 3-D, got shape {tuple(x.shape)}")
    check_tensor("x", x, x.dim(), FLOAT_DTYPES, device)
    n_cols = x.shape[-1]
    check_tensor("weight", weight, 1, FLOAT_DTYPES, device, inner_contiguous=False)
    check_shape("weight", weight, (n_cols,))
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=device)
    if residual is None and residual_out is not None:
        raise ValueError("residual_out needs a residual to add")
    if residual is not None:
        check_tensor("residual", residual, x.dim(), (x.dtype,), device)
        check_shape("residual", residual, x.shape)
        if residual_out is None:
            residual_out = torch.empty_like(x, memory_format=torch.contiguous_format)
        check_tensor("residual_out", residual_out, x.dim(), (x.dtype,), device)
        check_shape("residual_out", residual_out, x.shape)
    if x.numel() == 0:
        return out, residual_out
    x3, out3 = _as_3d(x), _as_3d(out)
    r3 = _as_3d(residual) if residual is not None else x3
    ro3 = _as_3d(residual_out) if residual_out is not None else out3
    block_n = triton.next_power_of_2(n_cols)
    _rmsnorm_kernel[(x3.shape[0] * x3.shape[1],)](
        x_ptr=x3, residual_ptr=r3, weight_ptr=weight, out_ptr=out3, residual_out_ptr=ro3,
        num_rows_inner=x3.shape[1], n_cols=n_cols, eps=eps,
        stride_x0=x3.stride(0), stride_x1=x3.stride(1),
        stride_r0=r3.stride(0), stride_r1=r3.stride(1), stride_w=weight.stride(0),
        stride_o0=out3.stride(0), stride_o1=out3.stride(1),
        stride_ro0=ro3.stride(0), stride_ro1=ro3.stride(1),
        BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
        num_warps=min(16, max(1, block_n // 256)),
    )  # fmt: skip
    return out, residual_out


def rmsnorm_reference(
    norm: NormParams, x: torch.Tensor, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's plain-torch RMSNorm, with the residual add the decoder layer does."""
    if residual is None:
        return torch_ops.rms_norm(x, norm.weight, norm.eps), None
    return torch_ops.add_rms_norm(x, residual, norm.weight, norm.eps)
