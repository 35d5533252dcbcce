"""The kernel registry picks every op's implementation from configuration, and the model's
layers behave alike whichever implementation runs (rotary rotates in place on both)."""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.model.arch import ModelArchConfig
from splitserve.engine.model.layers import RotaryEmbedding
from splitserve.kernels import torch_ops
from splitserve.kernels.attention_torch import TorchPagedAttention
from splitserve.kernels.registry import select_kernels, torch_kernels


@pytest.mark.parametrize(
    ("device", "kernel", "attention", "want_kernel", "want_attention"),
    [
        ("cpu", "auto", "auto", "torch", "torch"),
        ("cuda", "auto", "auto", "triton", "triton"),
        # --attention-backend torch on CUDA runs plain torch throughout.
        ("cuda", "auto", "torch", "torch", "torch"),
        ("cuda", "torch", "triton", "torch", "triton"),
        ("cpu", "triton", "torch", "triton", "torch"),
    ],
)
def test_backends_follow_configuration_not_tensors(
    triton_interpreter,
    device: str,
    kernel: str,
    attention: str,
    want_kernel: str,
    want_attention: str,
) -> None:
    # Choosing Triton imports its kernel modules (the interpreter is chosen then).
    kernels = select_kernels(device, kernel, attention)
    assert (kernels.backend, kernels.attention_backend) == (want_kernel, want_attention)
    is_torch_attention = isinstance(kernels.attention, TorchPagedAttention)
    assert is_torch_attention == (want_attention == "torch")
    assert (kernels.rms_norm is torch_ops.rms_norm) == (want_kernel == "torch")
    # The sampler's fused draw comes with the Triton kernels.
    assert (kernels.draw is None) == (want_kernel == "torch")


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="kernel backend must be one of"):
        select_kernels("cpu", "cutlass", "auto")


def test_rotary_rotates_in_place_and_matches_the_reference() -> None:
    arch = ModelArchConfig(
        architecture="llama", vocab_size=32, hidden_size=64, intermediate_size=64,
        num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
        rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
        tie_word_embeddings=False,
    )  # fmt: skip
    rope = RotaryEmbedding(arch, torch_kernels())
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 16, generator=gen)
    k = torch.randn(5, 2, 16, generator=gen)
    positions = torch.tensor([0, 3, 7, 8, 63])
    want_q, want_k = rope.reference(positions, q.clone(), k.clone())
    out_q, out_k = rope(positions, q, k)
    assert out_q is q and out_k is k
    torch.testing.assert_close(q, want_q, rtol=0, atol=0)
    torch.testing.assert_close(k, want_k, rtol=0, atol=0)
