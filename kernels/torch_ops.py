"""Plain-torch versions of the model's elementwise ops: what the CPU runs, and the
references the Triton kernels of this package are tested against (bit-exact in rounding).

    rms_norm(x, weight, eps)                  weight * (x / rms(x)).to(x.dtype), stats in fp32
    add_rms_norm(x, residual, weight, eps)    (rms_norm(x + residual), x + residual); the sum
                                              into `residual_out` when given
    rotary(positions, q, k, cos_sin)          neox rope, out of place -> (q', k')
    rotary_(positions, q, k, cos_sin)         the same, written into q and k
    silu_mul(gate_up)                         silu(gate) * up over a fused [T, 2I] row

`cos_sin` is the model's float32 table [max_position, 2, head_dim] (cos, sin), cast to the
activations' dtype before use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float() if x.dtype != torch.float64 else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual if residual_out is None else torch.add(x, residual, out=residual_out)
    return rms_norm(summed, weight, eps), summed


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary(
    positions: torch.Tensor,  # [T] int64
    q: torch.Tensor,  # [T, num_heads, head_dim]
    k: torch.Tensor,  # [T, num_kv_heads, head_dim]
    cos_sin: torch.Tensor,  # [max_position, 2, head_dim] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    table = cos_sin[positions].to(q.dtype)
    cos, sin = table[:, 0, None, :], table[:, 1, None, :]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def rotary_(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
) -> None:
    """`rotary` written into q and k, as the Triton kernel does."""
    new_q, new_k = rotary(positions, q, k, cos_sin)
    q.copy_(new_q)
    k.copy_(new_k)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
