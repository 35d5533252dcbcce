"""The kernel registry: which implementation of each model op a node runs, chosen once
from configuration (never from `x.is_cuda` inside a layer).

The engine calls `select_kernels(device_type, kernel_backend, attention_backend)` once at
start-up and hands the `ModelKernels` to the model, whose layers call its ops:

    rms_norm, add_rms_norm, rotary_ (in place, on both backends), silu_mul, attention,
    rotary_store_ (rotary, then the rotated K and V into the pool, in one kernel: Triton
    only; None on the torch backend, where the model rotates and the attention stores)

and hands `draw` (the sampler's fused random draw, kernels/gumbel_sample.py; None on the
torch backend, whose sampler draws with torch ops) to the sampler.

Backends: "torch" (kernels/torch_ops.py, kernels/attention_torch.py: any device) and
"triton" (the fused kernels of this package: CUDA, or CPU under TRITON_INTERPRET=1).
"auto" resolves to "triton" on CUDA, there handing prefill chunks without cached context
to torch's flash kernel (kernels/fresh_prefill.py), or on sm90+ the long ones to cuDNN's
fused attention (kernels/cudnn_prefill.py; a named "triton" keeps them all on the Triton
kernel), and to "torch" elsewhere; a `kernel_backend` of "auto"
follows the attention backend, so `--attention-backend torch` runs plain torch throughout.
The Triton elementwise kernels cover fp32/bf16/fp16; float64 activations (tests) run the
torch ops whatever the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from splitserve.kernels import torch_ops
from splitserve.kernels.attention import AttentionBackend

# The names `ModelConfig.attention_backend` and `kernel_backend` take (engine/config.py).
BACKENDS = ("auto", "torch", "triton")

NormOp = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class AddNormOp(Protocol):
    """(norm(x + residual), x + residual), the sum written into `residual_out` if given."""

    def __call__(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


RotaryOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
ActivationOp = Callable[[torch.Tensor], torch.Tensor]
# (positions, q, k, v, cos_sin, kv_cache layer view, slot_mapping) -> None: q and k rotated
# in place, the rotated k and v written at their slots (kernels/rotary_store.py).
RotaryStoreOp = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
     torch.Tensor],
    None,
]  # fmt: skip
# (logits [R, V], inv_temps [R] fp32, seeds [R] int64, counters [R] int64) -> tokens [R]:
# the sampler's fused random draw (kernels/gumbel_sample.py, engine/random_draw.py).
DrawOp = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModelKernels:
    """One implementation per op; `backend` and `attention_backend` name the choice."""

    backend: str
    attention_backend: str
    rms_norm: NormOp
    add_rms_norm: AddNormOp
    rotary_: RotaryOp
    silu_mul: ActivationOp
    attention: AttentionBackend
    # The sampler's fused draw: Triton's on the "triton" backend, else None (torch draw).
    draw: DrawOp | None = None
    # Rotary and the K/V store in one kernel: Triton's on the "triton" backend, else None.
    rotary_store_: RotaryStoreOp | None = None


def resolve_backend(name: str, device_type: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        return "triton" if device_type == "cuda" else "torch"
    return name


def torch_kernels() -> ModelKernels:
    """Plain torch for every op (any device)."""
    return select_kernels("cpu", "torch", "torch")


def _attention(
    name: str,
    device_type: str,
    pinned: bool,
    overlap: bool,
    fused_merge: bool,
    short_rest_rows: int,
    split_context: bool,
    ragged: bool,
) -> AttentionBackend:
    """`pinned`: the backend was named, not "auto": Triton kernels for every step.
    `overlap`: a mixed step's decode rows on a second CUDA stream (Triton only).
    `fused_merge`: split decode plans merged inside the split kernel (Triton only).
    `short_rest_rows`: short chunks over cached context on the decode kernel (Triton only).
    `split_context`: chunks over long context with the context split (Triton only).
    `ragged`: a run of cuDNN prompts in one ragged call (Triton only)."""
    if name == "triton":
        from splitserve.kernels.backend import TritonPagedAttention
        from splitserve.kernels.cudnn_prefill import cudnn_prefill_supported
        from splitserve.kernels.fresh_prefill import flash_prefill_supported

        flash = not pinned and flash_prefill_supported(device_type)
        return TritonPagedAttention(
            flash_fresh_prefill=flash,
            overlap_decode_rows=overlap and device_type == "cuda",
            cudnn_fresh_prefill=flash and cudnn_prefill_supported(device_type),
            fused_decode_merge=fused_merge,
            short_rest_rows=short_rest_rows,
            split_context_prefill=split_context,
            cudnn_ragged_prompts=ragged,
        )
    from splitserve.kernels.attention_torch import TorchPagedAttention

    return TorchPagedAttention()


def _rotary_store(backend: str) -> RotaryStoreOp | None:
    if backend == "torch":
        return None
    from splitserve.kernels.rotary_store import rotary_store_, rotary_store_reference

    def rotary_store(positions: torch.Tensor, q: torch.Tensor, *rest: torch.Tensor) -> None:
        op = rotary_store_reference if q.dtype == torch.float64 else rotary_store_
        op(positions, q, *rest)

    return rotary_store


def _draw(backend: str) -> DrawOp | None:
    if backend == "torch":
        return None
    from splitserve.kernels.gumbel_sample import gumbel_argmax

    return gumbel_argmax


def _triton_elementwise() -> tuple[NormOp, AddNormOp, RotaryOp, ActivationOp]:
    from splitserve.kernels.rmsnorm import rmsnorm
    from splitserve.kernels.rotary import apply_rotary_
    from splitserve.kernels.silu_mul import silu_mul

    def norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if x.dtype == torch.float64:
            return torch_ops.rms_norm(x, weight, eps)
        return rmsnorm(x, weight, eps)[0]

    def add_norm(
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        residual_out: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dtype == torch.float64:
            return torch_ops.add_rms_norm(x, residual, weight, eps, residual_out)
        out, summed = rmsnorm(x, weight, eps, residual, residual_out)
        if summed is None:
            raise RuntimeError("rmsnorm with a residual returned no sum")
        return out, summed

    def rotary(
        positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor
    ) -> None:
        if q.dtype == torch.float64:
            torch_ops.rotary_(positions, q, k, cos_sin)
        else:
            apply_rotary_(positions, q, k, cos_sin)

    def activation(gate_up: torch.Tensor) -> torch.Tensor:
        if gate_up.dtype == torch.float64:
            return torch_ops.silu_mul(gate_up)
        return silu_mul(gate_up)

    return norm, add_norm, rotary, activation


def select_kernels(
    device_type: str,
    kernel_backend: str = "auto",
    attention_backend: str = "auto",
    overlap_decode_attention: bool = False,
    fused_decode_merge: bool = False,
    short_rest_rows: int = 0,
    split_context_prefill: bool = False,
    cudnn_ragged_prompts: bool = False,
) -> ModelKernels:
    """The kernels a model on `device_type` ("cpu", "cuda") runs under this configuration."""
    attention = resolve_backend(attention_backend, device_type)
    backend = attention if kernel_backend == "auto" else resolve_backend(kernel_backend, "")
    if backend == "torch":
        ops: tuple[NormOp, AddNormOp, RotaryOp, ActivationOp] = (
            torch_ops.rms_norm,
            torch_ops.add_rms_norm,
            torch_ops.rotary_,
            torch_ops.silu_mul,
        )
    else:
        ops = _triton_elementwise()
    pinned = attention_backend != "auto"
    overlap = overlap_decode_attention
    attention_op = _attention(
        attention, device_type, pinned, overlap, fused_decode_merge, short_rest_rows,
        split_context_prefill, cudnn_ragged_prompts,
    )  # fmt: skip
    return ModelKernels(
        backend, attention, *ops, attention_op, _draw(backend), _rotary_store(backend)
    )
