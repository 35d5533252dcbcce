"""Fused SiLU-and-multiply of the MLP: out = silu(gate) * up, over a fused gate_up row.

    gate_up: [T, 2 * I] (gate in columns [0, I), up in [I, 2I)) -> out: [T, I]

The model's torch code (`MLP.forward` on the CPU) computes `F.silu(gate) * up`: silu in
float32, rounded to the activations' dtype, then the product in float32, rounded again.
The kernel rounds the same way, with an IEEE-rounded division and the accurate exp
(libdevice), so one kernel replaces two elementwise passes (and a temporary of T x I).
Grid: (T, cdiv(I, BLOCK)). Reference: `silu_mul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from splitserve.kernels import torch_ops
from splitserve.kernels.checks import FLOAT_DTYPES, INTERPRET, check_launchable, check_tensor

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr,
    out_ptr,
    inter,  # I
    stride_in_row,
    stride_out_row,
    BLOCK: tl.constexpr,
    LIBDEVICE_EXP: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dtype = out_ptr.dtype.element_ty
    base = gate_up_ptr + row * stride_in_row
    gate = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(base + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if LIBDEVICE_EXP:  # noqa: SIM108 (a constexpr branch: one side is never traced)
        exp = libdevice.exp(-gate)
    else:  # the interpreter has no libdevice; numpy's exp is accurate already
        exp = tl.exp(-gate)
    silu = tl.math.div_rn(gate, 1.0 + exp).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out_row + cols, (silu * up).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate_up[:, :I]) * gate_up[:, I:]."""
    device = gate_up.device
    check_launchable(device)
    check_tensor("gate_up", gate_up, 2, FLOAT_DTYPES, device)
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up must have an even number of columns, got {width}")
    inter = width // 2
    out = torch.empty(num_tokens, inter, dtype=gate_up.dtype, device=device)
    if num_tokens == 0 or inter == 0:
        return out
    _silu_mul_kernel[(num_tokens, triton.cdiv(inter, BLOCK))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        BLOCK=BLOCK, LIBDEVICE_EXP=not INTERPRET, num_warps=4,
    )  # fmt: skip
    return out


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    return torch_ops.silu_mul(gate_up)
