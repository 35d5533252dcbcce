"""Fused RMSNorm (+ residual), in-place rotary and SiLU-and-multiply kernels against the
model's own `RMSNorm`, `RotaryEmbedding` and MLP torch code (engine/model/layers.py).

CPU: Triton interpreter (TRITON_INTERPRET=1 set before triton is imported), float32 and
float16 (the interpreter rounds float32 to bfloat16 by truncation, so bfloat16 runs on
the GPU only). GPU: all dtypes, plus model-sized shapes under the `gpu` marker.
"""

from __future__ import annotations

import pytest
import torch

from splitserve.engine.model.arch import ModelArchConfig, RopeScaling
from splitserve.engine.model.layers import RMSNorm, RotaryEmbedding

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """Kernel modules, imported once the interpreter is chosen (see conftest)."""
    global rmsnorm, rmsnorm_reference, apply_rotary_, rotary_reference, silu_mul, silu_mul_reference
    global rotary_store_, rotary_store_reference, store_kv
    from splitserve.kernels.rmsnorm import rmsnorm, rmsnorm_reference
    from splitserve.kernels.rotary import apply_rotary_, rotary_reference
    from splitserve.kernels.rotary_store import rotary_store_, rotary_store_reference
    from splitserve.kernels.silu_mul import silu_mul, silu_mul_reference
    from splitserve.kernels.store_kv import store_kv


ON_GPU = DEVICE.type == "cuda"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
DTYPES = [
    torch.float32,
    torch.float16,
    pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, gpu]),
]
# One unit in the last place of each dtype (relative): the kernels may differ from torch
# by a rounding of the fp32 statistics.
NORM_TOL = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),
    torch.float16: dict(atol=2e-3, rtol=1e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=8e-3),
}


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)


def _norm_module(size: int, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(size, 1e-6, dtype).to(DEVICE)
    norm.weight.data = 1.0 + 0.5 * _randn(size, dtype=dtype, seed=seed)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("hidden", [64, 96, 256])
def test_rmsnorm_2d(hidden: int, with_residual: bool, dtype: torch.dtype) -> None:
    norm = _norm_module(hidden, dtype, seed=hidden)
    x = 3.0 * _randn(7, hidden, dtype=dtype, seed=1)
    residual = _randn(7, hidden, dtype=dtype, seed=2) if with_residual else None
    x_before = x.clone()
    out, new_residual = rmsnorm(x, norm.weight, norm.eps, residual)
    ref, ref_residual = rmsnorm_reference(norm, x, residual)
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])
    if with_residual:
        assert new_residual is not None and ref_residual is not None
        torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)
    else:
        assert new_residual is None
    torch.testing.assert_close(x, x_before, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("in_place", [False, True])
def test_rmsnorm_writes_the_sum_where_asked(in_place: bool, dtype: torch.dtype) -> None:
    """`residual_out`: the piecewise graphs' static residual buffer (a row slice of a
    larger one), or the residual itself; the sum lands there, bit for bit."""
    norm = _norm_module(96, dtype, seed=5)
    x, residual = _randn(7, 96, dtype=dtype, seed=6), _randn(7, 96, dtype=dtype, seed=7)
    ref, ref_residual = rmsnorm_reference(norm, x, residual)
    buffer = torch.full((10, 96), float("nan"), dtype=dtype, device=DEVICE)
    target = residual if in_place else buffer[:7]
    out, summed = rmsnorm(x, norm.weight, norm.eps, residual, residual_out=target)
    assert summed is target
    torch.testing.assert_close(target, ref_residual, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])
    assert buffer[7:].isnan().all()


