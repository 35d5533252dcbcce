"""The few-row GEMM kernel (kernels/skinny_gemm.py) against torch's linear.

CPU: Triton interpreter, float32 (IEEE dot) and float16 (the interpreter's bfloat16 dot
is wrong, so bfloat16 runs on the GPU only). GPU: bfloat16 at Llama-8B shapes, with and
without K splits, inside a captured CUDA graph, and bit-identical across repeated calls.
"""

from __future__ import annotations

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
TOL = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.float16: dict(atol=2e-2, rtol=2e-3),
    torch.bfloat16: dict(atol=6e-2, rtol=1.6e-2),
}


@pytest.fixture(scope="module", autouse=True)
def _kernels(triton_interpreter) -> None:
    """The kernel module, imported once the interpreter is chosen (see conftest)."""
    global SkinnyConfig, skinny_gemm
    from splitserve.kernels.skinny_gemm import SkinnyConfig, skinny_gemm


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return (torch.randn(*shape, generator=gen, device=DEVICE) / 4).to(dtype)


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    bias = b.double() if b is not None else None
    return torch.nn.functional.linear(x.double(), w.double(), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize(
    "rows,n,k,block_n,block_k,splits",
    [
        (1, 48, 128, 16, 64, 1),
        (3, 64, 256, 32, 64, 2),
        (16, 96, 512, 32, 128, 4),
        (20, 80, 256, 64, 32, 8),
    ],
)
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_linear(
    rows: int, n: int, k: int, block_n: int, block_k: int, splits: int, with_bias: bool, dtype
) -> None:
    x = _randn(rows, k, dtype=dtype, seed=rows)
    w = _randn(n, k, dtype=dtype, seed=n)
    b = _randn(n, dtype=dtype, seed=k) if with_bias else None
    out = skinny_gemm(x, w, SkinnyConfig(block_n, block_k, splits), bias=b)
    torch.testing.assert_close(out.double(), _reference(x, w, b), **TOL[dtype])


def test_splits_reset_their_tickets_and_repeat_bit_for_bit() -> None:
    """The last block of every column tile resets its counter, so the next call (here with
    other inputs) splits correctly again; the partials are summed in split order."""
    from splitserve.kernels.skinny_gemm import _Scratch, block_m

    config = SkinnyConfig(32, 64, 4)
    w = _randn(96, 512, dtype=torch.float32, seed=1)
    scratch = _Scratch(DEVICE, 96, block_m(5), config)
    first = skinny_gemm(_randn(5, 512, dtype=torch.float32, seed=2), w, config, scratch=scratch)
    assert int(scratch.tickets.abs().sum()) == 0
    x = _randn(5, 512, dtype=torch.float32, seed=3)
    again = skinny_gemm(x, w, config, scratch=scratch)
    torch.testing.assert_close(again.double(), _reference(x, w, None), **TOL[torch.float32])
    assert torch.equal(again, skinny_gemm(x, w, config, scratch=scratch))
    assert not torch.equal(first, again)


def test_writes_into_a_strided_out() -> None:
    x = _randn(4, 256, dtype=torch.float32, seed=4)
    w = _randn(64, 256, dtype=torch.float32, seed=5)
    buffer = torch.full((4, 100), 7.0, device=DEVICE)
    out = skinny_gemm(x, w, SkinnyConfig(16, 64, 2), out=buffer[:, 10:74])
    assert out.data_ptr() == buffer[:, 10:74].data_ptr()
    torch.testing.assert_close(out.double(), _reference(x, w, None), **TOL[torch.float32])
    assert bool((buffer[:, :10] == 7).all()) and bool((buffer[:, 74:] == 7).all())


def test_refuses_what_it_cannot_run() -> None:
    x = _randn(4, 256, dtype=torch.float32, seed=6)
    with pytest.raises(ValueError, match="does not fit"):
        skinny_gemm(x, _randn(64, 256, dtype=torch.float32, seed=7), SkinnyConfig(16, 128, 4))
    with pytest.raises(ValueError, match="weight must be"):
        skinny_gemm(x, _randn(64, 128, dtype=torch.float32, seed=8), SkinnyConfig(16, 64, 1))
    with pytest.raises(ValueError, match="out must be"):
        w = _randn(64, 256, dtype=torch.float32, seed=9)
        skinny_gemm(x, w, SkinnyConfig(16, 64, 1), out=torch.empty(4, 32, device=DEVICE))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("rows", [1, 7, 48, 64, 128])
@pytest.mark.parametrize(
    "name,n,k", [("qkv", 6144, 4096), ("o", 4096, 4096), ("down", 4096, 14336)]
)
@pytest.mark.parametrize("splits", [1, 4])
def test_llama8b_shapes_in_bfloat16(rows: int, name: str, n: int, k: int, splits: int) -> None:
    x = _randn(rows, k, dtype=torch.bfloat16, seed=rows)
    w = _randn(n, k, dtype=torch.bfloat16, seed=n)
    out = skinny_gemm(x, w, SkinnyConfig(64, 128, splits))
    ref = torch.nn.functional.linear(x.float(), w.float())
    torch.testing.assert_close(out.float(), ref, **TOL[torch.bfloat16])


@pytest.mark.gpu
@gpu
def test_replays_in_a_cuda_graph_bit_for_bit() -> None:
    from splitserve.kernels.skinny_gemm import _Scratch

    config = SkinnyConfig(32, 128, 4)
    x = _randn(48, 4096, dtype=torch.bfloat16, seed=1)
    w = _randn(4096, 4096, dtype=torch.bfloat16, seed=2)
    out = torch.empty(48, 4096, device=DEVICE, dtype=torch.bfloat16)
    scratch = _Scratch(DEVICE, 4096, 64, config)
    skinny_gemm(x, w, config, out=out, scratch=scratch)
    expected = out.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        skinny_gemm(x, w, config, out=out, scratch=scratch)
    for _ in range(50):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