def test_rmsnorm_refuses_a_sum_without_residual() -> None:
    x = _randn(3, 64, dtype=torch.float32, seed=8)
    with pytest.raises(ValueError, match="residual_out needs a residual"):
        rmsnorm(x, torch.ones(64, device=DEVICE), 1e-6, residual_out=torch.empty_like(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rmsnorm_per_head_view(head_dim: int, dtype: torch.dtype) -> None:
    """Qwen3's q_norm: heads of the q slice of a fused qkv output (strided rows)."""
    tokens, heads, kv_heads = 5, 4, 2
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    norm = _norm_module(head_dim, dtype, seed=4)
    out, _ = rmsnorm(q, norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(q), **NORM_TOL[dtype])


def _rope(head_dim: int, scaling: RopeScaling | None, kernels=None) -> RotaryEmbedding:
    arch = ModelArchConfig(
        architecture="llama", vocab_size=32, hidden_size=4 * head_dim, intermediate_size=64,
        num_layers=1, num_heads=4, num_kv_heads=1, head_dim=head_dim, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=8192,
        tie_word_embeddings=False,
    )  # fmt: skip
    return RotaryEmbedding(arch, kernels).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scaling", [None, RopeScaling("llama3", 8.0)])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_in_place(head_dim, heads, scaling, dtype) -> None:
    num_heads, num_kv = heads
    rope = _rope(head_dim, scaling)
    tokens = 6
    # q and k as the model has them: strided views into one fused qkv output.
    qkv = _randn(tokens, (num_heads + 2 * num_kv) * head_dim, dtype=dtype, seed=head_dim)
    q = qkv[:, : num_heads * head_dim].view(tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv) * head_dim].view(
        tokens, num_kv, head_dim
    )
    positions = torch.tensor([0, 1, 17, 4095, -1, 8191], device=DEVICE)
    before = qkv.clone()
    ref_q, ref_k = rotary_reference(rope, positions.clamp(min=0), q.clone(), k.clone())
    apply_rotary_(positions, q, k, rope.cos_sin)
    live = positions >= 0
    # Bit-for-bit in every dtype: same roundings as torch, no fused multiply-adds.
    torch.testing.assert_close(q[live], ref_q[live], rtol=0, atol=0)
    torch.testing.assert_close(k[live], ref_k[live], rtol=0, atol=0)
    # The padding token and the v slice are untouched.
    v_begin = (num_heads + num_kv) * head_dim
    torch.testing.assert_close(qkv[~live], before[~live], rtol=0, atol=0)
    torch.testing.assert_close(qkv[:, v_begin:], before[:, v_begin:], rtol=0, atol=0)


def _qkv_and_pool(tokens, heads, head_dim, block_size, dtype, seed):
    """q, k, v as strided views of one fused projection, and a NaN-poisoned two-layer pool
    whose layer-1 view the store writes."""
    num_heads, num_kv = heads
    qkv = _randn(tokens, (num_heads + 2 * num_kv) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([num_heads * head_dim, num_kv * head_dim, num_kv * head_dim], dim=-1)
    views = (x.view(tokens, -1, head_dim) for x in (q, k, v))
    pool = torch.full((6, 2, 2, block_size, num_kv, head_dim), float("nan"), dtype=dtype)
    return qkv, *views, pool.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("head_dim,block_size", [(64, 16), (128, 4)])
def test_rotary_store_is_rotary_then_store(head_dim, block_size, heads, dtype) -> None:
    """One kernel writes what `apply_rotary_` and then `store_kv` write, to the bit: q and
    k rotated in place where there is a position (-1: untouched), the rotated k and v at
    their slots (-1: stored nowhere), the rest of the pool as it was."""
    rope = _rope(head_dim, RopeScaling("llama3", 8.0))
    positions = torch.tensor([0, 1, 17, 4095, -1, 8191, 5], device=DEVICE)
    slots = torch.tensor([3, -1, 7, 0, 11, 2 * block_size + 1, -1], device=DEVICE)
    fused, apart, torch_side = (
        _qkv_and_pool(7, heads, head_dim, block_size, dtype, seed=head_dim) for _ in range(3)
    )
    rotary_store_(positions, *fused[1:4], rope.cos_sin, fused[4][:, 1], slots)
    apply_rotary_(positions, apart[1], apart[2], rope.cos_sin)
    store_kv(apart[2], apart[3], apart[4][:, 1], slots)
    for got, want in zip((fused[0], fused[4]), (apart[0], apart[4]), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    # The plain-torch reference agrees (the pool rows it stores, the rows it rotates).
    rotary_store_reference(positions, *torch_side[1:4], rope.cos_sin, torch_side[4][:, 1], slots)
    torch.testing.assert_close(torch_side[0], fused[0], rtol=0, atol=0)
    torch.testing.assert_close(torch_side[4], fused[4], rtol=0, atol=0, equal_nan=True)
    layer = fused[4][:, 1]  # [blocks, 2, block_size, kv_heads, head_dim]
    for slot in slots[slots >= 0].tolist():
        assert not torch.isnan(layer[slot // block_size, :, slot % block_size]).any()


def test_the_model_stores_with_its_rotary_in_one_kernel_on_triton() -> None:
    """`rotate_and_store` takes the Triton kernels' fused op (the backend's store is not
    called) and, with plain torch, rotates and then calls the store it is given: the same
    pool and q/k either way."""
    from splitserve.kernels.registry import select_kernels, torch_kernels

    calls: list[int] = []

    def store(k, v, kv_cache, slot_mapping):  # type: ignore[no-untyped-def]
        calls.append(1)
        store_kv(k, v, kv_cache, slot_mapping)

    positions = torch.tensor([0, 5, 9], device=DEVICE)
    slots = torch.tensor([4, -1, 9], device=DEVICE)
    results = []
    for kernels in (select_kernels(DEVICE.type, "triton", "torch"), torch_kernels()):
        rope = _rope(64, None, kernels)
        qkv, q, k, v, pool = _qkv_and_pool(3, (4, 2), 64, 16, torch.float32, seed=2)
        rope.rotate_and_store(positions, q, k, v, pool[:, 0], slots, store)
        results.append((qkv, pool))
    assert calls == [1]  # only the torch kernels went through the backend's store
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0, equal_nan=True)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norm_and_rope_llama8b_shapes(dtype: torch.dtype) -> None:
    tokens, hidden, heads, kv_heads, head_dim = 1000, 4096, 32, 8, 128
    norm = _norm_module(hidden, dtype, seed=9)
    x = _randn(tokens, hidden, dtype=dtype, seed=10)
    residual = _randn(tokens, hidden, dtype=dtype, seed=11)
    out, new_residual = rmsnorm(x, norm.weight, norm.eps, residual)
    ref, ref_residual = rmsnorm_reference(norm, x, residual)
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])
    torch.testing.assert_close(new_residual, ref_residual, rtol=0, atol=0)

    rope = _rope(head_dim, RopeScaling("llama3", 8.0))
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=12)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    positions = torch.randint(0, 8192, (tokens,), device=DEVICE)
    ref_q, ref_k = rotary_reference(rope, positions, q.clone(), k.clone())
    apply_rotary_(positions, q, k, rope.cos_sin)
    torch.testing.assert_close(q, ref_q, rtol=0, atol=0)
    torch.testing.assert_close(k, ref_k, rtol=0, atol=0)

    gate_up = 4 * _randn(tokens, 2 * 14336, dtype=dtype, seed=13)
    # Same rounding steps as torch; exp may differ from torch's by an ulp in float32.
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_reference(gate_up), **NORM_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (5, 1000), (3, 2100)])
def test_silu_mul(tokens: int, inter: int, dtype: torch.dtype) -> None:
    """Ragged widths (not a multiple of the block) and a strided input view."""
    wide = 4 * _randn(tokens, 2 * inter + 8, dtype=dtype, seed=inter)
    gate_up = wide[:, : 2 * inter]
    out = silu_mul(gate_up)
    ref = silu_mul_reference(gate_up)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, **NORM_TOL[dtype])


def test_silu_mul_rejects_odd_width() -> None:
    with pytest.raises(ValueError, match="even number of columns"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
